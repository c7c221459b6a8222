"""Oracles for drpt_ray.algorithms: every expected value is worked out by hand in the comments.

float64 throughout so the tolerances can be tight (1e-9 absolute, or exact).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from drpt_ray.registry import Registry
from drpt_ray.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AGG_MODES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    AdvantageInputs,
    PolicyLossInputs,
    AdvantageMeta,
    aggregate,
    compute_advantages,
    example_losses,
    example_units,
    gae_returns,
    kl_loss,
    kl_penalty_tokens,
    value_loss,
)
from drpt_ray.algorithms import advantages as adv_mod

D = torch.float64
ATOL = 1e-9


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=D)


def close(actual: torch.Tensor | float, expected) -> None:
    expected = expected if isinstance(expected, torch.Tensor) else torch.as_tensor(expected, dtype=D)
    actual = actual if isinstance(actual, torch.Tensor) else torch.as_tensor(actual, dtype=D)
    torch.testing.assert_close(actual.to(D), expected.to(D), rtol=0, atol=ATOL)


def inputs(rewards, group_ids, mask=None, **kw) -> AdvantageInputs:
    rewards = t(rewards)
    mask = torch.ones(len(rewards), 3, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool)
    return AdvantageInputs(rewards=rewards, group_ids=torch.tensor(group_ids), response_mask=mask, **kw)


# ------------------------------------------------------------------------------------------
# Registry


def test_registry_refuses_clash_and_bad_names():
    reg: Registry = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="'a' is already registered"):
        reg.register("a")
    for bad in ("", "pkg.mod:fn"):
        with pytest.raises(ValueError, match="invalid thing name"):
            reg.register(bad)
    # The real registries refuse a clash with a built-in before anything is replaced.
    with pytest.raises(ValueError, match="already registered"):
        ADVANTAGE_ESTIMATORS.register("grpo")
    assert ADVANTAGE_ESTIMATORS.get("grpo") is adv_mod.grpo


def test_registry_unknown_name_lists_valid_names():
    for reg, expected in (
        (ADVANTAGE_ESTIMATORS, ["gae", "grpo", "grpo_no_std", "reinforce_pp", "rloo"]),
        (POLICY_LOSSES, ["ppo_clip", "reinforce"]),
        (KL_ESTIMATORS, ["k1", "k2", "k3"]),
    ):
        assert reg.names() == expected
        with pytest.raises(ValueError) as err:
            reg.get("nope")
        assert "'nope'" in str(err.value) and str(expected) in str(err.value)


def test_registry_resolves_import_paths():
    reg: Registry = Registry("thing")
    assert reg.get("math:sqrt") is math.sqrt
    assert ADVANTAGE_ESTIMATORS.get("drpt_ray.algorithms.advantages:rloo") is adv_mod.rloo
    with pytest.raises(ValueError, match="cannot resolve"):
        reg.get("math:no_such_fn")
    with pytest.raises(ValueError, match="cannot resolve"):
        reg.get("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="not callable"):
        reg.get("math:pi")


def _user_estimator(inputs):
    return inputs.response_mask.double()


def _user_critic_estimator(inputs):
    return inputs.response_mask.double(), inputs.values


_user_critic_estimator.needs_critic = True


def test_registry_metadata_of_builtins_and_user_functions():
    meta = {name: ADVANTAGE_ESTIMATORS.meta(name) for name in ADVANTAGE_ESTIMATORS.names()}
    assert [n for n, m in meta.items() if m.needs_critic] == ["gae"]
    assert [n for n, m in meta.items() if m.needs_groups] == ["grpo", "grpo_no_std", "rloo"]
    # A user function gets the safe defaults, or declares its metadata as attributes.
    assert ADVANTAGE_ESTIMATORS.meta(f"{__name__}:_user_estimator") == AdvantageMeta()
    assert ADVANTAGE_ESTIMATORS.meta(f"{__name__}:_user_critic_estimator") == AdvantageMeta(needs_critic=True)
    with pytest.raises(TypeError, match="needs_citric"):
        ADVANTAGE_ESTIMATORS.register("typo", needs_citric=True)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        ADVANTAGE_ESTIMATORS.meta("nope")


def test_compute_advantages_returns_value_targets_only_with_a_critic():
    x = inputs([1, 0], [0, 0], values=t([[0.5, 0.2, 0.1], [0.0, 0.3, 0.2]]))
    adv, returns = compute_advantages("grpo", x)
    close(adv, ADVANTAGE_ESTIMATORS.get("grpo")(x))
    assert returns is None
    adv, returns = compute_advantages(f"{__name__}:_user_critic_estimator", x)
    close(adv, torch.ones(2, 3))
    close(returns, x.values)


# ------------------------------------------------------------------------------------------
# Advantage estimators


def test_advantage_inputs_validate_shapes():
    with pytest.raises(ValueError, match="rewards must be"):
        AdvantageInputs(rewards=t([1.0]), group_ids=torch.tensor([0, 0]), response_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="values must match"):
        AdvantageInputs(t([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(2, 3), values=torch.ones(2, 4))
    with pytest.raises(ValueError, match="integer"):
        AdvantageInputs(t([1.0, 0.0]), t([0.0, 0.0]), torch.ones(2, 3))
    with pytest.raises(ValueError, match="n >= 1"):
        AdvantageInputs(t([]), torch.tensor([], dtype=torch.long), torch.ones(0, 3))


def test_grpo_by_hand_uses_sample_std():
    # Group 7: rewards [1, 0, 0, 1], mean 0.5, deviations +-0.5,
    #   sample var = 4 * 0.25 / (4 - 1) = 1/3, std = 0.5773502691896258,
    #   A = +-0.5 / (0.57735... + 1e-6)  (~ +-0.866025; population std 0.5 would give +-1).
    # Group 3: rewards [2, 4], mean 3, deviations -+1, sample var = 2 / 1 = 2, std = sqrt(2),
    #   A = -+1 / (sqrt(2) + 1e-6)       (~ -+0.707107; population std 1 would give -+1).
    # Ids interleaved to check that rows are matched to their group, not to their position.
    a = ADVANTAGE_ESTIMATORS.get("grpo")(inputs([1, 2, 0, 0, 4, 1], [7, 3, 7, 7, 3, 7]))
    g7 = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    g3 = 1 / (math.sqrt(2) + 1e-6)
    expected = t([g7, -g3, -g7, -g7, g3, g7])
    close(a, expected[:, None].expand(6, 3))


def test_grpo_no_std_by_hand():
    # Same groups: r - group mean = [0.5, -1, -0.5, -0.5, 1, 0.5].
    a = ADVANTAGE_ESTIMATORS.get("grpo_no_std")(inputs([1, 2, 0, 0, 4, 1], [7, 3, 7, 7, 3, 7]))
    close(a[:, 0], [0.5, -1, -0.5, -0.5, 1, 0.5])


def test_rloo_by_hand():
    # Group 7 [1, 0, 0, 1]: A_0 = 1 - (0+0+1)/3 = 2/3, A_1 = 0 - (1+0+1)/3 = -2/3, ...
    # Group 3 [2, 4]: A = 2 - 4 = -2 and 4 - 2 = 2.
    # Group 5 [9] has no other response: A = 0.
    a = ADVANTAGE_ESTIMATORS.get("rloo")(inputs([1, 2, 0, 0, 4, 1, 9], [7, 3, 7, 7, 3, 7, 5]))
    close(a[:, 0], [2 / 3, -2, -2 / 3, -2 / 3, 2, 2 / 3, 0])


@pytest.mark.parametrize("name", ["grpo", "grpo_no_std"])
def test_group_edge_cases(name):
    # Singleton group 5 -> 0; constant group 1 ([3, 3]) -> 0, not nan (0 / (0 + eps)).
    a = ADVANTAGE_ESTIMATORS.get(name)(inputs([9, 3, 3, 1, 0], [5, 1, 1, 2, 2]))
    assert torch.equal(a[:3], torch.zeros(3, 3, dtype=D))
    assert (a[3] > 0).all() and (a[4] < 0).all()


@pytest.mark.parametrize("name", ["grpo", "grpo_no_std", "rloo"])
def test_all_singleton_groups_raise(name):
    with pytest.raises(ValueError, match="single response"):
        ADVANTAGE_ESTIMATORS.get(name)(inputs([1, 0, 1], [0, 1, 2]))


def test_outcome_estimators_fold_in_token_rewards():
    # Group of 2, rewards [1, 1]; row 0 has a KL penalty [-0.5, -0.5] on its two response
    # tokens (its padding holds inf, which must be ignored): returns [0, 1],
    # grpo_no_std A = [-0.5, 0.5], rloo A = [0 - 1, 1 - 0] = [-1, 1].
    mask = [[1, 1, 0], [1, 1, 1]]
    tr = t([[-0.5, -0.5, math.inf], [0.0, 0.0, 0.0]])
    x = inputs([1, 1], [0, 0], mask, token_rewards=tr)
    close(ADVANTAGE_ESTIMATORS.get("grpo_no_std")(x), [[-0.5, -0.5, 0], [0.5, 0.5, 0.5]])
    close(ADVANTAGE_ESTIMATORS.get("rloo")(x), [[-1, -1, 0], [1, 1, 1]])


def test_reinforce_pp_by_hand():
    # Row 0: 3 response tokens, reward 1, token_rewards [-0.1, -0.2, -0.3], gamma 0.5:
    #   r = [-0.1, -0.2, -0.3 + 1] = [-0.1, -0.2, 0.7]
    #   G_2 = 0.7, G_1 = -0.2 + 0.5 * 0.7 = 0.15, G_0 = -0.1 + 0.5 * 0.15 = -0.025
    # Row 1: 2 response tokens, reward 0, no token rewards: G = [0, 0]; its padding token
    #   carries a nan token reward that must not leak.
    # Whitening over the 5 valid tokens [-0.025, 0.15, 0.7, 0, 0] with their sample std.
    mask = [[1, 1, 1], [1, 1, 0]]
    tr = t([[-0.1, -0.2, -0.3], [0.0, 0.0, math.nan]])
    a = ADVANTAGE_ESTIMATORS.get("reinforce_pp")(inputs([1, 0], [0, 1], mask, token_rewards=tr, gamma=0.5))
    g = [-0.025, 0.15, 0.7, 0.0, 0.0]
    mu, sd = statistics.fmean(g), statistics.stdev(g)
    w = [(x - mu) / (sd + 1e-6) for x in g]
    close(a, [[w[0], w[1], w[2]], [w[3], w[4], 0.0]])


def test_token_rewards_place_reward_on_last_response_token():
    # Row 0: tokens at 0, 1 -> reward 2 at position 1. Row 1: a hole at 1 -> reward 3 at 2.
    # Row 2: no response token -> nothing placed. token_rewards (0.5 everywhere) only on
    # response tokens.
    mask = [[1, 1, 0], [1, 0, 1], [0, 0, 0]]
    x = inputs([2, 3, 4], [0, 0, 0], mask, token_rewards=torch.full((3, 3), 0.5, dtype=D))
    close(adv_mod._token_rewards(x), [[0.5, 2.5, 0], [0.5, 0, 3.5], [0, 0, 0]])


def test_discounted_returns_skip_masked_holes():
    # Mask [1, 0, 1], reward 1 on the last token, gamma 0.5: the hole is not a time step,
    # so G_2 = 1, G_0 = 0 + 0.5 * G_2 = 0.5, and the hole itself is 0.
    g = adv_mod._discounted_returns(t([[0.0, 5.0, 1.0]]), torch.tensor([[1, 0, 1]]), 0.5)
    close(g, [[0.5, 0.0, 1.0]])


def test_gae_by_hand():
    # One 3-token response, reward 1 at the last token, V = [0.5, 0.2, 0.1], gamma 0.9, lam 0.8
    # (gamma * lam = 0.72), V after the last token = 0:
    #   delta_2 = 1 + 0.9 * 0 - 0.1 = 0.9                    A_2 = 0.9
    #   delta_1 = 0 + 0.9 * 0.1 - 0.2 = -0.11                A_1 = -0.11 + 0.72 * 0.9 = 0.538
    #   delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32                A_0 = -0.32 + 0.72 * 0.538 = 0.06736
    #   returns = A + V = [0.56736, 0.738, 1.0]
    x = inputs([1], [0], values=t([[0.5, 0.2, 0.1]]), gamma=0.9, lam=0.8, whiten=False)
    a, r = gae_returns(x)
    close(a, [[0.06736, 0.538, 0.9]])
    close(r, [[0.56736, 0.738, 1.0]])
    assert ADVANTAGE_ESTIMATORS.get("gae") is gae_returns


def _gae_reference(rewards, token_rewards, values, lengths, gamma, lam):
    """Textbook GAE, one Python list per response (right padding, lengths given)."""
    advs, rets = [], []
    for i, n in enumerate(lengths):
        r = [token_rewards[i][k] + (rewards[i] if k == n - 1 else 0.0) for k in range(n)]
        v = values[i][:n] + [0.0]
        a = [0.0] * n
        last = 0.0
        for k in reversed(range(n)):
            last = r[k] + gamma * v[k + 1] - v[k] + gamma * lam * last
            a[k] = last
        advs.append(a)
        rets.append([a[k] + v[k] for k in range(n)])
    return advs, rets


@pytest.mark.parametrize("whiten", [False, True])
def test_gae_matches_python_loop_reference(whiten):
    g = torch.Generator().manual_seed(0)
    n, T, lengths = 4, 6, [6, 3, 1, 4]
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    rewards = torch.randn(n, generator=g, dtype=D)
    token_rewards = torch.randn(n, T, generator=g, dtype=D)
    values = torch.randn(n, T, generator=g, dtype=D)
    x = AdvantageInputs(
        rewards, torch.arange(n), mask, values=values.masked_fill(~mask, math.nan),
        token_rewards=token_rewards, gamma=0.95, lam=0.9, whiten=whiten,
    )
    a, r = gae_returns(x)
    ref_a, ref_r = _gae_reference(rewards.tolist(), token_rewards.tolist(), values.tolist(), lengths, 0.95, 0.9)
    if whiten:
        flat = [v for row in ref_a for v in row]
        mu, sd = statistics.fmean(flat), statistics.stdev(flat)
        ref_a = [[(v - mu) / (sd + 1e-6) for v in row] for row in ref_a]
    pad = lambda rows: t([row + [0.0] * (T - len(row)) for row in rows])  # noqa: E731
    close(a, pad(ref_a))
    close(r, pad(ref_r))


def test_gae_requires_values():
    with pytest.raises(ValueError, match="values"):
        ADVANTAGE_ESTIMATORS.get("gae")(inputs([1, 0], [0, 0]))


@pytest.mark.parametrize("name", ["grpo", "grpo_no_std", "rloo", "reinforce_pp", "gae"])
def test_estimators_are_zero_outside_mask(name):
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    garbage = torch.randn(4, 4, generator=g, dtype=D).masked_fill(~mask, math.inf)
    x = AdvantageInputs(t([1.0, 0.0, 0.5, 2.0]), torch.tensor([0, 0, 1, 1]),
                        mask, values=garbage, token_rewards=garbage)
    a, _ = compute_advantages(name, x)
    assert torch.equal(a[~mask], torch.zeros(int((~mask).sum()), dtype=D))
    assert torch.isfinite(a).all() and (a[mask] != 0).any()


# ------------------------------------------------------------------------------------------
# Aggregation and the per-example units contract


def test_aggregate_by_hand():
    # Valid per-token losses: row 0 [1, 2, 3] (3 tokens), row 1 [4, 5] (2 tokens, padding nan).
    #   token_mean          = (1+2+3+4+5) / 5     = 3
    #   seq_mean_token_mean = (6/3 + 9/2) / 2     = 3.25
    #   seq_mean_token_sum  = (6 + 9) / 2         = 7.5
    #   seq_mean_token_sum_norm, L_max 4 = (6 + 9) / (2 * 4) = 1.875 (other modes ignore max_len)
    per_token = t([[1, 2, 3], [4, 5, math.nan]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    for agg, expected in zip(AGG_MODES, (3.0, 3.25, 7.5, 1.875), strict=True):
        close(aggregate(per_token, mask, agg, max_len=4), expected)
    close(example_units(mask, "seq_mean_token_sum_norm", max_len=4), [4, 4])
    close(example_units(mask, "token_mean"), [3, 2])
    close(example_units(mask, "seq_mean_token_mean"), [1, 1])
    close(example_losses(per_token, mask, "seq_mean_token_mean"), [2, 4.5])


@pytest.mark.parametrize("agg", AGG_MODES)
def test_units_contract_on_subsets(agg):
    # aggregate over rows S == sum_{i in S} example_losses_i / sum_{i in S} units_i, and the
    # Regularizer's rescale of the S-part of the full loss, (sum_S c_i / N) * N / sum_S u_i,
    # gives the same number. max_len 7 (> the mask's width 5): L_max is a constant, not the width.
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    per_token = torch.randn(6, 5, generator=g, dtype=D)
    c, u = example_losses(per_token, mask, agg, max_len=7), example_units(mask, agg, max_len=7).to(D)
    N = u.sum()
    close(aggregate(per_token, mask, agg, max_len=7), c.sum() / N)
    for rows in ([0, 2], [1], [3, 4, 5], [0, 1, 2, 3, 4, 5]):
        S = torch.tensor(rows)
        expected = c[S].sum() / u[S].sum()
        close(aggregate(per_token[S], mask[S], agg, max_len=7), expected)
        close(c[S].sum() / N * (N / u[S].sum()), expected)
    if agg == "token_mean":
        close(u, lengths)
    elif agg == "seq_mean_token_sum_norm":
        # Dr. GRPO over S: the token sum over S / (|S| * L_max).
        close(u, torch.full((6,), 7.0))
        close(aggregate(per_token[:2], mask[:2], agg, max_len=7), per_token[0].sum() / 14 + per_token[1, 0] / 14)
    else:
        close(u, torch.ones(6))


def test_aggregate_rejects_unknown_mode_and_handles_empty_mask():
    valid = r"valid: \['token_mean', 'seq_mean_token_mean', 'seq_mean_token_sum', 'seq_mean_token_sum_norm'\]"
    with pytest.raises(ValueError, match=valid):
        aggregate(torch.ones(1, 2), torch.ones(1, 2), "mean")
    for agg in AGG_MODES:
        assert aggregate(torch.ones(2, 2, dtype=D), torch.zeros(2, 2), agg, max_len=2).item() == 0.0


def test_dr_grpo_aggregation_needs_max_len():
    # The mask cannot know L_max: every entry point refuses the mode without it, naming max_len.
    ones = torch.ones(2, 3, dtype=D)
    agg = "seq_mean_token_sum_norm"
    for call in (
        lambda: example_units(ones, agg),
        lambda: example_losses(ones, ones, agg),
        lambda: aggregate(ones, ones, agg, max_len=0),
        lambda: PolicyLossInputs(ones, ones, ones, ones, agg=agg),
        lambda: kl_loss(ones, ones, ones, agg=agg),
        lambda: value_loss(ones, ones, ones, ones, agg=agg),
    ):
        with pytest.raises(ValueError, match="pass max_len"):
            call()
    # A response longer than max_len means max_len is not the maximum response length.
    with pytest.raises(ValueError, match="more than max_len=2 tokens"):
        aggregate(ones, ones, agg, max_len=2)


# ------------------------------------------------------------------------------------------
# Policy and value losses


def _ppo_case(clip_eps_high=None, agg="token_mean", max_len=None):
    # Ratios r = exp(logp - old) with old = 0, clip 0.2 -> [0.8, 1.2]; last column is padding
    # with a huge ratio that must not count.
    ratios = [[1.1, 1.5, 0.5, 50.0], [1.5, 0.5, 0.9, 50.0]]
    advs = [[1.0, 1.0, 1.0, 9.0], [-1.0, -1.0, -2.0, 9.0]]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    logp = t(ratios).log().requires_grad_()
    x = PolicyLossInputs(logp, torch.zeros(2, 4, dtype=D), t(advs), mask, clip_eps_high=clip_eps_high, agg=agg,
                         max_len=max_len)
    return logp, x


def test_ppo_clip_by_hand():
    # per token max(-A r, -A clip(r)):
    #   r=1.1, A=+1: max(-1.1, -1.1) = -1.1   inside the range
    #   r=1.5, A=+1: max(-1.5, -1.2) = -1.2   clipped (active)
    #   r=0.5, A=+1: max(-0.5, -0.8) = -0.5   unclipped is pessimistic
    #   r=1.5, A=-1: max( 1.5,  1.2) =  1.5   unclipped is pessimistic
    #   r=0.5, A=-1: max( 0.5,  0.8) =  0.8   clipped (active)
    #   r=0.9, A=-2: max( 1.8,  1.8) =  1.8   inside the range
    # token_mean = (-1.1 - 1.2 - 0.5 + 1.5 + 0.8 + 1.8) / 6 = 1.3 / 6; clip_frac = 2 / 6.
    logp, x = _ppo_case()
    out = POLICY_LOSSES.get("ppo_clip")(x)
    close(out.loss, 1.3 / 6)
    assert out.clip_frac == pytest.approx(2 / 6, abs=1e-12)
    # approx_kl = mean over valid tokens of k3(old, current) = r - log r - 1 (old = 0).
    rs = [1.1, 1.5, 0.5, 1.5, 0.5, 0.9]
    assert out.approx_kl == pytest.approx(statistics.fmean(r - math.log(r) - 1 for r in rs), abs=1e-12)
    # Clipped tokens get no gradient; the others d/dlogp (-A r)/6 = -A r / 6.
    out.loss.backward()
    close(logp.grad, [[-1.1 / 6, 0, -0.5 / 6, 0], [1.5 / 6, 0, 1.8 / 6, 0]])


def test_ppo_clip_higher_and_aggregation():
    # clip_eps_high 0.28: r=1.5, A=+1 -> max(-1.5, -1.28) = -1.28; r=0.5, A=-1 still 0.8.
    #   token_mean = (-1.1 - 1.28 - 0.5 + 1.5 + 0.8 + 1.8) / 6 = 1.22 / 6
    #   seq_mean_token_mean = ((-1.1 - 1.28 - 0.5)/3 + (1.5 + 0.8 + 1.8)/3) / 2 = 1.22 / 6 too
    #   (equal lengths), seq_mean_token_sum = (-2.88 + 4.1) / 2 = 0.61,
    #   seq_mean_token_sum_norm with L_max 5 = 1.22 / (2 * 5) = 0.122.
    cases = (("token_mean", 1.22 / 6), ("seq_mean_token_mean", 1.22 / 6), ("seq_mean_token_sum", 0.61),
             ("seq_mean_token_sum_norm", 0.122))
    for agg, expected in cases:
        _, x = _ppo_case(clip_eps_high=0.28, agg=agg, max_len=5)
        out = POLICY_LOSSES.get("ppo_clip")(x)
        close(out.loss, expected)
        assert out.clip_frac == pytest.approx(2 / 6, abs=1e-12)


def test_ppo_clip_on_policy_reduces_to_reinforce():
    # old == current: r = 1 everywhere. A = [[1, 2], [-0.5, pad]] over 3 valid tokens:
    #   loss = -(1 + 2 - 0.5) / 3 = -2.5 / 3, gradient = that of reinforce (-A logp) = -A / 3.
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = t([[1.0, 2.0], [-0.5, 7.0]])
    grads = {}
    for name in ("ppo_clip", "reinforce"):
        logp = (-torch.rand(2, 2, generator=g, dtype=D)).requires_grad_()
        out = POLICY_LOSSES.get(name)(PolicyLossInputs(logp, logp.detach(), adv, mask))
        out.loss.backward()
        grads[name] = logp.grad
        assert out.clip_frac == 0.0 and out.approx_kl == 0.0
        if name == "ppo_clip":
            close(out.loss, -2.5 / 3)
    close(grads["ppo_clip"], [[-1 / 3, -2 / 3], [0.5 / 3, 0]])
    close(grads["reinforce"], grads["ppo_clip"])


def test_reinforce_by_hand():
    # -A logp over the 2 valid tokens, A = [2, -1], logp = [log 0.5, log 0.5], padding ignored:
    #   (-2 log 0.5 + log 0.5) / 2 = -log(0.5) / 2 = log(2) / 2
    logp = t([[math.log(0.5), math.log(0.5), -math.inf]])
    out = POLICY_LOSSES.get("reinforce")(PolicyLossInputs(logp, logp, t([[2.0, -1.0, 5.0]]), torch.tensor([[1, 1, 0]])))
    close(out.loss, math.log(2) / 2)
    assert out.clip_frac == 0.0


def test_policy_loss_inputs_validate():
    with pytest.raises(ValueError, match="advantages must match"):
        PolicyLossInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        PolicyLossInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), agg="sum")


def test_value_loss_by_hand():
    # clip 0.2, per token 0.5 * max((V-R)^2, (V_clip-R)^2), V_clip = old + clamp(V-old, +-0.2):
    #   V=1.0, old=0.5, R=2: V_clip=0.7, max(1.00, 1.69) = 1.69   clipped
    #   V=1.6, old=1.5, R=1: V_clip=1.6, max(0.36, 0.36) = 0.36
    #   V=0.0, old=0.3, R=1: V_clip=0.1, max(1.00, 0.81) = 1.00
    # loss = 0.5 * (1.69 + 0.36 + 1.00) / 3 = 0.5083333...; clip_frac = 1/3.
    # Unclipped: 0.5 * (1 + 0.36 + 1) / 3 = 0.3933333...
    values, old, ret = t([[1.0, 1.6, 0.0, 9.0]]), t([[0.5, 1.5, 0.3, 0.0]]), t([[2.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = value_loss(values, old, ret, mask, clip=0.2)
    close(out.loss, 0.5 * 3.05 / 3)
    assert out.clip_frac == pytest.approx(1 / 3, abs=1e-12)
    close(value_loss(values, old, ret, mask, clip=None).loss, 0.5 * 2.36 / 3)
    # Dr. GRPO aggregation with L_max 4: 0.5 * 3.05 / 4.
    close(value_loss(values, old, ret, mask, clip=0.2, agg="seq_mean_token_sum_norm", max_len=4).loss, 0.5 * 3.05 / 4)


# ------------------------------------------------------------------------------------------
# KL


def test_kl_estimators_by_hand():
    # logp = log 0.5, ref = log 0.25 (d = ref - logp = -log 2):
    #   k1 = log 2 = 0.693147..., k2 = 0.5 (log 2)^2 = 0.240226..., k3 = 0.5 + log 2 - 1 = 0.193147...
    # swapped (d = +log 2): k1 = -log 2 (negative), k2 same, k3 = 2 - log 2 - 1 = 0.306852...
    logp, ref = t([math.log(0.5), math.log(0.25)]), t([math.log(0.25), math.log(0.5)])
    l2 = math.log(2)
    close(KL_ESTIMATORS.get("k1")(logp, ref), [l2, -l2])
    close(KL_ESTIMATORS.get("k2")(logp, ref), [0.5 * l2**2, 0.5 * l2**2])
    close(KL_ESTIMATORS.get("k3")(logp, ref), [0.5 + l2 - 1, 2 - l2 - 1])


def test_k3_nonnegative_and_clamped():
    g = torch.Generator().manual_seed(4)
    logp, ref = torch.randn(1000, generator=g, dtype=D) * 3, torch.randn(1000, generator=g, dtype=D) * 3
    assert (KL_ESTIMATORS.get("k3")(logp, ref) >= 0).all()
    assert (KL_ESTIMATORS.get("k1")(logp, ref) < 0).any()
    # d = 100 would overflow exp in float32; clamped to d = 20, then the value to 10.
    # d = -30 -> d = -20: exp(-20) + 20 - 1 = 19.000000002 -> 10.
    logp = torch.tensor([-100.0, 0.0], requires_grad=True)
    out = KL_ESTIMATORS.get("k3")(logp, torch.tensor([0.0, -30.0]))
    assert out.tolist() == [10.0, 10.0]
    # Without the d clamp, exp(100) = inf in float32 and the backward would give 0 * inf = nan.
    out.sum().backward()
    assert logp.grad.tolist() == [0.0, 0.0]


def test_kl_penalty_tokens_and_kl_loss():
    logp = t([[math.log(0.5), math.log(0.5), 0.0]]).requires_grad_()
    ref = t([[math.log(0.25), math.log(0.5), math.log(0.1)]])
    mask = torch.tensor([[1, 1, 0]])
    # KL in reward: -coef * k1 = -0.1 * [log 2, 0, log 10], detached.
    pen = kl_penalty_tokens(logp, ref, "k1", 0.1)
    close(pen, [[-0.1 * math.log(2), 0.0, -0.1 * math.log(10)]])
    assert not pen.requires_grad
    # KL as loss, k3 token mean over the 2 valid tokens: (0.5 + log 2 - 1 + 0) / 2; ref detached.
    loss = kl_loss(logp, ref, mask, "k3", "token_mean")
    close(loss, (math.log(2) - 0.5) / 2)
    close(kl_loss(logp, ref, mask, "k3", "seq_mean_token_sum_norm", max_len=5), (math.log(2) - 0.5) / 5)
    # d k3 / d logp = 1 - exp(ref - logp): token 0 -> (1 - 0.5) / 2, token 1 -> 0, padding 0.
    loss.backward()
    close(logp.grad, [[0.25, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"valid: \['k1', 'k2', 'k3'\]"):
        kl_penalty_tokens(logp, ref, "k4", 0.1)
