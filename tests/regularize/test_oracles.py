"""method.md section 6 invariants 1-11 and 13, against brute-force per-example autograd in float64.

Each test compares the Regularizer's scores, selections and `.grad`s with references built in
`oracle.py` from one backward per example. `test_mutations.py` checks that these comparisons
fail when the code is wrong.
"""

from __future__ import annotations

import pytest
import torch

from drpt_ray.algorithms import AGG_MODES, POLICY_LOSSES, PolicyLossInputs, example_units
from drpt_ray.config import RegularizerSpec
from drpt_ray.lm_losses import concat_rows, select_rows, token_logprobs, token_mean_loss
from drpt_ray.regularize import Regularizer
from drpt_ray.regularize.hooks import BlockKind
from tests.regularize import oracle as O

# HF's RMSNorm computes in float32 even for a float64 model (method.md 9.5): looser there.
TOL = {"mlp": 1e-10, "llama": 2e-6, "qwen2": 2e-6}


class Case:
    """A model, a general batch, a target batch and their brute-force references."""

    def __init__(self, kind: str, n: int = 6, seed: int = 0):
        self.kind = kind
        self.model = O.TinyMLP(seed) if kind == "mlp" else O.tiny_llama(seed, arch=kind)
        self.batch = O.make_batch(n, seed=seed + 1)
        self.target = O.make_batch(2, seed=seed + 2)
        self.units = O.units_of(self.batch)
        self.N = float(self.units.sum())
        self.G = O.per_example_grads(self.model, self.batch, self.N)
        self.gT = O.target_grad(self.model, self.target)
        self.plain = O.grads(self.model, token_mean_loss(self.model, self.batch))
        self.tol = TOL[kind]

    def run(self, hook_embeddings=False, exclude=(), loss_scale=1.0, reduce_grads=None, **spec_kw):
        spec = RegularizerSpec(hook_embeddings=hook_embeddings, exclude=list(exclude), **spec_kw)
        reg = Regularizer(self.model, spec)
        self.model.zero_grad(set_to_none=True)
        reg.capture_target(token_mean_loss(self.model, self.target))
        stats = reg.backward(lambda rows: token_mean_loss(self.model, self.batch, rows), self.units,
                             loss_scale=loss_scale, reduce_grads=reduce_grads)
        out = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.model.zero_grad(set_to_none=True)
        reg.remove()
        return reg, stats, out

    def keys(self, reg) -> dict[str, list[str]]:
        return {b.name: O.block_params(b.name, self.model) for b in reg.blocks}

    def assert_close(self, got: dict, want: dict, names):
        for k in names:
            assert O.rel_err(got[k], want[k]) < self.tol, f"{k}: rel err {O.rel_err(got[k], want[k]):.2e}"


@pytest.fixture(scope="module", params=["mlp", "llama", "qwen2"])
def case(request):
    return Case(request.param)


@pytest.fixture(scope="module")
def mlp():
    return Case("mlp")


# 4. Kernel agreement -----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["ghost", "direct"])
def test_kernels_equal_brute_force_scores(case, kernel):
    reg, stats, _ = case.run(feasible_set="layerwise_subset", kernel=kernel, hook_embeddings=True)
    keys = case.keys(reg)
    assert any(b.bias is not None for b in reg.blocks) == (case.kind != "llama")
    assert any(b.kind is BlockKind.EMBEDDING for b in reg.blocks)
    for name, ks in keys.items():
        want = O.layer_scores(case.G, case.gT, ks)
        got = stats.scores[name]
        assert O.rel_err(got, want) < case.tol, f"{name} ({kernel}): {got} vs {want}"


# 2. Additivity -------------------------------------------------------------------------------------


def test_global_score_is_sum_of_layer_scores(case):
    reg, stats, _ = case.run(feasible_set="global_subset", hook_embeddings=True)
    summed = sum(stats.scores.values())
    assert O.rel_err(stats.global_scores, summed) < 1e-12
    all_keys = [k for ks in case.keys(reg).values() for k in ks]
    assert O.rel_err(stats.global_scores, O.layer_scores(case.G, case.gT, all_keys)) < case.tol


