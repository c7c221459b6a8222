"""Where an RL step of the real demo spends its time, and what giving each phase both cores buys.

Runs the spec of `drpt-ray demo --real` (drpt_ray.demo.REAL_DEMO: SmolLM2-135M-Instruct + LoRA r 16,
8 prompts x 4 samples + 4 target prompts x 4, layer-wise) for a few steps without evaluations, once
with the learner and the vLLM engine on one Ray CPU each (each then runs one thread) and once with
two each: the synchronous loop runs one phase at a time, so the phase that runs may use both cores.
Prints the per-phase medians over steps 2..N (step 1 pays one-off costs), tokens per second, and
GFLOP/s against the fp32 matmul rate measured here at the model's shapes, and the bf16 rate beside
it (a CPU without AVX512-BF16 or AMX emulates bf16, so the learner and vLLM stay in fp32 there).

FLOP accounting (2 x 134.5M parameters per token for a forward): `logprob` is a forward over the
general and target rollouts; `regularize` (the g_T capture) and `update` are a forward and the
backward of activations over the target / general rollouts, ~2 forwards (LoRA: the frozen base
weights get no gradient), plus the regularizer's scoring, not counted. Generation is not converted:
vLLM's prefix cache skips the shared system prompt, so its FLOPs are not tokens x 0.27 GFLOP.

    .venv/bin/python bench/real_step.py [--steps 5]    # ~10 min here
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from drpt_ray.config import JobSpec
from drpt_ray.data import load_task, render_chat
from drpt_ray.demo import REAL_DEMO
from drpt_ray.machine import machine_summary
from drpt_ray.trainer import run_job

FWD_GFLOP_PER_TOKEN = 2 * 134.5e6 / 1e9
PHASES = ("gen", "logprob", "regularize", "update", "sync", "step")


def matmul_gflops(threads: int, dtype: torch.dtype = torch.float32) -> float:
    """GEMM rate at a SmolLM2 MLP shape (tokens x 576 @ 576 x 1536), `threads` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    return 2 * 2048 * 576 * 1536 * 20 / (time.perf_counter() - t) / 1e9


def prompt_tokens() -> float:
    from transformers import AutoTokenizer

    spec = JobSpec.model_validate(REAL_DEMO)
    tok = AutoTokenizer.from_pretrained(spec.model.path)
    pool = render_chat(load_task(spec.data.model_copy(update={"n_general": 64, "n_eval": 16})), tok).general
    return statistics.fmean(len(tok(e.prompt)["input_ids"]) for e in pool)


def run(cpus: float, steps: int, out: Path) -> list[dict]:
    spec = JobSpec.model_validate(REAL_DEMO | {
        "steps": steps, "eval_every": 10_000, "eval_before_warm_start": False, "progress": False, "tensorboard": False,
        "resources": {"learner_num_cpus": cpus}, "rollout": REAL_DEMO["rollout"] | {"num_cpus_per_worker": cpus},
        "output_dir": str(out / f"cpus{cpus:g}"),
    })
    import ray

    try:
        run_job(spec)
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in (Path(spec.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/step" in r and r["step"] >= 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="bench/out/real_step")
    args = ap.parse_args()
    print(f"machine: {machine_summary()}", flush=True)
    peak = {n: matmul_gflops(n) for n in (1, 2)}
    p_len = prompt_tokens()
    spec = JobSpec.model_validate(REAL_DEMO)
    n_gen = spec.batch_size * spec.rollout.sampling.n
    n_tgt = spec.target_batch_size * spec.rollout.sampling.n
    bf16 = matmul_gflops(1, torch.bfloat16)
    print(f"fp32 matmul here: {peak[1]:.0f} GFLOP/s on 1 thread, {peak[2]:.0f} on 2; bf16 on 1 thread: {bf16:.0f} "
          f"({torch.backends.cpu.get_cpu_capability()}); mean prompt {p_len:.1f} tokens")
    table = {}
    for cpus in (1.0, 2.0):
        rows = run(cpus, args.steps, Path(args.out))
        med = {ph: statistics.median(r[f"time/{ph}"] for r in rows) for ph in PHASES}
        resp = statistics.fmean(r["reward/response_len"] for r in rows)
        tokens = {"gen": (n_gen + n_tgt) * resp, "logprob": (n_gen + n_tgt) * (p_len + resp),
                  "regularize": n_tgt * (p_len + resp), "update": n_gen * (p_len + resp)}
        fwd_equiv = {"logprob": 1, "regularize": 2, "update": 2}
        table[cpus] = (med, tokens, fwd_equiv)
    print("\n| phase | 1 CPU each: s | 2 CPUs each: s | speed-up | tokens | tokens/s (2 CPUs) | GFLOP/s (2 CPUs) | "
          "% of 2-thread matmul |")
    print("|---|---|---|---|---|---|---|---|")
    for ph in PHASES:
        one, two = table[1.0][0][ph], table[2.0][0][ph]
        tok = table[2.0][1].get(ph)
        cells = [f"{one:.2f}", f"{two:.2f}", f"{one / two:.2f}x"]
        if tok is None:
            cells += ["", "", "", ""]
        else:
            note = " (new)" if ph == "gen" else ""
            cells += [f"{tok:.0f}{note}", f"{tok / two:.0f}"]
            eq = table[2.0][2].get(ph)
            cells += ([f"{tok * eq * FWD_GFLOP_PER_TOKEN / two:.0f}",
                       f"{100 * tok * eq * FWD_GFLOP_PER_TOKEN / two / peak[2]:.0f}%"] if eq else ["", ""])
        print(f"| {ph} | " + " | ".join(cells) + " |")
    print(f"\nmedians over steps 2..{args.steps}; runs under {args.out}")


if __name__ == "__main__":
    main()
