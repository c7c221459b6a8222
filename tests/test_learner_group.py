"""The data-parallel learner on real Ray Train: 2 CPU workers over gloo, a tiny float64 Llama.

Every group test runs twice: plain data parallel (`dp`) and with the policy sharded by torch's
fully_shard (`fsdp`, FSDP2 on CPU over gloo). Both must equal the same references.

References are the in-process `Learner` (a world of one: the same rank code) and brute force
(plain autograd, one backward per example). HF's Llama computes RMSNorm and the attention softmax
in float32 even in a float64 model, which leaves ~1e-7 relative noise that depends on the batch
shape; the `float64_math` patch (this process and every worker) makes float64 mean float64, so
the equalities hold to ~1e-10 relative.
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import sys
import time

import pytest
import ray
import torch

from drpt_ray.algorithms import ADVANTAGE_ESTIMATORS, AdvantageInputs
from drpt_ray.config import JobSpec
from drpt_ray.data import load_task, supervised_token_counts, tokenize_sft
from drpt_ray.learner import Learner, LearnerGroup, LearnerGroupError, build_batch
from drpt_ray.algorithms import standardised_rewards
from drpt_ray.learner.group import row_ranges
from drpt_ray.lm_losses import sequence_loss_sums, token_mean_loss

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def watchdog():
    """No test may hang: dump every stack and exit after 300 s."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def float64_math(_learner=None) -> None:
    from transformers.models.llama import modeling_llama as M

    def norm(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k, v = M.repeat_kv(key, module.num_key_value_groups), M.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.softmax(w, dim=-1)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    M.LlamaRMSNorm.forward = norm
    M.eager_attention_forward = attention


@pytest.fixture(scope="module")
def f64():
    from transformers.models.llama import modeling_llama as M

    original = M.LlamaRMSNorm.forward, M.eager_attention_forward
    float64_math()
    yield
    M.LlamaRMSNorm.forward, M.eager_attention_forward = original


def job(out, feasible: str, workers: int = 2, fsdp: bool = False, **reg) -> JobSpec:
    return JobSpec.model_validate({
        "mode": "rlvr", "output_dir": str(out), "model": {"dtype": "float64"},
        "regularizer": {"feasible_set": feasible, **reg}, "optim": {"max_grad_norm": None, "warmup_frac": 0.0},
        "algorithm": {"target_objective": "reward"},  # the oracles below spell out its global standardisation
        "resources": {"learner_num_workers": workers, "learner_num_cpus": 0.5, "fsdp": fsdp}, "progress": False,
        "tensorboard": False,
    })


def _group_and_reference(out, feasible, fsdp, **reg):
    spec = job(out, feasible, fsdp=fsdp, **reg)
    group = LearnerGroup(spec, call_timeout_s=120)
    group.execute(float64_math)
    ref = Learner(job(out, feasible, workers=1, **reg))  # in-process: a world of one
    if fsdp:
        assert all(group.execute(is_sharded)), "fsdp: the ranks' parameters are DTensors"
    return spec, group, ref


@pytest.fixture(scope="module", params=[False, True], ids=["dp", "fsdp"])
def full(f64, tmp_path_factory, request):
    spec, group, ref = _group_and_reference(tmp_path_factory.mktemp("full"), "full", request.param)
    yield spec, group, ref
    group.remove()
    ref.remove()


@pytest.fixture(scope="module", params=[False, True], ids=["dp", "fsdp"])
def layerwise(f64, tmp_path_factory, request):
    spec, group, ref = _group_and_reference(tmp_path_factory.mktemp("lw"), "layerwise_subset", request.param,
                                            selection="topk", frac=0.5)
    yield spec, group, ref
    group.remove()
    ref.remove()


# ----------------------------------------------------------------------------------------------
# helpers (run on every rank in lockstep: gathering a sharded tensor is a collective)


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def is_sharded(learner) -> bool:
    return all(hasattr(p, "full_tensor") for p in learner.policy.parameters())


def grads_of(learner) -> dict:
    return {n: _whole(p.grad) for n, p in learner.policy.named_parameters() if p.grad is not None}


def weights_of(learner) -> dict:
    return {n: _whole(p) for n, p in learner.policy.named_parameters()}


def cache_of(learner) -> dict:
    """The per-layer target cache, flat: {block name: g_T of its weight}."""
    return {name: t["weight"].clone() for name, t in learner.reg.state_dict()["targets"].items()}


def assert_close(got: dict, want: dict, rtol: float = 1e-10) -> None:
    assert set(got) == set(want)
    scale = max(float(v.abs().max()) for v in want.values())
    for k in want:
        err = float((got[k] - want[k]).abs().max())
        assert err <= rtol * scale, (k, err, scale)


def assert_ranks_identical(per_rank: list[dict]) -> None:
    for other in per_rank[1:]:
        assert all(torch.equal(per_rank[0][k], other[k]) for k in per_rank[0])


def sync(ref: Learner, group: LearnerGroup, tmp) -> None:
    """The reference takes the group's state (its one checkpoint)."""
    group.save(str(tmp))
    ref.load(str(tmp))


def sft_rows(spec, tok, n: int, split: str = "general", offset: int = 0) -> dict:
    splits = load_task(spec.data)
    return tokenize_sft(tok, getattr(splits, split)[offset : offset + n], spec.data.max_len)


def rl_rows(learner: Learner, n_prompts: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts, responses, rewards, groups = [], [], [], []
    for p in range(n_prompts):
        prompt = torch.randint(5, 200, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n):
            prompts.append(prompt)
            responses.append(torch.randint(5, 200, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g)
                             .tolist())
            rewards.append(float(torch.rand(1, generator=g) > 0.5))
            groups.append(p)
    batch = learner.score_rollouts(build_batch(prompts, responses, rewards, groups, pad_id=3))
    if n > 1:
        batch.advantages = ADVANTAGE_ESTIMATORS.get("grpo")(AdvantageInputs(batch.rewards, batch.group_ids,
                                                                            batch.response_mask))
    return batch


def uneven_token_means(counts: torch.Tensor, world: int = 2) -> bool:
    means = [float(counts[lo:hi].double().mean()) for lo, hi in row_ranges(counts.numel(), world)]
    return max(means) - min(means) > 0.1


# ----------------------------------------------------------------------------------------------
# `full`: a 2-worker step equals a 1-worker step on the concatenated batch


def test_full_sft_step_equals_one_worker(full):
    spec, group, ref = full
    general = sft_rows(spec, ref.tokenizer, 7)
    assert uneven_token_means(supervised_token_counts(general["labels"]))  # a mean of rank means would differ
    m2, m1 = group.sft_step(general, None), ref.sft_step(general, None)
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-12)
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-10)
    assert m2["reg/kept_frac_mean"] == m1["reg/kept_frac_mean"] == 1.0
    grads, weights = group.execute(grads_of), group.execute(weights_of)
    assert_ranks_identical(grads)
    assert_ranks_identical(weights)
    assert_close(grads[0], grads_of(ref))
    assert_close(weights[0], weights_of(ref), rtol=1e-12)
    # the other data-parallel entry points agree too
    ev = sft_rows(spec, ref.tokenizer, 5, "eval")
    assert group.eval_sft(ev) == pytest.approx(ref.eval_sft(ev), rel=1e-12)
    assert group.warm_start([general], 1e-3) == pytest.approx(ref.warm_start([general], 1e-3), rel=1e-12)
    assert_close(group.execute(weights_of)[0], weights_of(ref), rtol=1e-12)


