"""Data-parallel learner scaling: one SFT step of 1 vs 2 Ray Train workers, and what the
target-gradient all-reduce costs.

    .venv/bin/python bench/learner_scaling.py            # hidden 256, global batch 32, 12 timed steps
    .venv/bin/python bench/learner_scaling.py --quick    # smaller, for a smoke run

Setup: a random 2-layer Llama (`model.tiny`, float32), SFT on the scarce_target task with the
default regularizer (layerwise_subset, top-k 0.5, separate target batch re-captured every step),
the same global batch (`--batch` general rows, `--target` target rows) for every configuration:
  in-process     the plain `Learner` in this process (no Ray; torch threads = --threads)
  group N=1      `LearnerGroup` with one Ray Train worker (1 CPU)
  group N=2      `LearnerGroup` with two Ray Train workers (1 CPU each), gloo
  N=2 fsdp       the same two workers with the policy sharded (`resources.fsdp`, FSDP2 on CPU)
All three stay alive and step through the same batches in interleaved rounds (so background
load hits each alike): `--warmup` rounds, then `--steps` timed rounds; medians. "step" is the driver's
wall time of `sft_step` (sharding, object store, mailbox, the ranks' work, the reply).
"capture+reduce" is the learner's own `time/regularize` (target forward/backward + all-reduce);
"g_T all-reduce" and "grad all-reduce" are the two collectives timed in isolation on the ranks
right after the timed steps (median of 20 calls each: `_reduce_target` on the cached g_T, and
`Collective.sum_grads` on the step's gradients; under FSDP the gradients are reduce-scattered
inside the backward, so that column is empty), so their share = median / median step.
"round trip" is a no-op command through the group (`needs_target`), the transport's floor;
"start" is construction until every rank has built its Learner (Ray Train start included).

On this machine (2 cores) two workers share the two cores with the driver, Ray and gloo, so the
N=2 speed-up is bounded by 2x at best and the table is honest about what it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
import torch  # noqa: E402

from drpt_ray.config import JobSpec  # noqa: E402
from drpt_ray.data import load_task, tokenize_sft  # noqa: E402
from drpt_ray.learner import Learner, LearnerGroup  # noqa: E402
from drpt_ray.machine import machine_summary  # noqa: E402
from drpt_ray.data import BatchSampler  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "learner_scaling"


def spec_for(args, workers: int, out: str, fsdp: bool = False) -> JobSpec:
    return JobSpec.model_validate({
        "mode": "sft", "output_dir": out, "batch_size": args.batch, "target_batch_size": args.target,
        "model": {"tiny": {"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden, "num_layers": 2,
                           "num_heads": max(1, args.hidden // 64), "num_kv_heads": 1}},
        "data": {"n_general": 2000, "n_eval": 16},
        "resources": {"learner_num_workers": workers, "learner_num_cpus": 1, "fsdp": fsdp},
        "progress": False, "tensorboard": False,
    })


def batches(spec: JobSpec, tok, n: int):
    splits = load_task(spec.data)
    g, t = BatchSampler(splits.general, spec.batch_size, 0), BatchSampler(splits.target, spec.target_batch_size, 1)
    return [(tokenize_sft(tok, g.next(), spec.data.max_len), tokenize_sft(tok, t.next(), spec.data.max_len))
            for _ in range(n)]


def _collective_times(learner, repeats: int) -> dict:
    """On a rank: median seconds of the g_T all-reduce and of the gradient all-reduce."""
    params = [p for g in learner.opt.param_groups for p in g["params"]]
    saved = learner.reg.state_dict()
    t_target, t_grads = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        learner._reduce_target()
        t_target.append(time.perf_counter() - t0)
        if not learner.fsdp:  # FSDP reduce-scatters inside the backward
            t0 = time.perf_counter()
            learner.comm.sum_grads(params)
            t_grads.append(time.perf_counter() - t0)
    learner.reg.load_state_dict(saved)
    out = {"target_allreduce_s": statistics.median(t_target)}
    if t_grads:
        out["grad_allreduce_s"] = statistics.median(t_grads)
    return out


def _cache_mb(learner) -> float:
    """MiB this rank holds of the per-layer target cache (its rows under FSDP)."""
    tensors = [v for t in learner.reg.targets.values() for v in t.parts().values()]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local) / 2**20


def _state_mb(learner) -> float:
    """MiB this rank holds of parameters, gradients and AdamW state (local shards under FSDP)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    tensors = ([p for p in learner.policy.parameters()]
               + [p.grad for p in learner.policy.parameters() if p.grad is not None])
    tensors += [v for st in learner.opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    return sum(local(t).numel() * local(t).element_size() for t in tensors) / 2**20


class Config:
    """One learner configuration, alive for the whole run (so rounds can interleave)."""

    def __init__(self, name: str, args, workers: int | None, fsdp: bool = False):
        self.name, self.workers = name, workers
        out = tempfile.mkdtemp(prefix="drpt-bench-scaling-")
        self.spec = spec_for(args, workers or 1, out, fsdp)
        t0 = time.perf_counter()
        self.learner = Learner(self.spec) if workers is None else LearnerGroup(self.spec)
        if workers is not None:
            self.learner.pids  # noqa: B018  (waits until every rank has built its Learner)
        self.start_s = time.perf_counter() - t0
        if workers is None:
            self.tok = self.learner.tokenizer
        else:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(Path(out) / "tiny-model")
        self.steps: list[float] = []
        self.regs: list[float] = []

    def step(self, general: dict, target: dict, timed: bool) -> None:
        t0 = time.perf_counter()
        m = self.learner.sft_step(general, target)
        dt = time.perf_counter() - t0
        if timed:
            self.steps.append(dt)
            self.regs.append(m["time/regularize"])

    def finish(self) -> dict:
        row = {"config": self.name, "workers": self.workers or 0, "start_s": self.start_s,
               "step_s": statistics.median(self.steps), "capture_s": statistics.median(self.regs), "steps": self.steps}
        if self.workers is not None:
            rt = []
            for _ in range(20):
                t0 = time.perf_counter()
                self.learner.needs_target(1)
                rt.append(time.perf_counter() - t0)
            row["round_trip_s"] = statistics.median(rt)
            row.update(self.learner.execute(_collective_times, 20)[0])
            row["state_mb"] = self.learner.execute(_state_mb)[0]
            row["target_cache_mb"] = self.learner.execute(_cache_mb)[0]
        else:
            row["state_mb"], row["target_cache_mb"] = _state_mb(self.learner), _cache_mb(self.learner)
        self.learner.remove()
        return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--target", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the in-process learner (a Ray worker of 1 CPU gets 1)")
    args = p.parse_args()
    machine = machine_summary()
    print(f"machine: {machine}", flush=True)
    if args.quick:
        args.hidden, args.batch, args.warmup, args.steps = 128, 16, 2, 5
    torch.set_num_threads(args.threads)
    ray.init(num_cpus=max(5, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    configs = [Config("in-process", args, None), Config("group N=1", args, 1), Config("group N=2", args, 2),
               Config("N=2 fsdp", args, 2, fsdp=True)]
    data = batches(configs[0].spec, configs[0].tok, args.warmup + args.steps)  # the same batches for all
    for i, (general, target) in enumerate(data):  # interleaved rounds: background load hits all alike
        for c in configs:
            c.step(general, target, timed=i >= args.warmup)
    rows = [c.finish() for c in configs]
    ray.shutdown()
    base = rows[1]["step_s"]
    per_round = [a / b for a, b in zip(rows[1]["steps"], rows[2]["steps"])]
    lines = [
        f"learner scaling: SFT step, tiny Llama hidden {args.hidden} (2 layers, float32), global batch {args.batch} "
        f"general + {args.target} target rows, layerwise_subset; {os.cpu_count()} cores; medians of {args.steps} steps",
        "",
        f"machine: {machine}",
        "",
        "| config | start (s) | step (ms) | speed-up vs N=1 | capture+reduce (ms) | g_T all-reduce (ms) | "
        "g_T all-reduce / step | grad all-reduce (ms) | round trip (ms) | params+grads+AdamW per rank (MiB) | "
        "g_T cache per rank (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = lambda k: f"{1e3 * r[k]:.1f}" if k in r else "-"  # noqa: E731
        frac = f"{100 * r['target_allreduce_s'] / r['step_s']:.1f}%" if "target_allreduce_s" in r else "-"
        lines.append(f"| {r['config']} | {r['start_s']:.1f} | {1e3 * r['step_s']:.1f} | {base / r['step_s']:.2f}x | "
                     f"{ms('capture_s')} | {ms('target_allreduce_s')} | {frac} | {ms('grad_allreduce_s')} | "
                     f"{ms('round_trip_s')} | {r['state_mb']:.1f} | {r['target_cache_mb']:.2f} |")
    per_round_fsdp = [a / b for a, b in zip(rows[2]["steps"], rows[3]["steps"])]
    lines += ["", f"N=2 speed-up over N=1 as the median of per-round ratios: {statistics.median(per_round):.2f}x; "
                  f"N=2 fsdp step / N=2 data-parallel step: {1 / statistics.median(per_round_fsdp):.2f}x; "
                  f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores."]
    lines += ["", "g_T cache: one [O, I] matrix per hooked Linear, all-reduced after each capture in data parallel; "
                  "under FSDP each rank keeps its rows (reduce-scattered inside the capture, so the g_T all-reduce "
                  "column is ~0 there). In N=1 the collectives are identities (no process group traffic)."]
    table = "\n".join(lines)
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    (OUT / "report.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
