"""bf16 against fp32 for the real model's learner, on the same batch (issue 21, item 3).

SmolLM2-135M-Instruct + LoRA r 16 as the real demo trains it (`drpt_ray.demo.REAL_DEMO`), two
Learners from the same weights and the same LoRA initialisation, one with `model.dtype: float32`,
one with `bfloat16`. One RL batch: 32 rows of real prompts and responses of the demo's task
(reasoning-gym chain_sum, the warm start's responses), GRPO advantages from fixed 0/1 rewards.
Measured, interleaved in one process (medians of `--repeats`):

- the log-probs of the response tokens (`score_rollouts`): max and mean |bf16 - fp32|;
- one regularized update (`capture_target` on 8 target rows, then `rl_step`): the LoRA parameters'
  change, bf16 against fp32: cosine of the two updates and the relative norm of their difference;
- seconds of each phase, and the GEMM rate of each dtype at the model's MLP shape (a CPU without
  AVX512-BF16 or AMX emulates bf16, and then it is the slower one).

    .venv/bin/drpt-ray models import smollm2 runs/smollm2
    .venv/bin/python bench/bf16_check.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from drpt_ray.config import JobSpec  # noqa: E402
from drpt_ray.data import load_task, render_chat  # noqa: E402
from drpt_ray.demo import REAL_DEMO  # noqa: E402
from drpt_ray.learner import Learner, build_batch  # noqa: E402
from drpt_ray.machine import machine_summary  # noqa: E402
from real_step import matmul_gflops  # noqa: E402  (a sibling script)


def learner(dtype: str, model: str, out: Path) -> Learner:
    spec = JobSpec.model_validate(REAL_DEMO | {"model": REAL_DEMO["model"] | {"path": model, "dtype": dtype},
                                               "output_dir": str(out / dtype), "progress": False})
    torch.manual_seed(0)  # the same LoRA initialisation in both
    return Learner(spec)


def batch_of(ref: Learner, rows: int, seed: int):
    """`rows` (prompt, response) pairs of the demo task through the chat template, 4 per group,
    rewards alternating 1, 0 (so every group has advantages)."""
    splits = render_chat(load_task(ref.spec.data), ref.tokenizer)
    examples = splits.general[seed * rows : (seed + 1) * rows]
    tok = ref.tokenizer
    prompts = [tok(e.prompt)["input_ids"] for e in examples]
    responses = [tok(e.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for e in examples]
    return build_batch(prompts, responses, [float(i % 2) for i in range(rows)],
                       [i // 4 for i in range(rows)], tok.pad_token_id)


def lora_params(lrn: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in lrn.policy.named_parameters() if p.requires_grad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/smollm2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/out/bf16_check")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    print(f"machine: {machine_summary()}", flush=True)
    print(f"GEMM at the MLP shape, {args.threads} threads: fp32 {matmul_gflops(args.threads):.0f} GFLOP/s, "
          f"bf16 {matmul_gflops(args.threads, torch.bfloat16):.0f} GFLOP/s", flush=True)
    out = Path(args.out)
    model = str(Path(args.model).resolve())
    learners = {d: learner(d, model, out) for d in ("float32", "bfloat16")}
    ref = learners["float32"]
    from drpt_ray.algorithms import ADVANTAGE_ESTIMATORS, AdvantageInputs

    def scored(lrn, batch):
        b = lrn.score_rollouts(batch)
        b.advantages = ADVANTAGE_ESTIMATORS.get("grpo")(AdvantageInputs(b.rewards, b.group_ids, b.response_mask))
        return b

    general, target = batch_of(ref, 32, 0), batch_of(ref, 8, 1)
    times: dict[str, dict[str, list[float]]] = {d: {"logprob": [], "regularize": [], "update": []} for d in learners}
    logps, deltas = {}, {}
    for r in range(args.repeats):
        for d, lrn in learners.items():  # interleaved: both dtypes see the same machine state
            before = lora_params(lrn)
            t0 = time.perf_counter()
            g = scored(lrn, general)
            t1 = time.perf_counter()
            lrn.capture_target(scored(lrn, target))
            t2 = time.perf_counter()
            lrn.rl_step(g)
            t3 = time.perf_counter()
            for phase, s in zip(("logprob", "regularize", "update"), (t1 - t0, t2 - t1, t3 - t2)):
                times[d][phase].append(s)
            if r == 0:  # the first update, from identical weights
                logps[d] = g.old_logprobs.double()
                after = lora_params(lrn)
                deltas[d] = torch.cat([(after[n] - before[n]).flatten() for n in before]).double()
    mask = general.response_mask != 0
    diff = (logps["bfloat16"] - logps["float32"])[mask].abs()
    a, b = deltas["float32"], deltas["bfloat16"]
    cos = float(a @ b / (a.norm() * b.norm()))
    rel = float((b - a).norm() / a.norm())
    lines = [
        f"machine: {machine_summary()}",
        f"batch: {general.size} general rows ({int(mask.sum())} response tokens), {target.size} target rows; "
        f"prompt+response length {general.input_ids.shape[1]}",
        f"log-probs of the response tokens, |bf16 - fp32|: max {float(diff.max()):.4f}, mean {float(diff.mean()):.4f} "
        f"(fp32 mean log-prob {float(logps['float32'][mask].mean()):.3f})",
        f"one regularized update of the LoRA parameters, bf16 vs fp32: cosine {cos:.4f}, |d_bf16 - d_fp32| / "
        f"|d_fp32| {rel:.4f}",
        "",
        "| phase | fp32 s | bf16 s | bf16 / fp32 |",
        "|---|---|---|---|",
    ]
    for phase in ("logprob", "regularize", "update"):
        f, h = (statistics.median(times[d][phase]) for d in ("float32", "bfloat16"))
        lines.append(f"| {phase} | {f:.2f} | {h:.2f} | {h / f:.2f} |")
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