def test_full_rl_step_equals_one_worker(full):
    spec, group, ref = full
    batch = rl_rows(ref, n_prompts=3, n=3)  # 9 rows: ranks hold 5 and 4
    assert uneven_token_means(batch.response_mask.sum(1))
    scored = group.score_rollouts(batch.rows(None))
    assert torch.allclose(scored.old_logprobs, batch.old_logprobs, rtol=0, atol=1e-12)
    m2, m1 = group.rl_step(batch), ref.rl_step(batch)
    for key in ("loss", "loss/policy", "grad_norm"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-10, abs=1e-14), key
    grads = group.execute(grads_of)
    assert_ranks_identical(grads)
    assert_close(grads[0], grads_of(ref))
    assert_close(group.execute(weights_of)[0], weights_of(ref), rtol=1e-12)


def test_too_few_rows_fail_before_anything_runs(full):
    spec, group, ref = full
    with pytest.raises(ValueError, match="batch_size"):  # fewer general rows than workers
        group.sft_step(sft_rows(spec, ref.tokenizer, 1), None)
    assert group.needs_target(0) is False  # `full` never captures; the group is still usable


def test_one_checkpoint_from_rank0_loads_on_every_rank(full, tmp_path):
    spec, group, ref = full
    group.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learner.pt"]
    fresh = Learner(job(spec.output_dir, "full", workers=1))
    fresh.load(str(tmp_path))
    assert_close(weights_of(fresh), group.execute(weights_of)[0], rtol=0)
    assert fresh.updates == ref.updates == 2
    # weights for the rollout workers come from rank 0 alone
    w = ray.get(group.weights_ref())
    assert set(w) == set(fresh.policy.state_dict()) and torch.equal(w["lm_head.weight"], fresh.policy.lm_head.weight)
    # a step, then load: every rank is back at the checkpoint
    group.sft_step(sft_rows(spec, ref.tokenizer, 4, offset=20), None)
    group.load(str(tmp_path))
    back = group.execute(weights_of)
    assert_ranks_identical(back)
    assert_close(back[0], weights_of(fresh), rtol=0)
    fresh.remove()


