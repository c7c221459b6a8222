"""The synthetic scarce-target SFT experiment: does the Dr. regularizer beat both extremes?

Runs full training, target-only, global subset, layer-wise subset and the soft subset at three
temperatures on the built-in `scarce_target` task, over several seeds, and reports the held-out
target loss (final and best) as mean +- standard error, with a PNG of the mean curves.

    .venv/bin/python bench/sft_quality.py --seeds 5 --steps 3000 --out bench/out/sft_quality
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from drpt_ray.demo import SFT_LR, SFT_METHODS as METHODS, SFT_STEPS, mean_se
from drpt_ray.machine import machine_summary

def run_one(args: tuple[str, int, int, float, str]) -> dict:
    method, seed, steps, lr, out = args
    import torch

    torch.set_num_threads(1)  # two runs share the two cores
    from drpt_ray.demo import sft_spec
    from drpt_ray.trainer import run_job

    r = run_job(sft_spec(method, seed, Path(out) / "runs", steps=steps, lr=lr, progress=False, tensorboard=False))
    curve = [(h["step"], h["eval/target_loss"]) for h in r.history if "eval/target_loss" in h]
    evals = [v for _, v in curve]
    return {"method": method, "seed": seed, "final": evals[-1], "best": min(evals), "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=SFT_STEPS)
    ap.add_argument("--lr", type=float, default=SFT_LR)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="bench/out/sft_quality")
    args = ap.parse_args()
    machine = machine_summary()
    print(f"machine: {machine}", flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(m, s, args.steps, args.lr, str(out)) for s in range(args.seeds) for m in METHODS]
    results = []
    from tqdm import tqdm

    with ProcessPoolExecutor(args.workers) as pool:
        for r in tqdm(pool.map(run_one, jobs), total=len(jobs), desc="runs"):
            results.append(r)
    (out / "results.json").write_text(json.dumps(results))
    table = ["| method | final held-out target loss | best held-out target loss |", "|---|---|---|"]
    for m in METHODS:
        rs = [r for r in results if r["method"] == m]
        f, fse = mean_se([r["final"] for r in rs])
        b, bse = mean_se([r["best"] for r in rs])
        table.append(f"| {m} | {f:.3f} +- {fse:.3f} | {b:.3f} +- {bse:.3f} |")
    text = f"seeds={args.seeds} steps={args.steps} lr={args.lr}\nmachine: {machine}\n" + "\n".join(table)
    (out / "table.md").write_text(text + "\n")
    print(text)
    plot(results, out / "sft_quality.png")


def plot(results: list[dict], path: Path, methods=METHODS, ylabel: str = "held-out target loss (mean over seeds)",
         title: str = "Scarce-target SFT: curated general data vs the two extremes", log: bool = True) -> None:
    """Mean over seeds of each method's held-out curve (bench/sft_real.py draws its perplexities with it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in methods:
        curves = [r["curve"] for r in results if r["method"] == m]
        steps = [s for s, _ in curves[0]]
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
        ax.plot(steps, mean, label=m, lw=1.4 if m in ("full", "target_only") else 1.1)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
