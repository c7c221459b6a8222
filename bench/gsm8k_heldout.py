"""Held-out GSM8K before and after the reasoning-gym runs: does training on chain_sum make GSM8K worse?

SmolLM2-135M-Instruct as shipped, and the final model (its LoRA adapter merged in) of each run
directory given, answer the held-out GSM8K problems of `examples/gsm8k_smollm2.yaml` (its data spec:
the 64 originals outside its target pool), through the chat template, with the project's GSM8K
verifier (math-verify on the answer after the last '####', else the whole reply). Greedy, and
`--samples` samples per problem at the example's temperature (pass@1 = the mean). Transformers
`generate` in this process, left-padded batches: no Ray, no vLLM.

    .venv/bin/python bench/gsm8k_heldout.py runs/demo/real/seed0 runs/demo/real/seed1 runs/demo/real/seed2

Writes <out>/results.json and prints a markdown table (mean +- standard error over the runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drpt_ray.demo import mean_se  # noqa: E402
from drpt_ray.machine import machine_summary  # noqa: E402

EXAMPLE = ROOT / "examples" / "gsm8k_smollm2.yaml"


def problems(tokenizer) -> list:
    """The example's held-out GSM8K problems, prompts rendered with the chat template."""
    from drpt_ray.config import JobSpec, load_spec
    from drpt_ray.data.tasks import load_task, render_chat

    spec = load_spec(EXAMPLE, JobSpec)
    return render_chat(load_task(spec.data), tokenizer).eval, spec


def load(base: Path, run: Path | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if run is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, run / "model").merge_and_unload()
    return model.eval(), tok


def answers(model, tok, prompts: list[str], max_new_tokens: int, batch: int, **sampling) -> list[str]:
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id, **sampling)
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def score(model_name: str, base: Path, run: Path | None, args) -> dict:
    import torch

    from drpt_ray.rewards.tasks import gsm8k_verifier

    t0 = time.perf_counter()
    model, tok = load(base, run)
    pool, spec = problems(tok)
    pool = pool[: args.n]
    prompts = [e.prompt for e in pool]
    s = spec.rollout.sampling
    greedy = answers(model, tok, prompts, s.max_new_tokens, args.batch, do_sample=False)
    torch.manual_seed(args.seed)
    sampled = answers(model, tok, [p for p in prompts for _ in range(args.samples)], s.max_new_tokens, args.batch,
                      do_sample=True, temperature=s.temperature) if args.samples else []
    right = lambda e, r: gsm8k_verifier(e.prompt, r, e.scored_against, "eval")  # noqa: E731
    row = {"model": model_name, "problems": len(pool),
           "greedy": statistics.fmean(right(e, r) for e, r in zip(pool, greedy)),
           "seconds": time.perf_counter() - t0}
    if sampled:
        row["pass@1"] = statistics.fmean(right(e, r)
                                         for e, r in zip((e for e in pool for _ in range(args.samples)), sampled))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories holding model/ (a LoRA adapter of --base)")
    ap.add_argument("--base", type=Path, default=ROOT / "runs" / "smollm2",
                    help="the base model (drpt-ray models import smollm2)")
    ap.add_argument("--n", type=int, default=64, help="held-out problems (at most the example's 64)")
    ap.add_argument("--samples", type=int, default=4, help="sampled answers per problem (0: greedy only)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gsm8k_heldout")
    args = ap.parse_args()
    print(f"machine: {machine_summary()}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [score("SmolLM2 as shipped", args.base, None, args)]
    rows += [score(str(run), args.base, run, args) for run in args.runs]
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    after = rows[1:]
    keys = [k for k in ("greedy", "pass@1") if k in rows[0]]
    print(f"\nheld-out GSM8K ({rows[0]['problems']} problems of {EXAMPLE.name}), gsm8k verifier\n")
    print("| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    print(f"| {rows[0]['model']} | " + " | ".join(f"{rows[0][k]:.3f}" for k in keys) + " |")
    for r in after:
        print(f"| {r['model']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    print(f"| after ({len(after)} runs), mean +- SE | "
          + " | ".join("{:.3f} +- {:.3f}".format(*mean_se([r[k] for r in after])) for k in keys) + " |")


if __name__ == "__main__":
    main()