# ----------------------------------------------------------------------------------------------
# oracle 12: the all-reduced target gradient is the gradient of the concatenated target batch


def _plain_grads(learner: Learner, loss: torch.Tensor) -> dict:
    blocks = {b.name: b.weight for b in learner.reg.blocks}
    g = torch.autograd.grad(loss, list(blocks.values()), allow_unused=True)
    return {n: (x if x is not None else torch.zeros_like(w)) for (n, w), x in zip(blocks.items(), g)}


@pytest.mark.parametrize("n_prompts,n", [(3, 2), (1, 1)])  # 6 rows over 2 ranks; 1 row: rank 1 holds none
def test_target_gradient_is_global(layerwise, tmp_path, n_prompts, n):
    spec, group, ref = layerwise
    sync(ref, group, tmp_path)
    target = rl_rows(ref, n_prompts=n_prompts, n=n, seed=1)
    target.rewards[0] = 1.0  # standardised over the global batch, not per rank
    m = group.capture_target(target)
    caches = group.execute(cache_of)
    assert_ranks_identical(caches)
    # single process, plain autograd over the whole target batch (the `reward` objective)
    logp, _, _ = ref._forward(target)
    z = standardised_rewards(target.rewards).to(logp.dtype)
    loss = -(z[:, None] * logp * target.response_mask).sum() / target.response_mask.sum().clamp(min=1)
    want = _plain_grads(ref, loss)
    assert_close(caches[0], want)
    assert m["target/objective"] == pytest.approx(float(loss.detach()), rel=1e-12)
    ref.capture_target(target)  # and the in-process learner agrees
    assert_close(caches[0], cache_of(ref))


# ----------------------------------------------------------------------------------------------
# layerwise_subset over 2 workers = the documented semantics by brute force