# 1. Degenerate knob = baseline ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(feasible_set="layerwise_subset", selection="topk", frac=1.0),
        dict(feasible_set="layerwise_subset", selection="filter", frac=0.0),
        dict(feasible_set="global_subset", selection="topk", frac=1.0),
        dict(feasible_set="global_subset", selection="filter", frac=0.0, passes="two_pass"),
        dict(feasible_set="full"),
    ],
)
def test_degenerate_knob_is_full_training(case, kw):
    _, _, got = case.run(hook_embeddings=True, **kw)
    case.assert_close(got, case.plain, case.plain.keys())


# 9. Normalisation, and the selection rules against brute force --------------------------------------


@pytest.mark.parametrize("selection,frac", [("topk", 0.5), ("topk", 0.34), ("filter", 1.0), ("filter", 0.5)])
def test_layerwise_equals_brute_force(case, selection, frac):
    reg, stats, got = case.run(feasible_set="layerwise_subset", selection=selection, frac=frac, hook_embeddings=True)
    rule = O.topk_set if selection == "topk" else O.filter_set
    for name, ks in case.keys(reg).items():
        s = O.layer_scores(case.G, case.gT, ks)
        S = rule(s, frac)
        assert stats.kept[name] == pytest.approx(len(S) / len(s))
        want = O.curated(case.G, S, case.units, case.N, ks)
        case.assert_close(got, want, ks)
    # unhooked parameters (norm weights) keep the ordinary full-batch gradient
    hooked = {k for ks in case.keys(reg).values() for k in ks}
    case.assert_close(got, case.plain, [k for k in case.plain if k not in hooked])


@pytest.mark.parametrize("selection,frac", [("topk", 0.5), ("filter", 1.0)])
def test_global_equals_brute_force(case, selection, frac):
    reg, stats, got = case.run(feasible_set="global_subset", selection=selection, frac=frac)
    keys = case.keys(reg)
    all_keys = [k for ks in keys.values() for k in ks]
    S = (O.topk_set if selection == "topk" else O.filter_set)(O.layer_scores(case.G, case.gT, all_keys), frac)
    case.assert_close(got, O.curated(case.G, S, case.units, case.N, all_keys), all_keys)


def test_curated_gradient_is_token_mean_gradient_of_subset(case):
    """d(S) = gradient of the token-mean loss computed on S alone (scale T_B / T_S)."""
    reg, stats, got = case.run(feasible_set="global_subset", selection="topk", frac=0.5)
    S = torch.nonzero(stats.weights[reg.blocks[0].name]).flatten()
    want = O.grads(case.model, token_mean_loss(case.model, case.batch, S))
    case.assert_close(got, want, [k for ks in case.keys(reg).values() for k in ks])


@pytest.mark.parametrize("agg", AGG_MODES)
def test_curated_gradient_is_policy_loss_gradient_of_subset(case, agg):
    """Every loss aggregation, with units from example_units: d(S) = the gradient of the RL loss
    aggregated over S alone (for Dr. GRPO's seq_mean_token_sum_norm: S's token sum / (|S| L_max))."""
    model, batch = case.model, case.batch
    mask = batch["labels"][:, 1:] != -100
    max_len = mask.shape[1] + 3  # L_max is a configured constant, not the padded width
    adv = torch.linspace(-1.0, 1.0, mask.shape[0], dtype=torch.float64)[:, None].expand(mask.shape)

    def policy_loss(rows=None):
        sub = select_rows(batch, rows)
        logp = token_logprobs(model, sub["input_ids"], sub["attention_mask"])
        m, a = (mask, adv) if rows is None else (mask[rows], adv[rows])
        inputs = PolicyLossInputs(logp, logp.detach(), a, m, agg=agg, max_len=max_len)
        return POLICY_LOSSES.get("reinforce")(inputs).loss

    reg = Regularizer(model, RegularizerSpec(feasible_set="global_subset", selection="topk", frac=0.5))
    model.zero_grad(set_to_none=True)
    reg.capture_target(token_mean_loss(model, case.target))
    stats = reg.backward(policy_loss, example_units(mask, agg, max_len=max_len))
    got = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    reg.remove()
    S = torch.nonzero(stats.weights[reg.blocks[0].name]).flatten()
    assert 0 < S.numel() < mask.shape[0]
    case.assert_close(got, O.grads(model, policy_loss(S)), [k for ks in case.keys(reg).values() for k in ks])


