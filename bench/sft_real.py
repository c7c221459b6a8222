"""The paper's scarce-target SFT experiment (method.md 5.1-5.2, the perplexity table) at our scale:
SmolLM2-135M-Instruct + LoRA on GSM8K.

Target: a few original GSM8K worked solutions (`data.n_target`); held-out: other originals;
general: worked solutions of variants generated from the other problems' templates (the `gsm8k`
task). Methods: full training on the general pool, target-only, and the Dr. layer-wise and global
top-k subsets. Reported per method over seeds: held-out target perplexity (exp of the token-mean
loss) at its minimum over the run, at the end, and final / min (above 1: the run overfits and
its best point is behind it), mean +- standard error, with a PNG of the mean curves.

`--general misaligned` replaces the general pool by one that is really misaligned with the target
(the same number of examples, written to jsonl files under --out and read through data.general_path,
as a user's own data would be): a third are the variants as above, a third are variants whose final
answer is wrong (the "#### N" line and the last line's N replaced by another number), and a third
are other tasks' solutions (reasoning-gym's leg_counting, letter_counting and basic_arithmetic,
answered "The answer is X."). Target and held-out pools are unchanged.

    .venv/bin/drpt-ray models import smollm2 runs/smollm2
    .venv/bin/python bench/sft_real.py --seeds 3 --out bench/out/sft_real
    .venv/bin/python bench/sft_real.py --seeds 3 --general misaligned --out bench/out/sft_real_misaligned
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from drpt_ray.demo import SFT_METHODS, mean_se  # noqa: E402
from drpt_ray.machine import machine_summary  # noqa: E402
from sft_quality import plot  # noqa: E402  (a sibling script, not a package)

METHODS = ("target_only", "full", "layerwise top-k 0.5", "global top-k 0.5")


N_GENERAL = 2000
OTHER_TASKS = ("leg_counting", "letter_counting", "basic_arithmetic")


def wrong_answer(solution: str, rng: random.Random) -> str:
    """The solution with its final number N replaced by another, in the "#### N" line and in the line
    before it: the working reaches a wrong result."""
    body, _, answer = solution.rpartition("####")
    n = answer.strip()
    if not re.fullmatch(r"-?\d+", n.replace(",", "")):
        return solution
    wrong = str(int(n.replace(",", "")) + rng.choice([-1, 1]) * rng.randint(1, 9))
    lines = body.rstrip("\n").split("\n")
    lines[-1] = re.sub(rf"(?<![\d.]){re.escape(n)}(?![\d.])", wrong, lines[-1])
    return "\n".join(lines) + f"\n#### {wrong}"


def misaligned_files(seed: int, args: argparse.Namespace) -> dict:
    """Write the pools of `--general misaligned` for `seed` (module docstring) and return the data
    section that reads them."""
    from drpt_ray.config import DataSpec, ReasoningGymSpec
    from drpt_ray.data import gsm8k, reasoning_gym

    pools = gsm8k.load(args.n_target, args.n_eval, N_GENERAL, seed)
    rng = random.Random(seed)
    third = len(pools.general) // 3
    other = reasoning_gym.load(DataSpec(task="reasoning_gym", n_target=1, n_eval=1, n_general=third, seed=seed,
                                        reasoning_gym=ReasoningGymSpec(target=[{"name": n} for n in OTHER_TASKS],
                                                                       general_format_frac=0.0))).general
    general = ([(e.prompt, e.response) for e in pools.general[:third]]
               + [(e.prompt, wrong_answer(e.response, rng)) for e in pools.general[third:2 * third]]
               + [(e.prompt + "\n", " " + e.response) for e in other])
    rng.shuffle(general)
    root = Path(args.out).resolve() / "data" / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("general", general), ("target", [(e.prompt, e.response) for e in pools.target]),
                       ("eval", [(e.prompt, e.response) for e in pools.eval])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    return {"task": None, "general_path": str(root / "general.jsonl"), "target_path": str(root / "target.jsonl"),
            "eval_path": str(root / "eval.jsonl")}


def spec(method: str, seed: int, args: argparse.Namespace):
    from drpt_ray.config import JobSpec

    reg = SFT_METHODS[method]
    return JobSpec(
        mode="sft", steps=args.steps, seed=seed, batch_size=args.batch_size,
        # target-only trains on the target pool at the general batch size; the regularizers see a
        # small target batch per step, as the paper's runs do.
        target_batch_size=args.batch_size if reg["feasible_set"] == "target_only" else args.target_batch_size,
        model={"path": args.model, "lora": {"r": 16, "alpha": 32}},
        # plain text, no chat template: the loss is on the worked solution either way, and the template's
        # system turn would add ~30 tokens to every example on a CPU where tokens are the cost
        data=({"task": "gsm8k", "n_target": args.n_target, "n_eval": args.n_eval, "n_general": N_GENERAL}
              if args.general == "variants" else misaligned_files(seed, args))
        | {"max_len": args.max_len, "seed": seed, "chat_template": False},
        regularizer=reg, optim={"lr": args.lr, "warmup_frac": 0.0, "schedule": "constant"},
        eval_every=args.eval_every, progress=False, tensorboard=False, checkpoint={"resume": False},
        output_dir=str(Path(args.out) / "runs" / method.replace(" ", "_") / f"seed{seed}"),
    )


def run_one(job: tuple[str, int, argparse.Namespace]) -> dict:
    method, seed, args = job
    import torch

    torch.set_num_threads(args.threads)
    from drpt_ray.trainer import run_job

    r = run_job(spec(method, seed, args))
    curve = [(h["step"], math.exp(h["eval/target_loss"])) for h in r.history if "eval/target_loss" in h]
    steps = [h for h in r.history if "time/step" in h]
    ppl = [p for _, p in curve]
    return {"method": method, "seed": seed, "min": min(ppl), "final": ppl[-1], "ratio": ppl[-1] / min(ppl),
            "start": ppl[0], "curve": curve, "s_per_step": statistics.median(h["time/step"] for h in steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/smollm2", help="directory of `drpt-ray models import smollm2`")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--target-batch-size", type=int, default=1)
    ap.add_argument("--n-target", type=int, default=8)
    ap.add_argument("--n-eval", type=int, default=12)
    ap.add_argument("--max-len", type=int, default=448)  # the longest GSM8K solution: 380 tokens
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--general", choices=("variants", "misaligned"), default="variants",
                    help="the general pool: GSM8K variants, or a really misaligned pool (module docstring)")
    ap.add_argument("--workers", type=int, default=1, help="runs at once")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--out", default="bench/out/sft_real")
    args = ap.parse_args()
    machine = machine_summary()
    print(f"machine: {machine}", flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.model = str(Path(args.model).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Runs already in results.json (an interrupted invocation with the same --out) are kept, not re-run.
    done = out / "results.json"
    results = [r for r in json.loads(done.read_text()) if r["seed"] < args.seeds] if done.exists() else []
    finished = {(r["method"], r["seed"]) for r in results}
    jobs = [(m, s, args) for s in range(args.seeds) for m in METHODS if (m, s) not in finished]
    from tqdm import tqdm

    with ProcessPoolExecutor(args.workers) as pool:
        for r in tqdm(pool.map(run_one, jobs), total=len(jobs), desc=f"runs ({len(finished)} kept)"):
            results.append(r)
            (out / "results.json").write_text(json.dumps(results))  # a cut-off run keeps what finished
    table = ["| method | min ppl | final ppl | final / min | s per step |", "|---|---|---|---|---|"]
    for m in METHODS:
        rs = [r for r in results if r["method"] == m]
        cells = [mean_se([r[k] for r in rs]) for k in ("min", "final", "ratio")]
        table.append(f"| {m} | " + " | ".join(f"{v:.3f} +- {se:.3f}" for v, se in cells)
                     + f" | {statistics.median(r['s_per_step'] for r in rs):.1f} |")
    start = statistics.fmean(r["start"] for r in results)
    text = (f"general={args.general} seeds={args.seeds} steps={args.steps} lr={args.lr} batch={args.batch_size} "
            f"n_target={args.n_target} n_eval={args.n_eval}; held-out perplexity before training "
            f"{start:.3f}\nmachine: {machine}\n"
            + "\n".join(table))
    (out / "table.md").write_text(text + "\n")
    print(text)
    for r in results:
        print(f"  {r['method']:>22} seed {r['seed']}: min {r['min']:.3f} final {r['final']:.3f} ratio {r['ratio']:.3f}")
    plot(results, out / "sft_real.png", METHODS, "held-out GSM8K perplexity (mean over seeds)",
         "SmolLM2-135M + LoRA, scarce-target SFT on GSM8K", log=False)


if __name__ == "__main__":
    main()
