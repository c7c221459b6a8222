"""Does the layer-wise subset stall or blow up? The scarce-target SFT experiment over many seeds.

Each run is `drpt_ray.demo.sft_spec` (the SFT demo's and bench/sft_quality.py's settings: tiny
Llama, 3000 steps, batch 8, one target example per step) and is classified from its held-out
target-loss curve by `drpt_ray.demo.sft_outcome` (learned / stalled / blew up / overfit; the rule is there).

Variants:
  full, global top-k 0.5, layerwise top-k 0.5   the demo's methods
  layerwise filter                              keep the rows whose score is >= 0 (selection: filter,
        frac 1.0) instead of the top half
  layerwise: <one change>                       layer-wise top-k 0.5 with one thing changed: 4 target
        examples per step, the embedding curated too, or lm_head / attention / MLPs left out of the
        curation (they then get the whole batch's gradient); `--seeds 1` gives the seed-0 ablation
  layerwise top-k 0.5 (official code)           the paper's own LayerWiseSubset (github.com/TRAIS-Lab/
        Dr.Post-Training, package drpt/) on the same model, batches, optimizer and schedule: with
        `--official DIR` (a checkout of that repository) the learner's SFT step is replaced by the
        paper's merged-batch step (exact scores, `scoring_method="direct"`; every Linear and the
        embedding hooked, as its full fine-tuning configs do, and ours with `hook_embeddings`; RMSNorm
        weights get the train rows' gradient). Only the gradient assembly differs from ours, so the
        runs compare the two implementations over many steps, not one (on the first 50 steps of
        seed 0 the losses agree to 6 decimals with ours at `hook_embeddings: true`).

    .venv/bin/python bench/layerwise_stability.py --seeds 10 --official /path/to/Dr.Post-Training

Finished runs are kept in <out>/results.json and reused by a rerun with the same steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from drpt_ray.demo import SFT_METHODS, SFT_STEPS, mean_se, sft_outcome

OFFICIAL = "layerwise top-k 0.5 (official code)"
LW = SFT_METHODS["layerwise top-k 0.5"]
# Beyond the demo's methods, name -> (regularizer, other JobSpec fields): filtering (keep the rows
# with s >= 0) instead of the top half, and layer-wise top-k 0.5 with one thing changed (the ablations).
EXTRA: dict[str, tuple[dict, dict]] = {
    "layerwise filter": ({"feasible_set": "layerwise_subset", "selection": "filter", "frac": 1.0}, {}),
    "layerwise: 4 target examples": (LW, {"target_batch_size": 4}),
    "layerwise: embedding curated": (LW | {"hook_embeddings": True}, {}),
    "layerwise: lm_head not curated": (LW | {"exclude": ["lm_head"]}, {}),
    "layerwise: attention not curated": (LW | {"exclude": ["self_attn"]}, {}),
    "layerwise: MLPs not curated": (LW | {"exclude": ["mlp"]}, {}),
}
VARIANTS = ["full", "global top-k 0.5", "layerwise top-k 0.5", OFFICIAL, *EXTRA]
LEFT_PLATEAU = 1.0  # "left the plateau": the first evaluation below this held-out loss (the plateau is ~1.7)


def use_official_layerwise(official: str, frac: float) -> None:
    """Replace `Learner.sft_step` by the official LayerWiseSubset's merged-batch step (this process only).

    A bench-only substitution: the Learner still builds everything else (model, optimizer,
    schedule, clipping), so the two runs differ in the regularized backward alone."""
    os.environ["TORCH_COMPILE_DISABLE"] = "1"  # its score kernels are torch.compile'd; eager on CPU
    sys.path.insert(0, official)
    from drpt import GradientHook
    from drpt.selection import create_merged_batch_strategy

    from drpt_ray.learner import learner as L
    from drpt_ray.lm_losses import concat_rows, token_mean_loss

    def sft_step(self, general: dict, target: dict | None) -> dict:
        if not hasattr(self, "official"):
            names = [b.name for b in self.reg.blocks]  # what ours hooks at hook_embeddings: every Linear, the embedding
            # Registered after ours, so its forwards wrap ours; ours then only ever sees plain backwards.
            self.official = create_merged_batch_strategy("LayerWiseSubset", GradientHook(self.policy, names, "cpu"),
                                                         frac=frac, scoring_method="direct")
        merged = concat_rows(general, target)
        self.opt.zero_grad(set_to_none=True)
        loss = self.official.execute_training_step(
            model=self.policy, merged_batch=merged, train_batch_size=general["input_ids"].shape[0],
            compute_loss_fn=token_mean_loss, lr=self.opt.param_groups[0]["lr"])
        return {"loss": float(loss), **self._optimizer_step()}

    L.Learner.sft_step = sft_step


def run_one(job: tuple[str, int, int, str, str | None]) -> dict:
    variant, seed, steps, out, official = job
    import torch

    torch.set_num_threads(1)  # runs share the cores
    from drpt_ray.config import JobSpec
    from drpt_ray.demo import sft_spec
    from drpt_ray.trainer import run_job

    method = variant
    if variant == OFFICIAL:
        method = "layerwise top-k 0.5"
        use_official_layerwise(official, SFT_METHODS[method]["frac"])
    reg, fields = EXTRA.get(variant, (None, {}))
    spec = sft_spec(method, seed, Path(out) / "runs" / "".join(c if c.isalnum() else "_" for c in variant),
                    steps=steps, reg=reg, progress=False, tensorboard=False)
    spec = JobSpec.model_validate(spec.model_dump() | fields)
    if variant == OFFICIAL:  # its step merges the target row into the general batch; its configs hook the embedding
        spec = spec.model_copy(update={"regularizer": spec.regularizer.model_copy(
            update={"target_mode": "merged", "hook_embeddings": True})})
    h = run_job(spec).history
    curve = [(m["step"], m["eval/target_loss"]) for m in h if "eval/target_loss" in m]
    losses = [m["loss"] for m in h if "loss" in m]
    return {"variant": variant, "seed": seed, "curve": curve, **sft_outcome(curve, losses)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=SFT_STEPS)
    ap.add_argument("--variants", default=None, help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--official", default=None,
                    help="a checkout of TRAIS-Lab/Dr.Post-Training (for the official variant)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="bench/out/layerwise_stability")
    args = ap.parse_args()
    from drpt_ray.machine import machine_summary

    machine = machine_summary()
    print(f"machine: {machine}", flush=True)
    variants = args.variants.split(",") if args.variants else VARIANTS
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {VARIANTS}")
    if OFFICIAL in variants and not args.official:
        variants.remove(OFFICIAL)
        print(f"no --official checkout: '{OFFICIAL}' left out", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    done = {(r["variant"], r["seed"]): r for r in old.get("runs", []) if old.get("steps") == args.steps}
    jobs = [(v, s, args.steps, str(out), args.official) for v in variants
            for s in range(args.seeds) if (v, s) not in done]
    print(f"{len(done)} finished run(s) reused, {len(jobs)} to run", flush=True)
    with ProcessPoolExecutor(args.workers, max_tasks_per_child=1) as pool:  # one process per run: patches stay local
        for r in pool.map(run_one, jobs):
            done[r["variant"], r["seed"]] = r
            print(f"{r['variant']} seed {r['seed']}: {r['outcome']}, final {r['final']:.3f}, "
                  f"longest plateau {r['plateau_steps']} steps", flush=True)
            path.write_text(json.dumps({"steps": args.steps, "runs": list(done.values())}))
    report([r for r in done.values() if r["variant"] in variants and r["seed"] < args.seeds],
           variants, out, args, machine)


def report(runs: list[dict], variants: list[str], out: Path, args, machine: str) -> None:
    from sft_quality import plot

    lines = ["| variant | seeds | learned | stalled | blew up | overfit | final held-out loss | "
             f"longest plateau (steps): median, max | first step below {LEFT_PLATEAU}: median, max | "
             "per seed (final) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:  # the rule as it is now (a run's losses are kept only as "blew up" or not)
        r.update(sft_outcome(r["curve"], [float("nan")] if r["outcome"] == "blew up" else []))
    for v in variants:
        rs = sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"])
        if not rs:
            continue
        f, se = mean_se([r["final"] for r in rs])
        count = {o: sum(r["outcome"] == o for r in rs) for o in ("learned", "stalled", "blew up", "overfit")}
        plateaus = sorted(r["plateau_steps"] for r in rs)
        left = sorted(next((step for step, v in r["curve"] if v < LEFT_PLATEAU), math.inf) for r in rs)
        left_cell = ", ".join("never" if x == math.inf else str(x) for x in (left[len(rs) // 2], left[-1]))
        per_seed = " / ".join(f"{r['final']:.2f}" + ("*" if r["outcome"] != "learned" else "") for r in rs)
        lines.append(f"| {v} | {len(rs)} | {count['learned']} | {count['stalled']} | {count['blew up']} | "
                     f"{count['overfit']} | {f:.3f} +- {se:.3f} | {plateaus[len(rs) // 2]}, {plateaus[-1]} | "
                     f"{left_cell} | {per_seed} |")
    text = f"seeds={args.seeds} steps={args.steps} (* = not learned)\nmachine: {machine}\n\n" + "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    print(text)
    plot([{"method": r["variant"], "curve": r["curve"]} for r in runs], out / "layerwise_stability.png",
         methods=[v for v in variants if any(r["variant"] == v for r in runs)],
         title="Scarce-target SFT over seeds: layer-wise vs the paper's code")


if __name__ == "__main__":
    main()