def test_layerwise_subset_matches_brute_force(layerwise, tmp_path):
    spec, group, ref = layerwise
    sync(ref, group, tmp_path)
    general = sft_rows(spec, ref.tokenizer, 7, offset=40)
    target = sft_rows(spec, ref.tokenizer, 1, "target")  # one target row: rank 1 gets a no-token stand-in
    counts = supervised_token_counts(general["labels"]).double()
    assert uneven_token_means(counts)

    params = dict(ref.policy.named_parameters())
    hooked = [b.name + ".weight" for b in ref.reg.blocks]
    names = list(params)
    # g_T: token-mean CE of the whole target batch, plain autograd
    g_t = dict(zip(names, torch.autograd.grad(token_mean_loss(ref.policy, target), list(params.values()))))
    # G_i: gradient of example i's summed token CE, one backward per example
    per_ex = []
    for i in range(counts.numel()):
        sums, _ = sequence_loss_sums(ref.policy, {k: v[i : i + 1] for k, v in general.items()})
        per_ex.append(dict(zip(names, torch.autograd.grad(sums.sum(), list(params.values()), allow_unused=True))))
    frac, total = spec.regularizer.frac, counts.sum()
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    for lo, hi in row_ranges(counts.numel(), 2):
        rows = list(range(lo, hi))
        u_r = counts[lo:hi].sum()
        for n in names:
            g = [per_ex[i][n] if per_ex[i][n] is not None else torch.zeros_like(params[n]) for i in rows]
            if n in hooked:  # local top-k against the global g_T, rescaled to the subset's token mean
                s = torch.stack([(gi * g_t[n]).sum() for gi in g])
                k = max(1, math.floor(frac * len(rows)))
                keep = sorted(range(len(rows)), key=lambda j: (-float(s[j]), j))[:k]
                d_r = sum(g[j] for j in keep) / counts[[rows[j] for j in keep]].sum()
            else:  # unhooked (norms, embeddings): the rank's ordinary token-mean gradient
                d_r = sum(g) / u_r
            want[n] += (u_r / total) * d_r  # share-weighted average over ranks
    m = group.sft_step(general, target)
    grads = group.execute(grads_of)
    assert_ranks_identical(grads)
    assert_close(grads[0], want, rtol=1e-9)
    # the reported cosine is that of the applied (reduced) update with g_T over the hooked weights
    dot, nd, nt = (sum(float((a * b).sum())
                       for a, b in ((want[n] if x else g_t[n], want[n] if y else g_t[n]) for n in hooked))
                   for x, y in ((True, False), (True, True), (False, False)))
    assert m["reg/cos"] == pytest.approx(dot / (nd * nt) ** 0.5, rel=1e-9)
    # local selection is not the one-process selection over the concatenated batch
    ref.sft_step(general, target)
    assert any(float((grads[0][n] - p.grad).abs().max()) > 1e-6 for n, p in params.items() if n in hooked)


# ----------------------------------------------------------------------------------------------
# a killed worker: the job fails cleanly, then resumes from its last checkpoint


def test_killed_worker_fails_cleanly_then_resumes(tmp_path, monkeypatch):
    import drpt_ray.job as J
    from drpt_ray.job import latest_checkpoint
    from drpt_ray.trainer import run_job

    groups, loaded = [], []

    class Recording(LearnerGroup):
        def __init__(self, spec):
            super().__init__(spec, call_timeout_s=120)
            groups.append(self)

        def load(self, path):
            loaded.append(path)
            super().load(path)

    monkeypatch.setattr(J, "LearnerGroup", Recording)
    free_cpus = ray.available_resources().get("CPU", 0)
    spec = JobSpec.model_validate({
        "mode": "sft", "output_dir": str(tmp_path), "steps": 5, "eval_every": 100, "batch_size": 6,
        "data": {"n_general": 200, "n_eval": 16}, "checkpoint": {"every": 2, "keep": 2},
        "resources": {"learner_num_workers": 2, "learner_num_cpus": 0.5}, "progress": False, "tensorboard": False,
    })
    killed = []

    def kill_rank1(m):
        if m["step"] == 3 and not killed:
            os.kill(groups[-1].pids[1], signal.SIGKILL)
            killed.append(time.monotonic())

    with pytest.raises(LearnerGroupError) as err:
        run_job(spec, on_metrics=kill_rank1)
    assert killed and time.monotonic() - killed[0] < 60  # fails fast, no hang
    print(f"the job failed {time.monotonic() - killed[0]:.1f} s after the kill: {str(err.value)[:300]}")
    assert groups[0].failed and "stopped during" in str(err.value) and "WorkerGroupError" in str(err.value)
    with pytest.raises(LearnerGroupError, match="failed earlier"):
        groups[0].needs_target(0)
    assert latest_checkpoint(tmp_path).name == "step_0000002"
    deadline = time.monotonic() + 30  # the worker group and its placement group are released
    while ray.available_resources().get("CPU", 0) < free_cpus:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.5)

    resumed = run_job(spec)  # checkpoint.resume: the new group loads step 2 and runs steps 3..5
    assert len(groups) == 2 and groups[1].closed and not groups[1].failed
    assert [os.path.basename(p) for p in loaded] == ["step_0000002"]
    assert resumed.steps == 5 and [m["step"] for m in resumed.history] == [0, 1, 2, 3, 4, 5]
    assert (tmp_path / "model" / "model.safetensors").exists()
