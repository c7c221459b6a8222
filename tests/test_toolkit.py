"""Oracles for drpt_ray.algorithms.stability: closed forms worked out in the comments, torch's own
Categorical entropy, and brute-force enumeration for pass@k. float64, tight tolerances.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from drpt_ray.algorithms import (
    DivergenceGuard,
    correction_metrics,
    correction_weights,
    has_reward_variance,
    log_ratios,
    mismatch_kl,
    pass_at_k,
    token_entropy,
)

D = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=D)


def close(actual, expected, atol: float = 1e-12) -> None:
    expected = torch.as_tensor(expected, dtype=D)
    torch.testing.assert_close(torch.as_tensor(actual).to(D), expected, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------
# token_entropy


def test_entropy_closed_forms():
    # Uniform over V: log V, whatever the common logit. Shape (2, 3, V) -> (2, 3).
    V = 7
    uniform = torch.full((2, 3, V), 123.0, dtype=D)
    close(token_entropy(uniform), torch.full((2, 3), math.log(V), dtype=D))
    # One logit 100 above the rest: p_rest = e^-100 each, entropy ~ 100 (V-1) e^-100 ~ 0.
    peaked = torch.zeros(V, dtype=D)
    peaked[2] = 100.0
    close(token_entropy(peaked), 0.0)
    # Two equal logits and the rest -inf (masked by a sampler): exactly log 2, finite gradient.
    logits = t([1.0, 1.0, -math.inf, -math.inf]).requires_grad_()
    h = token_entropy(logits)
    close(h, math.log(2))
    h.backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_matches_categorical_and_is_stable():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 11, generator=g, dtype=D) * 3
    close(token_entropy(logits), torch.distributions.Categorical(logits=logits).entropy())
    # Logits of 1e4 would overflow a naive softmax (exp(1e4) = inf); log_softmax shifts them.
    close(token_entropy(logits + 1e4), torch.distributions.Categorical(logits=logits).entropy(), atol=1e-9)


# ------------------------------------------------------------------------------------------
# truncated importance sampling and the rollout/learner mismatch


def test_token_truncation_by_hand():
    # ratios exp(learner - rollout): [2, 0.5, 4] on row 0, padding (huge ratio) on row 1 col 2.
    rollout = t([[math.log(0.25), math.log(0.5), math.log(0.1)], [math.log(0.5), 0.0, -50.0]])
    learner = t([[math.log(0.5), math.log(0.25), math.log(0.4)], [math.log(0.5), 0.0, 0.0]]).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    lr = log_ratios(learner, rollout, mask, "token")
    close(correction_weights(lr, mask, "truncate", upper=None), [[2.0, 0.5, 4.0], [1.0, 1.0, 0.0]])
    # cap 3: min(r, 3) -> the 4 becomes 3, ratios below the cap are untouched (TIS).
    w = correction_weights(lr, mask, "truncate", upper=3.0)
    close(w, [[2.0, 0.5, 3.0], [1.0, 1.0, 0.0]])
    assert not w.requires_grad
    with pytest.raises(ValueError, match="upper must be > 0"):
        correction_weights(lr, mask, "truncate", upper=0.0)
    with pytest.raises(ValueError, match="same shape"):
        log_ratios(learner, rollout[:, :2], mask, "token")
    with pytest.raises(ValueError, match="level must be"):
        log_ratios(learner, rollout, mask, "tokens")


def test_sequence_geometric_and_masked_corrections_by_hand():
    """Row 0's token ratios are 2, 0.5, 4 (product 4, geometric mean 4^(1/3)); row 1's are 1, 1 and a
    padded position; row 2's 8, 8 (product 64, geometric mean 8)."""
    rollout = t([[math.log(0.25), math.log(0.5), math.log(0.1)], [math.log(0.5), 0.0, -50.0],
                 [math.log(0.1), math.log(0.1), 0.0]])
    learner = t([[math.log(0.5), math.log(0.25), math.log(0.4)], [math.log(0.5), 0.0, 0.0],
                 [math.log(0.8), math.log(0.8), 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]])
    seq = log_ratios(learner, rollout, mask, "sequence")
    close(seq.exp() * mask, [[4.0, 4.0, 4.0], [1.0, 1.0, 0.0], [64.0, 64.0, 0.0]])
    geo = log_ratios(learner, rollout, mask, "geometric")
    g0 = 4.0 ** (1 / 3)
    close(geo.exp() * mask, [[g0, g0, g0], [1.0, 1.0, 0.0], [8.0, 8.0, 0.0]])
    # sequence-level truncation at 5: row 0 keeps 4, row 2's 64 is cut to 5, on every token of the row
    close(correction_weights(seq, mask, "truncate", upper=5.0), [[4.0] * 3, [1.0, 1.0, 0.0], [5.0, 5.0, 0.0]])
    # one-sided sequence mask at 5 (TRL's sequence mask): row 2 dropped, the others keep their ratio
    close(correction_weights(seq, mask, "mask", upper=5.0), [[4.0] * 3, [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # two-sided token mask [0.6, 3] (IcePop): of row 0 only the 2 survives; row 2's 8s go
    tok = log_ratios(learner, rollout, mask, "token")
    close(correction_weights(tok, mask, "mask", upper=3.0, lower=0.6),
          [[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="lower < upper"):
        correction_weights(tok, mask, "mask", upper=3.0, lower=3.0)
    with pytest.raises(ValueError, match="mode must be"):
        correction_weights(tok, mask, "clip", upper=3.0)
    # the metrics over the 7 response tokens: ratios 2, .5, 4, 1, 1, 8, 8
    w = correction_weights(tok, mask, "mask", upper=3.0, lower=0.6)
    m = correction_metrics(tok, w, mask, "mask", upper=3.0)
    ratios = torch.tensor([2.0, 0.5, 4.0, 1.0, 1.0, 8.0, 8.0], dtype=torch.float64)
    assert m["is_masked_frac"] == pytest.approx(4 / 7)
    assert m["is_weight_mean"] == pytest.approx(4 / 7)  # (2 + 1 + 1) / 7
    assert m["is_ratio_p50"] == pytest.approx(2.0)
    assert m["is_ratio_p95"] == pytest.approx(float(torch.quantile(ratios, 0.95)))
    m = correction_metrics(tok, correction_weights(tok, mask, "truncate", upper=3.0), mask, "truncate", upper=3.0)
    assert m["is_capped_frac"] == pytest.approx(3 / 7) and "is_masked_frac" not in m


def test_rollout_correction_spec_rules():
    from drpt_ray.config import AlgorithmSpec

    default = AlgorithmSpec(rollout_correction={}).rollout_correction
    assert (default.level, default.mode, default.upper, default.lower) == ("token", "truncate", 2.0, None)
    for bad, needle in [({"mode": "mask", "upper": None}, "needs an upper bound"),
                        ({"lower": 0.5}, "needs mode 'mask'"),
                        ({"mode": "mask", "upper": 2.0, "lower": 2.0}, "lower < upper"),
                        ({"level": "word"}, "level")]:
        with pytest.raises(ValueError, match=needle):
            AlgorithmSpec(rollout_correction=bad)


def test_mismatch_kl_by_hand():
    # Equal log-probs: r = 1 everywhere, k3 = 0.
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(3, 4, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    assert mismatch_kl(logp, logp, mask) == 0.0
    # r = learner / rollout = 2 and 0.5: k3 = r - 1 - log r = (1 - log 2) and (-0.5 + log 2);
    # token mean = 0.5 / 2 = 0.25. The padding token (r = e^10) must not count.
    learner = t([[math.log(0.5), math.log(0.25), 0.0]])
    rollout = t([[math.log(0.25), math.log(0.5), -10.0]])
    assert mismatch_kl(learner, rollout, torch.tensor([[1, 1, 0]])) == pytest.approx(0.25, abs=1e-12)


# ------------------------------------------------------------------------------------------
# dynamic sampling: groups without reward variance


def test_reward_variance_by_hand():
    assert has_reward_variance([0.0, 1.0, 1.0])
    assert not has_reward_variance([1.0, 1.0, 1.0])
    assert not has_reward_variance([0.5, 0.5 + 1e-9])  # equal within the tolerance
    assert has_reward_variance([0.5, 0.5 + 1e-9], tol=0.0)
    assert not has_reward_variance([0.2])  # one response: nothing to compare


# ------------------------------------------------------------------------------------------
# pass@k


def _pass_at_k_brute(n: int, c: int, k: int) -> float:
    # Fraction of the k-subsets of n samples (the first c correct) that hold a correct one.
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_closed_forms():
    # k = n: the one subset is everything, so pass@n = 1 iff any sample is correct.
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    # k = 1: c / n.
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-15)
    # 1 - C(8, 3) / C(10, 3) = 1 - 56 / 120.
    assert pass_at_k(10, 2, 3) == pytest.approx(1 - 56 / 120, abs=1e-15)
    for bad in ((3, 1, 4), (3, 4, 1), (3, -1, 1), (3, 1, 0)):
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(*bad)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_finite():
    # C(1000, 500) overflows a float; the product form does not. k=1 must still be c / n.
    assert pass_at_k(1000, 300, 1) == pytest.approx(0.3, abs=1e-12)
    # One correct sample among 1000: a 500-subset holds it with probability 500 / 1000, exactly.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    # Two correct: 1 - C(998, 500) / C(1000, 500) = 1 - (500 * 499) / (1000 * 999).
    assert pass_at_k(1000, 2, 500) == pytest.approx(1 - 500 * 499 / (1000 * 999), abs=1e-12)


# ------------------------------------------------------------------------------------------
# DivergenceGuard


def test_guard_fires_on_collapse_and_resets():
    guard = DivergenceGuard(zero_variance_steps=3)
    assert [guard.update(0.0, None) for _ in range(2)] == [None, None]
    alert = guard.update(1e-9, None)
    assert alert is not None and "3 consecutive steps" in alert and "zero_variance_steps=3" in alert
    # Still collapsed: quiet until the streak reaches 2K, then alerts again.
    assert [guard.update(0.0, None) for _ in range(2)] == [None, None]
    assert "6 consecutive" in guard.update(0.0, None)
    # One step with reward variance resets the streak: two more zero steps are not enough.
    assert guard.update(0.3, None) is None
    assert [guard.update(0.0, None) for _ in range(2)] == [None, None]


def test_guard_quiet_on_healthy_run_and_when_disabled():
    guard = DivergenceGuard(zero_variance_steps=2, entropy_floor=0.1)
    # Alternating variance never makes 2 zero steps in a row; entropy stays above the floor.
    assert all(guard.update(std, 0.5) is None for std in [0.0, 0.4] * 10)
    off = DivergenceGuard()  # K = 0 and no floor: never fires
    assert all(off.update(0.0, 0.0) is None for _ in range(10))
    with pytest.raises(ValueError, match="zero_variance_steps must be >= 0"):
        DivergenceGuard(zero_variance_steps=-1)


def test_guard_entropy_floor():
    guard = DivergenceGuard(entropy_floor=0.2)
    assert guard.update(0.5, 0.25) is None
    assert guard.update(0.5, None) is None  # entropy not measured this step
    alert = guard.update(0.5, 0.05)
    assert alert is not None and "entropy 0.05 < entropy_floor 0.2" in alert
    assert guard.update(0.5, 0.04) is None  # still under the floor: said already
    assert guard.update(0.5, 0.3) is None and guard.update(0.5, 0.1) is not None  # crossed again
    # Both checks trip: one message names both.
    both = DivergenceGuard(zero_variance_steps=1, entropy_floor=0.2)
    msg = both.update(0.0, 0.05)
    assert "1 consecutive steps" in msg and "entropy_floor" in msg


def test_guard_state_round_trip():
    guard = DivergenceGuard(zero_variance_steps=3)
    guard.update(0.0, None)
    guard.update(0.0, None)
    resumed = DivergenceGuard(zero_variance_steps=3)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.state_dict() == {"streak": 2, "low_entropy": 0, "high_entropy": 0, "was_below_ceiling": 0}
    # The resumed guard fires on the same step, with the same message, as the original.
    assert resumed.update(0.0, None) == guard.update(0.0, None) is not None
    assert guard.alarmed and not DivergenceGuard(zero_variance_steps=3).alarmed


def test_guard_entropy_ceiling_on_the_rlhf_bench_collapse():
    """The entropy trajectory of the RLHF bench's collapsed layer-wise run (seed 1; continuous
    reward-model rewards, so the batch never lost its variance) against the default ceiling
    0.8 ln 512: the alert fires once, at step 27, and the healthy steps before are quiet."""
    from drpt_ray.config import DivergenceSpec
    from drpt_ray.job import divergence_guard

    guard = divergence_guard(DivergenceSpec(), vocab_size=512)
    assert guard.entropy_ceiling == pytest.approx(0.8 * math.log(512))
    entropies = {3: 1.484, 6: 1.602, 9: 1.626, 12: 1.316, 15: 1.204, 18: 1.344, 21: 1.301, 24: 1.706,
                 27: 5.556, 30: 6.157, 33: 6.152}
    alerts = {step: guard.update(0.3, h) for step, h in entropies.items()}
    assert [step for step, a in alerts.items() if a] == [27]
    assert "entropy 5.556 > entropy_ceiling 4.99" in alerts[27] and guard.alarmed
    resumed = divergence_guard(DivergenceSpec(), vocab_size=512)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.alarmed and resumed.update(0.3, 6.1) is None  # said already
    assert divergence_guard(DivergenceSpec(entropy_ceiling_frac=None), 512).update(0.3, 6.2) is None
    # a policy that starts near uniform (a random model) has not collapsed: only a rise counts
    fresh = divergence_guard(DivergenceSpec(), vocab_size=512)
    assert [fresh.update(0.3, h) for h in (6.2, 6.0, 5.1)] == [None] * 3 and not fresh.alarmed
    assert fresh.update(0.3, 2.0) is None and fresh.update(0.3, 5.5) is not None


def test_progress_bar_names_tell_the_general_and_target_rewards_apart():
    from drpt_ray.metrics import progress_postfix

    shown = progress_postfix({"reward/reward_mean": 0.25, "target/reward_mean": 0.5, "loss": 1.0, "lr": 3e-4,
                              "eval/target_reward": 0.125})
    assert shown == {"reward": "0.250", "target_reward": "0.500", "loss": "1.000", "eval_reward": "0.125"}


def test_the_former_tis_cap_key_names_its_replacement():
    from drpt_ray.config import AlgorithmSpec

    with pytest.raises(ValueError, match=r"algorithm.tis_cap is now algorithm.rollout_correction: \{upper: 2.0\}"):
        AlgorithmSpec.model_validate({"tis_cap": 2.0})