def test_empty_selection_gives_zero_gradient(mlp):
    """A target gradient that opposes every example: filtering keeps nothing, grads are exactly 0."""
    model = mlp.model
    spec = RegularizerSpec(feasible_set="layerwise_subset", selection="filter", frac=1.0)
    for passes, fs in [("one_pass", "layerwise_subset"), ("one_pass", "global_subset"), ("two_pass", "global_subset")]:
        reg = Regularizer(model, spec.model_copy(update=dict(feasible_set=fs, passes=passes)))
        model.zero_grad(set_to_none=True)
        # -loss of the general batch itself as the target: every score is -|G_i|^2-ish < 0 in sum
        reg.capture_target(-token_mean_loss(model, mlp.batch))
        stats = reg.backward(lambda rows: token_mean_loss(model, mlp.batch, rows), mlp.units)
        for b in reg.blocks:
            assert b.weight.grad is not None and torch.count_nonzero(b.weight.grad) == 0, (fs, passes, b.name)
        if fs == "global_subset":
            assert stats.empty
        reg.remove()
    model.zero_grad(set_to_none=True)


# 3. Single-layer collapse -----------------------------------------------------------------------------


def test_single_hooked_layer_layerwise_equals_global(case):
    names = [n for n, m in case.model.named_modules() if type(m) is torch.nn.Linear]
    only = names[len(names) // 2]
    exclude = [n for n in names if n != only]
    _, _, lw = case.run(feasible_set="layerwise_subset", frac=0.5, exclude=exclude)
    _, _, gl = case.run(feasible_set="global_subset", frac=0.5, exclude=exclude)
    case.tol = max(case.tol, 1e-12)
    case.assert_close(lw, gl, O.block_params(only, case.model))


# 11. One-pass = two-pass ----------------------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["topk", "filter"])
def test_one_pass_equals_two_pass_on_hooked_layers(case, selection):
    reg, _, one = case.run(feasible_set="global_subset", selection=selection, passes="one_pass")
    _, _, two = case.run(feasible_set="global_subset", selection=selection, passes="two_pass")
    case.assert_close(one, two, [k for ks in case.keys(reg).values() for k in ks])


# 10. Merged vs separate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fs", ["layerwise_subset", "global_subset", "full"])
def test_merged_equals_separate(case, fs):
    model = case.model
    merged = concat_rows(case.batch, case.target)
    units_all = O.units_of(merged)
    reg_sep, stats_sep, sep = case.run(feasible_set=fs, frac=0.5)
    reg = Regularizer(model, RegularizerSpec(feasible_set=fs, frac=0.5, target_mode="merged"))
    model.zero_grad(set_to_none=True)
    stats = reg.backward(lambda rows: token_mean_loss(model, merged, rows), units_all, n_target_rows=2)
    got = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    reg.remove()
    for name in stats_sep.scores:
        assert O.rel_err(stats.scores[name], stats_sep.scores[name]) < case.tol
    # every parameter, hooked or not, matches: unhooked norms get train-rows-only gradients
    case.assert_close(got, sep, sep.keys())
    if fs == "full":  # invariant 1 in merged mode: the train-rows-only token-mean gradient
        case.assert_close(got, case.plain, case.plain.keys())


# 13. Upstream flow untouched --------------------------------------------------------------------------------


def test_grad_input_of_every_hooked_layer_is_unchanged(case):
    model = case.model
    spec = RegularizerSpec(feasible_set="layerwise_subset", selection="filter", frac=1.0)
    modules = dict(model.named_modules())
    captured: dict[str, list] = {}

    def keep_input(name):
        def hook(mod, args):
            args[0].retain_grad()
            captured.setdefault(name, []).append(args[0])

        return hook

    reg = Regularizer(model, spec)
    names = [b.name for b in reg.blocks]
    reg.remove()  # the reference is a backward with no hooks installed at all
    handles = [modules[n].register_forward_pre_hook(keep_input(n)) for n in names]
    model.zero_grad(set_to_none=True)
    token_mean_loss(model, case.batch).backward()
    plain = {n: [t.grad.clone() for t in ts] for n, ts in captured.items()}
    captured.clear()
    reg = Regularizer(model, spec)
    reg.capture_target(token_mean_loss(model, case.target))
    captured.clear()
    reg.backward(lambda rows: token_mean_loss(model, case.batch, rows), case.units)
    for h in handles:
        h.remove()
    reg.remove()
    model.zero_grad(set_to_none=True)
    assert set(captured) == set(names)
    for name, ts in captured.items():
        for got, want in zip(ts, plain[name]):
            assert O.rel_err(got.grad, want) < 1e-12, name


# 6. Scale invariance / 7. alignment / 8. idempotence -----------------------------------------------------


@pytest.mark.parametrize("selection,frac", [("topk", 0.5), ("filter", 1.0), ("filter", 0.5)])
def test_scaling_the_target_changes_nothing(mlp, selection, frac):
    """Scores scale by c > 0 (as with the LR factor): selections and the curated gradient are unchanged."""
    model = mlp.model
    out = []
    for c in (1.0, 1e-3, 250.0):
        reg = Regularizer(model, RegularizerSpec(feasible_set="layerwise_subset", selection=selection, frac=frac))
        model.zero_grad(set_to_none=True)
        reg.capture_target(c * token_mean_loss(model, mlp.target))
        stats = reg.backward(lambda rows: token_mean_loss(model, mlp.batch, rows), mlp.units)
        out.append(({k: v.clone() for k, v in stats.weights.items()},
                    {b.name: b.weight.grad.clone() for b in reg.blocks}))
        reg.remove()
    model.zero_grad(set_to_none=True)
    for weights, g in out[1:]:
        for k in weights:
            assert torch.equal(weights[k], out[0][0][k])
            assert O.rel_err(g[k], out[0][1][k]) < 1e-12


def test_filter_alignment_is_non_negative_per_layer(case):
    reg, stats, got = case.run(feasible_set="layerwise_subset", selection="filter", frac=1.0)
    for name, ks in case.keys(reg).items():
        kept = stats.weights[name] > 0
        assert (stats.scores[name][kept] >= 0).all()
        assert O.dot(got, case.gT, ks) >= -1e-15
    assert all(c >= -1e-12 for c in stats.cos.values())


@pytest.mark.parametrize("fs", ["layerwise_subset", "global_subset"])
def test_topk_moves_a_layer_against_the_target_when_every_row_disagrees(fs):
    """The stall's ingredient (bench/README.md, "Layer-wise stability"): top-k keeps its k rows even
    when every score is negative, so each layer's update increases the target loss to first order
    (cosine -1 here); filtering keeps none of them and leaves the weights alone."""
    model = O.TinyMLP(4)
    row = O.make_batch(1, seed=7)
    batch = {k: v.repeat(4, 1) for k, v in row.items()}  # four copies: every row's gradient is the same
    units = O.units_of(batch)
    updates = {}
    for selection, frac in (("topk", 0.5), ("filter", 1.0)):
        reg = Regularizer(model, RegularizerSpec(feasible_set=fs, selection=selection, frac=frac))
        reg.capture_target(-token_mean_loss(model, batch))  # g_T = -G: every row disagrees with the target
        stats = reg.backward(lambda rows: token_mean_loss(model, batch, rows), units)
        updates[selection] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        blocks = [b.name for b in reg.blocks]
        model.zero_grad(set_to_none=True)
        reg.remove()
        if selection == "topk":
            assert all(abs(stats.cos[b] + 1) < 1e-9 for b in blocks)
            assert all(abs(k - 0.5) < 1e-12 for k in stats.kept.values())
        else:
            assert all(k == 0 for k in stats.kept.values())
    hooked = [k for b in blocks for k in O.block_params(b, model)]
    assert all(updates["topk"][k].abs().max() > 0 for k in hooked)
    assert all(updates["filter"][k].abs().max() == 0 for k in hooked if k in updates["filter"])


def test_topk_alignment_beats_full_with_equal_token_counts():
    """With equal T_i, the top-k mean score >= the mean of all scores: <d_topk, g_T> >= <d_full, g_T>."""
    model = O.TinyMLP(3)
    batch = O.make_batch(8, seed=5, min_len=7, max_len=7, prompt_len=2)
    target = O.make_batch(2, seed=6)
    units = O.units_of(batch)
    assert units.unique().numel() == 1
    gT = O.target_grad(model, target)
    full = O.grads(model, token_mean_loss(model, batch))
    for fs in ("layerwise_subset", "global_subset"):
        reg = Regularizer(model, RegularizerSpec(feasible_set=fs, selection="topk", frac=0.25))
        reg.capture_target(token_mean_loss(model, target))
        reg.backward(lambda rows: token_mean_loss(model, batch, rows), units)
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        keys_per_block = [O.block_params(b.name, model) for b in reg.blocks]
        reg.remove()
        if fs == "layerwise_subset":
            for ks in keys_per_block:
                assert O.dot(got, gT, ks) >= O.dot(full, gT, ks) - 1e-12
        all_keys = [k for ks in keys_per_block for k in ks]
        assert O.dot(got, gT, all_keys) > O.dot(full, gT, all_keys)


def test_filter_is_idempotent(mlp):
    """Filter B -> S; feed S back as the batch with the same g_T: all of S is kept, same direction."""
    model = mlp.model
    spec = RegularizerSpec(feasible_set="global_subset", selection="filter", frac=1.0)
    reg = Regularizer(model, spec)
    reg.capture_target(token_mean_loss(model, mlp.target))
    s1 = reg.backward(lambda rows: token_mean_loss(model, mlp.batch, rows), mlp.units)
    d1 = {b.name: b.weight.grad.clone() for b in reg.blocks}
    model.zero_grad(set_to_none=True)
    S = torch.nonzero(s1.global_scores >= 0).flatten()
    assert 0 < S.numel() < mlp.units.numel(), "the fixture should filter some but not all examples"
    sub = {k: v[S] for k, v in mlp.batch.items()}
    s2 = reg.backward(lambda rows: token_mean_loss(model, sub, rows), mlp.units[S])
    assert (s2.global_scores >= 0).all()
    for b in reg.blocks:
        assert O.rel_err(b.weight.grad, d1[b.name]) < 1e-10
    model.zero_grad(set_to_none=True)
    reg.remove()


def test_topk_nested_consistency():
    from drpt_ray.regularize.feasible import topk_weights

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        s = torch.randn(10, generator=g, dtype=torch.float64)
        top = torch.nonzero(topk_weights(s, 0.3)).flatten()  # k = 3
        rest = [i for i in range(10) if i not in top.tolist()]
        extra = torch.tensor(rest)[
            torch.randperm(len(rest), generator=g)[: int(torch.randint(0, 8, (1,), generator=g))]]
        sub = torch.sort(torch.cat([top, extra])).values
        picked = sub[torch.nonzero(topk_weights(s[sub], 3 / len(sub) + 1e-12)).flatten()]
        assert picked.tolist() == top.tolist()


# Target-only and the soft subset (beyond the paper) -------------------------------------------------------


def test_target_only_update_is_the_target_gradient(case):
    _, _, got = case.run(feasible_set="target_only")
    case.assert_close(got, case.gT, case.gT.keys())


def test_soft_subset_matches_formula_and_limits(case):
    reg, stats, got = case.run(feasible_set="soft_subset", tau=0.7)
    for name, ks in case.keys(reg).items():
        s = O.layer_scores(case.G, case.gT, ks)
        pi = torch.softmax(s / (0.7 * s.std(unbiased=False)), 0)
        omega = pi * case.N / (pi * case.units).sum()
        want = {k: sum(float(omega[i]) * case.G[i][k] for i in range(len(s))) for k in ks}
        case.assert_close(got, want, ks)
    _, _, hot = case.run(feasible_set="soft_subset", tau=1e13)
    case.assert_close(hot, case.plain, case.plain.keys())
    reg, _, cold = case.run(feasible_set="soft_subset", tau=1e-4, soft_granularity="global")
    all_keys = [k for ks in case.keys(reg).values() for k in ks]
    top1 = O.topk_set(O.layer_scores(case.G, case.gT, all_keys), 1e-9)
    case.assert_close(cold, O.curated(case.G, top1, case.units, case.N, all_keys), all_keys)


def test_iif_buffer_filter_keeps_non_negative_global_scores(mlp):
    model = mlp.model
    reg = Regularizer(model, RegularizerSpec(feasible_set="iif", selection="filter", frac=1.0))
    reg.capture_target(token_mean_loss(model, mlp.target))
    chunks = [(lambda rows, lo=lo: token_mean_loss(model, O.select(mlp.batch, lo), rows), mlp.units[lo : lo + 3])
              for lo in (0, 3)]
    kept = reg.filter_buffer(chunks)
    assert all(p.grad is None for p in model.parameters()), "scoring must not leave gradients"
    # reference: per-chunk normaliser, as each chunk's loss is its own token-mean
    all_keys = [k for b in reg.blocks for k in O.block_params(b.name, model)]
    ref = []
    for lo in (0, 3):
        sub = O.select(mlp.batch, lo)
        ref.append(O.layer_scores(O.per_example_grads(model, sub, float(mlp.units[lo : lo + 3].sum())),
                                  mlp.gT, all_keys))
    ref = torch.cat(ref)
    assert kept.tolist() == [i for i in range(6) if ref[i] >= 0]
    reg.remove()


def test_registry_matches_the_schema_and_refuses_clashes():
    from typing import get_args

    from drpt_ray.feasible_sets import FEASIBLE_SETS

    assert sorted(get_args(RegularizerSpec.model_fields["feasible_set"].annotation)) == FEASIBLE_SETS.names()
    with pytest.raises(ValueError, match="already registered"):
        FEASIBLE_SETS.add("full", FEASIBLE_SETS.get("full"))
    with pytest.raises(ValueError, match=r"valid: \[.*\]$"):  # registered names only: no import paths
        FEASIBLE_SETS.get("nope")
    with pytest.raises(ValueError, match="unknown feasible set 'os:system'"):
        FEASIBLE_SETS.get("os:system")


def test_lora_adapters_are_separate_blocks_and_match_brute_force():
    """peft LoRA: lora_A and lora_B of each adapter are blocks of their own; frozen bases are not hooked."""
    from peft import LoraConfig, get_peft_model

    base = O.tiny_llama(4)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    model.double()
    batch, target = O.make_batch(6, seed=7), O.make_batch(2, seed=8)
    units = O.units_of(batch)
    N = float(units.sum())
    G = O.per_example_grads(model, batch, N)
    gT = O.target_grad(model, target)
    reg = Regularizer(model, RegularizerSpec(feasible_set="layerwise_subset", selection="topk", frac=0.5))
    names = [b.name for b in reg.blocks]
    assert len(names) == 2 * 3 * 2 and all(".lora_A." in n or ".lora_B." in n for n in names)
    reg.capture_target(token_mean_loss(model, target))
    stats = reg.backward(lambda rows: token_mean_loss(model, batch, rows), units)
    got = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    reg.remove()
    A_sel = B_sel = None
    for name in names:
        ks = O.block_params(name, model)
        S = O.topk_set(O.layer_scores(G, gT, ks), 0.5)
        want = O.curated(G, S, units, N, ks)
        for k in ks:
            assert O.rel_err(got[k], want[k]) < 2e-6, k
        if "layers.0.self_attn.q_proj.lora_A" in name:
            A_sel = S
        if "layers.0.self_attn.q_proj.lora_B" in name:
            B_sel = S
    assert A_sel is not None and B_sel is not None  # the two factors select independently
    assert set(stats.kept) == set(names)


# ---------------------------------------------------------------------------------------------
# Data parallel: a rank backpropagates its share c of the global loss (loss_scale); the SUM over
# ranks (reduce_grads) runs before the metrics.


@pytest.mark.parametrize("feasible,kw", [
    ("layerwise_subset", {}), ("global_subset", {}), ("global_subset", {"passes": "two_pass"}),
    ("soft_subset", {"tau": 0.3}), ("full", {}), ("target_only", {}),
])
def test_loss_scale_scales_the_update_not_the_selection(case, feasible, kw):
    c = 0.37
    _, s1, g1 = case.run(feasible_set=feasible, **kw)
    _, s2, g2 = case.run(feasible_set=feasible, loss_scale=c, **kw)
    factor = 1.0 if feasible == "target_only" else c  # target_only writes the (already global) g_T
    assert set(g1) == set(g2)
    for k in g1:
        assert O.rel_err(g2[k], factor * g1[k]) < case.tol, k
    assert s1.kept == pytest.approx(s2.kept, abs=1e-6) and s1.cos == pytest.approx(s2.cos, abs=1e-6)
    for name in s1.scores:  # scores are reported unscaled
        assert O.rel_err(s2.scores[name], s1.scores[name]) < case.tol, name


def test_metrics_describe_the_reduced_update(mlp):
    """reduce_grads runs after the backward and before the cosines: flipping every gradient there
    flips every reported cosine."""
    params = [p for p in mlp.model.parameters()]
    _, s1, _ = mlp.run(feasible_set="layerwise_subset")
    _, s2, _ = mlp.run(feasible_set="layerwise_subset",
                       reduce_grads=lambda: [p.grad.neg_() for p in params if p.grad is not None])
    assert s1.cos and s2.cos == pytest.approx({k: -v for k, v in s1.cos.items()}, rel=1e-9)
    assert s2.cos_overall == pytest.approx(-s1.cos_overall, rel=1e-9)
