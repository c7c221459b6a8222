"""FSDP (torch fully_shard) against plain data parallel, for every kind of regularizer state.

Two real processes over gloo (torch.multiprocessing, no Ray: the Ray Train path is covered by
tests/test_learner_group.py); each runs the same SFT steps twice on its row shard, once as a
data-parallel rank and once with the policy sharded. Sharding must not change a number: the
losses, the gradient norm, the cosine metrics (computed from local rows plus a SUM under FSDP),
the weights after two steps, the eval loss, and a checkpoint written by FSDP ranks must load
into data-parallel ranks. Under FSDP the full-size target caches must be sharded. The
configurations cover the regularizer's sharded paths: sketch
cosines with an output factor and biases (qwen2), target_only's cached-g_T writes, two-pass
global selection, soft weights, direct kernel with hooked embeddings.
"""

from __future__ import annotations


import pytest
import torch
import torch.multiprocessing as mp

from drpt_ray.config import JobSpec
from drpt_ray.local_ray import free_port

pytestmark = pytest.mark.slow


def _spec(out: str, fsdp: bool, arch: str, reg: dict) -> JobSpec:
    return JobSpec.model_validate({
        "mode": "sft", "output_dir": out,
        "model": {"dtype": "float64", "tiny": {"arch": arch.removesuffix("-gc")},
                  "gradient_checkpointing": arch.endswith("-gc")},
        "regularizer": reg, "optim": {"max_grad_norm": 1.0, "warmup_frac": 0.0},
        "resources": {"learner_num_workers": 2, "fsdp": fsdp}, "progress": False, "tensorboard": False,
    })


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _rank(rank: int, port: int, out: str, arch: str, reg: dict) -> None:
    import os

    import torch.distributed as dist

    from drpt_ray.data import load_task, tokenize_sft
    from drpt_ray.learner import Learner
    from drpt_ray.learner.group import shard_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    for fsdp in (False, True):
        learner = Learner(_spec(out, fsdp, arch, reg))
        splits = load_task(learner.spec.data)
        tok = lambda rows: tokenize_sft(learner.tokenizer, rows, learner.spec.data.max_len)  # noqa: E731
        metrics = []
        for step in range(2):
            general = shard_dict(tok(splits.general[7 * step : 7 * step + 7]), 2)[rank]  # 4 and 3 rows
            target = shard_dict(tok(splits.target[:3]), 2)[rank]
            metrics.append(learner.sft_step(general, target))
        weights = {k: _whole(v) for k, v in learner.policy.state_dict().items()}
        # which per-layer target caches are sharded (DTensors holding this rank's rows)
        sharded = [hasattr(getattr(t, "weight", t), "full_tensor") for t in learner.reg.targets.values()]
        ev = learner.eval_sft(shard_dict(tok(splits.eval[:3]), 2)[rank] if rank == 0 else None)  # rank 1: no rows
        ckpt = os.path.join(out, f"ckpt-{int(fsdp)}")
        os.makedirs(ckpt, exist_ok=True)
        learner.save(ckpt)
        results[fsdp] = {"metrics": metrics, "weights": weights, "eval": ev, "ckpt": ckpt, "sharded": sharded}
        learner.remove()
    # the FSDP ranks' checkpoint loads into data-parallel ranks
    dp = Learner(_spec(out, False, arch, reg))
    dp.load(results[True]["ckpt"])
    results["reloaded"] = {k: v.detach().clone() for k, v in dp.policy.state_dict().items()}
    dp.remove()
    if rank == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("arch,reg", [
    ("qwen2", {"feasible_set": "layerwise_subset", "kernel": "sketch", "sketch": {"dim": 8}}),
    ("qwen2", {"feasible_set": "target_only"}),
    ("llama", {"feasible_set": "global_subset", "passes": "two_pass"}),
    ("llama", {"feasible_set": "soft_subset", "tau": 0.5}),
    ("llama", {"feasible_set": "layerwise_subset", "kernel": "direct", "hook_embeddings": True}),
    ("llama-gc", {"feasible_set": "layerwise_subset"}),
], ids=["sketch-qwen2", "target_only", "global-two-pass", "soft", "direct-embeddings", "gradient-checkpointing"])
def test_fsdp_equals_data_parallel(tmp_path, arch, reg):
    from drpt_ray.models import model_dir

    out = str(tmp_path)
    model_dir(_spec(out, False, arch, reg).model, out)  # built once, before two ranks read it
    mp.spawn(_rank, args=(free_port(), out, arch, reg), nprocs=2)
    r = torch.load(tmp_path / "results.pt", weights_only=False)
    dp, fsdp = r[False], r[True]
    for m_dp, m_fsdp in zip(dp["metrics"], fsdp["metrics"]):
        for key in ("loss", "target_loss", "grad_norm", "reg/cos", "reg/kept_frac_mean"):
            if key in m_dp:
                assert m_fsdp[key] == pytest.approx(m_dp[key], rel=1e-9, abs=1e-12, nan_ok=True), key
    assert "reg/cos" in dp["metrics"][-1]
    scale = max(float(v.abs().max()) for v in dp["weights"].values())
    for k, v in dp["weights"].items():
        assert float((fsdp["weights"][k] - v).abs().max()) <= 1e-12 * scale, k
    assert fsdp["eval"] == pytest.approx(dp["eval"], rel=1e-12)
    assert all(torch.equal(r["reloaded"][k], fsdp["weights"][k]) for k in fsdp["weights"])
    # under FSDP the full-size g_T caches are sharded like their weights; sketches stay whole
    assert dp["sharded"] and not any(dp["sharded"])
    assert fsdp["sharded"] == [reg.get("kernel") != "sketch"] * len(fsdp["sharded"])
