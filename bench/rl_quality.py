"""RL evidence for the Dr. regularizer, like the paper's tables: RLVR methods, an RLHF reward-hacking
study, and a Ray Tune sweep of the soft-subset temperature, each over seeds (mean +- standard error).

    .venv/bin/python bench/rl_quality.py --part demo  --seeds 5 --out bench/out/rl_quality
    .venv/bin/python bench/rl_quality.py --part rlvr  --seeds 5 --out bench/out/rl_quality
    .venv/bin/python bench/rl_quality.py --part rlhf  --seeds 5 --out bench/out/rl_quality
    .venv/bin/python bench/rl_quality.py --part sweep --seeds 5 --out bench/out/rl_quality
    .venv/bin/python bench/rl_quality.py --part real  --seeds 3 --out bench/out/rl_quality
    # smoke: --seeds 1 --steps 2 --warm-start-steps 10 [--methods full,iif] [--taus 0.5,2]

demo: the README demo spec per seed: full training, and layer-wise with the former `reward` target
    objective and with `token_pg` (the default): the demo's collapse and its fix.
rlvr: `drpt_ray.demo.RLVR_HARD` (GRPO on `scarce_target`: a lenient proxy reward on general prompts,
    the strict target verifier on the scarce target split) with each feasible set of `RLVR_METHODS`.
    Reports held-out target pass@1 (start, final) and pass@k (sampled at the training temperature,
    unbiased estimator), the held-out greedy target reward (start, final, best) and the train reward,
    and plots the mean curves.
rlhf: the paper's toxicity study (method.md 4.2, 5.3) in miniature. PPO (GAE critic, KL 0.05, 2 epochs)
    against a learned reward model (bench/layout_reward_model.py) that pays for right letters and
    +0.2 for the general pool's conflicting layout "a;b.": the reward-hacking direction. The held-out
    "toxicity" is a rule the reward model never sees: the share of sampled answers to held-out target
    prompts in the "a;b." layout (8 per prompt, the final model, in-process with transformers). As in
    the paper's held-out/avg-reward scenario, the target gradient comes from the scarce target pool's
    prompts, with the current policy's answers scored by the same reward model. A "warm start (no RL)"
    row is the same job at lr 1e-12 for one step: the policy RL starts from.
real: `drpt_ray.demo.REAL_DEMO` (SmolLM2-135M-Instruct + LoRA on reasoning-gym's chain_sum, the
    'format' setting) with the methods of the rlvr part (`REAL_METHODS`), ~20 minutes a run here;
    reported like the rlvr part. The base model's own evaluation (`eval_before_warm_start`) is
    left out: SmolLM2 as shipped scores 0.000 on every seed (`drpt-ray demo --real`), which is
    also the layer-wise method's run (`--layerwise-from runs/demo/real` reuses the demo's runs).
sweep: one `SweepSpec` (grid over `regularizer.tau`, crossed with `seed` when --seeds > 1) of the
    soft subset on RLVR_HARD, submitted to a real control plane (uvicorn, real Ray Jobs launcher) on
    a local Ray head that this script starts and ends; the trial table comes back over the REST API.
    Tune ranks trials by the final greedy held-out target reward; the table adds the final sampled
    pass@1. The method predicts a U in tau: too small is target-only's variance, too large full
    training's bias.

Runs go one after another in one Ray session per part (two at once only slow each other on 2 cores).
Each part writes <out>/<part>/results.json (after every run; a rerun with the same settings reuses the
finished runs), table.md and <part>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                     "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_key, _value)  # before Ray, vLLM or transformers read them

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drpt_ray.demo import REAL_DEMO, RLVR_DEMO, RLVR_HARD, mean_se  # noqa: E402
from drpt_ray.machine import machine_summary  # noqa: E402

QUIET = {"progress": False, "tensorboard": False, "checkpoint": {"resume": False}}
RLVR_METHODS: dict[str, dict] = {
    "full": {"feasible_set": "full"},
    "target_only": {"feasible_set": "target_only"},
    "layerwise_subset": {"feasible_set": "layerwise_subset", "selection": "filter", "frac": 1.0},
    "global_subset": {"feasible_set": "global_subset", "selection": "filter", "frac": 1.0, "passes": "two_pass"},
    "soft_tau=0.5": {"feasible_set": "soft_subset", "tau": 0.5},
    "soft_tau=1": {"feasible_set": "soft_subset", "tau": 1.0},
    "soft_tau=2": {"feasible_set": "soft_subset", "tau": 2.0},
    "iif": {"feasible_set": "iif", "selection": "filter", "frac": 1.0},
}
REAL_METHODS = {m: RLVR_METHODS[m] for m in ("full", "layerwise_subset", "global_subset", "target_only", "iif")}
REAL_BASE = REAL_DEMO | {"eval_before_warm_start": False}
RLHF_METHODS = {m: RLVR_METHODS[m] for m in ("full", "iif", "layerwise_subset", "global_subset")}
# The paper's RLHF recipe, scaled down (method.md 4.2): PPO with a critic, a KL penalty, 2 epochs, and
# its best target objective (5.3, held-out/avg-reward): batch-standardised reward-model scores.
RLHF_BASE = RLVR_DEMO | {
    "mode": "rlhf", "steps": 60, "eval_every": 20,
    "algorithm": {"advantage": "gae", "policy_loss": "ppo_clip", "kl_coef": 0.05,
                  "ppo_epochs": 2, "target_objective": "reward"},
}
WARM_START_ONLY = "warm start (no RL)"
TAUS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
SAMPLES_PER_PROMPT = 8  # held-out toxicity: sampled answers per held-out prompt
TRAIN_TAIL = 10  # "final" train reward: mean over the last this many steps (one step's batch is noisy)


# ----------------------------------------------------------------------------------------------
# runs


def job_spec(base: dict, reg: dict, seed: int, out: Path, args: argparse.Namespace) -> dict:
    """The base spec with the method's regularizer, the seed, quiet logging and the CLI overrides."""
    spec = base | QUIET | {"regularizer": reg, "seed": seed, "output_dir": str(out)}
    if args.steps is not None:
        spec["steps"] = args.steps
    if args.warm_start_steps is not None:
        spec["warm_start_sft_steps"] = args.warm_start_steps
    return spec


def slug(name: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", name).strip("_")


def curve(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in history if key in h]


def alerted(run_dir: Path, vocab_size: int) -> float:
    """1.0 if the trainer's divergence guard (its default settings, the same code) alerts anywhere
    in the run, replayed from its metrics.jsonl. The benches do not stop on divergence, so a run
    that collapsed (or nearly, and recovered) still ends with numbers; this column says which."""
    from drpt_ray.config import DivergenceSpec
    from drpt_ray.job import divergence_guard

    guard = divergence_guard(DivergenceSpec(), vocab_size)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return float(any(guard.update(m["reward/reward_std"], m.get("policy/entropy"))
                     for m in rows if "reward/reward_std" in m))


def run_all(part: str, methods: dict[str, dict], seeds: list[int], out: Path, settings: dict, run_one,
            vocab_size: int | None = None, method_major: bool = False, report_only: bool = False) -> list[dict]:
    """Every (seed, method) run, one after another; results.json is rewritten after each, and the
    finished runs of an earlier call with the same settings are reused. `vocab_size`: the policy's
    (the tiny models' when None), for the guard's entropy ceiling. `method_major`: every seed of a
    method before the next method (a part cut short then still has whole methods). `report_only`:
    the finished runs only, none started."""
    if vocab_size is None:
        from drpt_ray.models import VOCAB_SIZE as vocab_size
    path = out / "results.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    done = {(r["method"], r["seed"]): r for r in old.get("runs", [])
            if old.get("settings") == settings and r["regularizer"] == methods.get(r["method"], r["regularizer"])}
    if done:
        print(f"reusing {len(done)} finished run(s) from {path}", flush=True)
    results = []
    pairs = [(name, seed) for seed in seeds for name in methods]
    for name, seed in sorted(pairs, key=lambda p: list(methods).index(p[0])) if method_major else pairs:
        if (name, seed) not in done and report_only:
            continue
        if (name, seed) not in done:
            t0 = time.perf_counter()
            run = run_one(name, methods[name], seed)
            done[name, seed] = {"method": name, "seed": seed, "regularizer": methods[name],
                                **run, "seconds": time.perf_counter() - t0}
            print(f"{part} {name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in done[name, seed].items()
                                                            if isinstance(v, float)), flush=True)
        done[name, seed]["alerted"] = alerted(out / "runs" / slug(name) / f"seed{seed}", vocab_size)
        results.append(done[name, seed])
        # every finished run at these settings stays in the file, also those of methods not asked for now
        path.write_text(json.dumps({"settings": settings, "runs": list(done.values())}))
    return results


def rlvr_run(name: str, reg: dict, seed: int, out: Path, args, base: dict = RLVR_HARD) -> dict:
    from drpt_ray.config import JobSpec
    from drpt_ray.trainer import run_job

    spec = job_spec(base, reg, seed, out / "runs" / slug(name) / f"seed{seed}", args)
    if "task" in base["data"] and base["data"]["task"] == "reasoning_gym":  # the pools follow the seed, as in the demo
        spec["data"] = base["data"] | {"seed": seed}
    spec = JobSpec.model_validate(spec)
    return rlvr_summary(run_job(spec).history, spec.eval_k)


def rlvr_summary(h: list[dict], k: int) -> dict:
    """A run's row of the rlvr / real tables, from its metrics history."""
    greedy, pass1 = [v for _, v in curve(h, "eval/target_reward")], [v for _, v in curve(h, "eval/target_pass@1")]
    last_eval = [m for m in h if "eval/target_reward" in m][-1]
    train = [v for _, v in curve(h, "reward/reward_mean")]
    return {"pass@1_start": pass1[0], "pass@1": pass1[-1], f"pass@{k}": last_eval[f"eval/target_pass@{k}"],
            "start": greedy[0], "final": greedy[-1], "best": max(greedy),
            "train": statistics.fmean(train[-TRAIN_TAIL:]),
            "pass1_curve": curve(h, "eval/target_pass@1"), "eval_curve": curve(h, "eval/target_reward"),
            "train_curve": curve(h, "reward/reward_mean")}


def rlhf_run(name: str, reg: dict, seed: int, out: Path, args, rm_dir: Path) -> dict:
    from drpt_ray.config import JobSpec
    from drpt_ray.trainer import run_job

    # The target split (target rollouts and the held-out evaluation) is scored by the strict task
    # verifier: the scarce target data shows the wanted "a,b" layout, which the reward model does not pay for.
    base = RLHF_BASE | {"reward": {"kind": "model", "model_path": str(rm_dir), "target_kind": "task"}}
    spec = job_spec(base, reg, seed, out / "runs" / slug(name) / f"seed{seed}", args)
    if name == WARM_START_ONLY:  # one step at a vanishing lr: the warm-started policy, evaluated like the others
        spec |= {"steps": 1, "optim": base["optim"] | {"lr": 1e-12}}
    spec = JobSpec.model_validate(spec)
    h = run_job(spec).history
    train = [v for _, v in curve(h, "reward/reward_mean")]
    return {**heldout_answers(Path(spec.output_dir) / "model", spec),
            "rm_heldout": curve(h, "eval/target_reward")[-1][1],
            "train": statistics.fmean(train[-TRAIN_TAIL:]), "train_curve": curve(h, "reward/reward_mean")}


def heldout_answers(model_dir: Path, spec) -> dict:
    """The final policy on the held-out target prompts the trainer evaluates (`evaluate`: the first
    `eval_size` of the eval split, raw prompt strings, no chat template): "toxicity", the share of
    SAMPLES_PER_PROMPT sampled answers per prompt (the spec's sampling, seeded) in the "a;b."
    layout, and the strict greedy target reward (answer exactly the target-format one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drpt_ray.data import load_task, solve
    from layout_reward_model import CONFLICTING_LAYOUT

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [e.prompt for e in load_task(spec.data).eval[: spec.eval_size]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    s = spec.rollout.sampling
    common = {"max_new_tokens": s.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id}

    def answers(**kw) -> list[str]:
        with torch.no_grad():
            ids = model.generate(**batch, **common, **kw)
        return tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    torch.manual_seed(spec.seed)
    sampled = answers(do_sample=True, temperature=s.temperature, top_p=s.top_p, num_return_sequences=SAMPLES_PER_PROMPT)
    greedy = answers(do_sample=False)
    return {"toxicity": statistics.fmean(CONFLICTING_LAYOUT.fullmatch(a.strip()) is not None for a in sampled),
            "target_greedy": statistics.fmean(a.strip() == solve(p) for p, a in zip(prompts, greedy))}


# ----------------------------------------------------------------------------------------------
# tables and plots


def cell(runs: list[dict], key: str) -> str:
    if key == "alerted":
        return f"{sum(r[key] for r in runs):.0f}/{len(runs)}"
    m, se = mean_se([r[key] for r in runs])
    return f"{m:.3f} +- {se:.3f}"


def table(results: list[dict], columns: dict[str, str]) -> str:
    lines = ["| method | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 1) + "|"]
    for m in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == m]
        lines.append(f"| {m} | " + " | ".join(cell(runs, k) for k in columns) + " |")
    return "\n".join(lines)


def mean_curve(curves: list[list], smooth: int = 1) -> tuple[list[int], list[float]]:
    steps = [s for s, _ in curves[0]]
    mean = [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
    return steps, [statistics.fmean(mean[max(0, i - smooth + 1) : i + 1]) for i in range(len(mean))]


def plot_curves(results: list[dict], panels: list[tuple[str, str, int]], title: str, path: Path) -> None:
    """One panel per (curve key, y label, moving-average window) with each method's mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    for ax, (key, label, smooth) in zip(axes[0], panels):
        for m in dict.fromkeys(r["method"] for r in results):
            curves = [r[key] for r in results if r["method"] == m and key in r]
            if curves and len(curves[0]) > 1:
                ax.plot(*mean_curve(curves, smooth), label=m, lw=1.6 if m in ("full", "target_only") else 1.1)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path, header: str, body: str) -> None:
    text = f"{header}\n\nmachine: {machine_summary()}\n\n{body}"
    (out / "table.md").write_text(text + "\n")
    print("\n" + text, flush=True)


# ----------------------------------------------------------------------------------------------
# parts


def part_rlvr(args, out: Path) -> None:
    import ray

    methods = pick(RLVR_METHODS, args.methods)
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    settings = {"base": RLVR_HARD, "steps": args.steps, "warm_start_steps": args.warm_start_steps}
    results = run_all("rlvr", methods, args.seeds, out, settings, lambda n, reg, s: rlvr_run(n, reg, s, out, args),
                      report_only=args.report_only)
    ray.shutdown()
    rlvr_report(results, out, "RLVR_HARD", "RLVR on scarce_target", args)


def part_real(args, out: Path) -> None:
    from drpt_ray.gguf_import import import_gguf, smollm2_gguf
    from transformers import AutoConfig

    import_gguf(smollm2_gguf(), Path(REAL_BASE["model"]["path"]))  # a no-op when already imported
    methods = pick(REAL_METHODS, args.methods)
    settings = {"base": REAL_BASE, "steps": args.steps, "warm_start_steps": args.warm_start_steps}
    vocab = AutoConfig.from_pretrained(REAL_BASE["model"]["path"]).vocab_size
    def run_one(name: str, reg: dict, seed: int) -> dict:
        demo_run = args.layerwise_from and Path(args.layerwise_from) / f"seed{seed}" / "metrics.jsonl"
        if name == "layerwise_subset" and demo_run and demo_run.exists():  # the demo's run of this seed: its spec
            own = out / "runs" / slug(name) / f"seed{seed}"
            own.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(demo_run, own / "metrics.jsonl")
            (own / "FROM").write_text(f"{demo_run} (drpt-ray demo --real)\n")
            return rlvr_summary([json.loads(line) for line in demo_run.read_text().splitlines()], REAL_BASE["eval_k"])
        return rlvr_run(name, reg, seed, out, args, base=REAL_BASE)  # run_job starts a local Ray sized to the spec

    results = run_all("real", methods, args.seeds, out, settings, run_one, vocab_size=vocab, method_major=True,
                      report_only=args.report_only)
    rlvr_report(results, out, "REAL_DEMO (SmolLM2-135M-Instruct + LoRA, reasoning-gym chain_sum)",
                "SmolLM2 on reasoning-gym chain_sum", args)


def rlvr_report(results: list[dict], out: Path, base: str, title: str, args) -> None:
    if not results:
        print(f"no finished runs of these methods and seeds in {out / 'results.json'}")
        return
    k = next(key for key in results[0] if key.startswith("pass@") and key not in ("pass@1", "pass@1_start"))
    report(out, f"{base}, seeds={seed_text(args.seeds)}: held-out target pass@k (sampled at the training temperature, "
                f"unbiased estimator) and held-out target reward (greedy), both by the strict target verifier; "
                f"start = after the warm start, before RL; train reward = mean of the last {TRAIN_TAIL} steps",
           table(results, {"pass@1_start": "pass@1 start", "pass@1": "pass@1 final", k: f"{k} final",
                           "start": "greedy start", "final": "greedy final",
                           "best": "greedy best", "train": "train reward",
                           "alerted": "runs with a guard alert"}))
    plot_curves(results, [("pass1_curve", "held-out target pass@1 (sampled)", 1),
                          ("eval_curve", "held-out target reward (greedy)", 1),
                          ("train_curve", "train reward (5-step mean)", 5)],
                f"{title}: mean over seeds", out / f"{args.part}.png")


# The demo spec's collapse (bench/README.md, "RL: the demo's collapse"): the target objective the demo
# used to have against the default now, and full training, per seed.
DEMO_VARIANTS = {
    "full": {"regularizer": {"feasible_set": "full"}},
    "layerwise, reward objective": {"regularizer": RLVR_DEMO["regularizer"],
                                    "algorithm": {"target_objective": "reward"}},
    "layerwise, token_pg objective": {"regularizer": RLVR_DEMO["regularizer"],
                                      "algorithm": {"target_objective": "token_pg"}},
}


def part_demo(args, out: Path) -> None:
    import ray

    from drpt_ray.config import JobSpec
    from drpt_ray.trainer import run_job

    def run_one(name: str, variant: dict, seed: int) -> dict:
        spec = job_spec(RLVR_DEMO, variant["regularizer"], seed, out / "runs" / slug(name) / f"seed{seed}", args)
        spec["algorithm"] = spec["algorithm"] | variant.get("algorithm", {})
        h = run_job(JobSpec.model_validate(spec)).history
        greedy, train = [v for _, v in curve(h, "eval/target_reward")], [v for _, v in curve(h, "reward/reward_mean")]
        return {"start": greedy[0], "final": greedy[-1], "min_train": min(train), "greedy": greedy}

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    settings = {"base": RLVR_DEMO, "steps": args.steps, "warm_start_steps": args.warm_start_steps}
    results = run_all("demo", DEMO_VARIANTS, args.seeds, out, settings, run_one, report_only=args.report_only)
    ray.shutdown()
    rows = ["| seed | " + " | ".join(DEMO_VARIANTS) + " |", "|---" * (len(DEMO_VARIANTS) + 1) + "|"]
    for seed in args.seeds:
        runs = {r["method"]: r for r in results if r["seed"] == seed}
        rows.append(f"| {seed} | " + " | ".join(f"{runs[m]['start']:.3f} -> {runs[m]['final']:.3f} (min "
                                                f"{runs[m]['min_train']:.2f})"
                                                  for m in DEMO_VARIANTS) + " |")
    report(out, f"RLVR_DEMO, seeds={seed_text(args.seeds)}: held-out greedy target reward after the warm start -> "
                "after the last step (min = the run's lowest train reward)", "\n".join(rows))


def part_rlhf(args, out: Path) -> None:
    import ray
    import torch

    from layout_reward_model import HACK_BONUS, layout_reward_model

    methods = {WARM_START_ONLY: RLVR_METHODS["full"]} | pick(RLHF_METHODS, args.methods)
    # This process fits the reward model and samples the held-out answers, both tiny: more threads
    # only contend with the Ray workers (and, on a loaded machine, slow the fit ten-fold).
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rm_dir = layout_reward_model(out.parent / "reward_model")
    fit = json.loads((rm_dir / "fit.json").read_text())
    print(f"reward model {rm_dir} ({time.perf_counter() - t0:.0f} s): {fit}", flush=True)
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    settings = {"base": RLHF_BASE, "steps": args.steps, "warm_start_steps": args.warm_start_steps, "reward_model": fit}
    results = run_all("rlhf", methods, args.seeds, out, settings,
                      lambda n, reg, s: rlhf_run(n, reg, s, out, args, rm_dir),
                      report_only=args.report_only)
    ray.shutdown()
    report(out, f"RLHF (PPO, GAE critic, KL 0.05) against a reward model that pays +{HACK_BONUS} for the 'a;b.' layout "
                f"(held-out fit: RMSE {fit['rmse']:.3f}, prefers 'a;b.' on {fit['hack_pref']:.0%} of prompts, right "
                f"letters on {fit['field_acc']:.0%}); seeds={seed_text(args.seeds)}; toxicity = share of "
                f"{SAMPLES_PER_PROMPT} sampled held-out answers per prompt in the 'a;b.' layout (lower is better)",
           table(results, {"train": f"train RM reward (last {TRAIN_TAIL} steps)", "toxicity": "held-out toxicity",
                           "target_greedy": "held-out greedy target reward (strict)",
                           "rm_heldout": "trainer eval: held-out greedy, strict verifier",
                           "alerted": "runs with a guard alert"}))
    plot_curves([r for r in results if r["method"] != WARM_START_ONLY],
                [("train_curve", "train RM reward (5-step mean)", 5)],
                "RLHF with a hackable reward model: mean over seeds", out / "rlhf.png")


def part_sweep(args, out: Path) -> None:
    from drpt_ray.client import Client
    from drpt_ray.service_cli import format_sweep
    from local_cluster import ROOT, start_control_plane

    from drpt_ray.local_ray import start_ray_head, stop_group

    base = job_spec(RLVR_HARD, {"feasible_set": "soft_subset"}, 0, out / "trials", args)
    del base["output_dir"]  # each trial gets <sweep output_dir>/<trial id>
    space = {"regularizer.tau": {"values": args.taus}} | ({"seed": {"values": args.seeds}}
                                                          if len(args.seeds) > 1 else {})
    spec = {"name": "soft-subset-tau", "base": base, "space": space, "metric": "eval/target_reward", "mode": "max",
            "scheduler": "grid", "max_concurrent_trials": 1, "output_dir": "trials"}  # under the server's runs dir
    token = "rl-quality-" + "".join(random.choices("0123456789abcdef", k=24))
    ray_head, ray_url, ray_tmp = start_ray_head(3, out / "ray.log", os.environ, cwd=ROOT)
    server = None
    try:
        server, url = start_control_plane(out, ray_url, token)
        sweep = Client(url, token).submit_sweep(spec)
        sid = sweep.id
        print(f"sweep {sid} on {url} (Ray {ray_url}): {len(args.taus) * len(args.seeds)} trials", flush=True)
        state = follow_sweep(sweep, out / "sweep.log")
        result = sweep.refresh()
    finally:
        for proc in (server, ray_head):
            if proc is not None:
                stop_group(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    (out / "results.json").write_text(result.model_dump_json())
    print("\n" + format_sweep(result), flush=True)
    if state != "SUCCEEDED":
        raise SystemExit(f"sweep {sid} ended {state}: {result.message}")
    rows = ["| tau | trials | final held-out target reward (greedy) | best (greedy) | "
            "final held-out pass@1 (sampled) |",
            "|---|---|---|---|---|"]
    points = []
    for tau in args.taus:
        trials = [t for t in result.trials if t.config["regularizer.tau"] == tau and t.value is not None]
        if not trials:
            rows.append(f"| {tau:g} | 0 | - | - | - |")
            continue
        # `metrics` holds each metric's latest value: the last step evaluates, so these are the final ones.
        cells = [mean_se([t.value for t in trials]), mean_se([t.best_value for t in trials]),
                 mean_se([t.metrics["eval/target_pass@1"] for t in trials])]
        rows.append(f"| {tau:g} | {len(trials)} | " + " | ".join(f"{m:.3f} +- {se:.3f}" for m, se in cells) + " |")
        points.append((tau, *cells))
    report(out, f"Ray Tune sweep {sid} (grid, via the control plane's REST API) of the soft subset's tau on RLVR_HARD, "
                f"seeds={seed_text(args.seeds)}; best trial {result.best.config if result.best else None}",
           "\n".join(rows))
    plot_sweep(points, rlvr_reference(out.parent / "rlvr" / "results.json", args), out / "sweep.png")


def follow_sweep(sweep, log: Path) -> str:
    """Follow the sweep's event stream to its end: trial starts and ends and state changes on stdout,
    the driver's log lines (Tune, vLLM, every trial's output) to `log`. Returns the final state."""
    from drpt_ray.client import End, LogLine, StateChange, TrialReport

    state = sweep.info.state
    with open(log, "a") as f:
        for ev in sweep.events():
            match ev:
                case LogLine():
                    f.write(ev.line + "\n")
                case TrialReport() if ev.state != "RUNNING" or not ev.metrics:
                    value = ev.metrics.get("eval/target_reward")
                    print(f"trial {ev.trial_id} {ev.state} {json.dumps(ev.config)}"
                          + (f" eval/target_reward {value:.3f}" if value is not None else ""), flush=True)
                case StateChange():
                    print(f"[{ev.state}]" + (f" {ev.message}" if ev.message else ""), flush=True)
                case End():
                    state = ev.state
    return state


def rlvr_reference(path: Path, args) -> dict[str, float]:
    """Mean final held-out target reward of full and target-only from the rlvr part, when it ran at these settings."""
    if not path.exists():
        return {}
    done = json.loads(path.read_text())
    if done["settings"] != {"base": RLVR_HARD, "steps": args.steps, "warm_start_steps": args.warm_start_steps}:
        return {}
    finals = {m: [r["final"] for r in done["runs"] if r["method"] == m] for m in ("full", "target_only")}
    return {m: statistics.fmean(v) for m, v in finals.items() if v}


def plot_sweep(points: list[tuple], reference: dict[str, float], path: Path) -> None:
    """Held-out target metrics against tau (log axis), with full and target-only from the rlvr part as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    taus = [p[0] for p in points]
    for i, label, style in ((1, "greedy reward, final", "-o"), (2, "greedy reward, best during training", ":x"),
                            (3, "pass@1 (sampled), final", "-s")):
        ax.errorbar(taus, [p[i][0] for p in points], yerr=[p[i][1] for p in points], fmt=style, capsize=3, label=label)
    for (m, value), ls in zip(reference.items(), ("--", "-.")):
        ax.axhline(value, color="gray", ls=ls, lw=1, label=f"{m}: greedy final (rlvr part)")
    ax.set_xscale("log")
    ax.set_xticks(taus, [f"{t:g}" for t in taus])
    ax.minorticks_off()
    ax.set_xlabel("soft-subset temperature tau (small: towards top-1, large: towards full)")
    ax.set_ylabel("held-out target metric (mean +- SE over seeds)")
    ax.set_title("Soft subset on RLVR_HARD: held-out target metrics vs tau")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def seeds_arg(text: str) -> list[int]:
    """--seeds: a count N (seeds 0..N-1), or the demo's range/list form (1-2, 0,2)."""
    from drpt_ray.cli import seed_list

    return list(range(int(text))) if text.isdigit() else seed_list(text)


def seed_text(seeds: list[int]) -> str:
    return str(len(seeds)) if seeds == list(range(len(seeds))) else ",".join(map(str, seeds))


def pick(methods: dict[str, dict], names: str | None) -> dict[str, dict]:
    if names is None:
        return methods
    unknown = [n for n in names.split(",") if n not in methods]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; this part's methods are {list(methods)}")
    return {n: methods[n] for n in names.split(",")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("demo", "rlvr", "rlhf", "sweep", "real"), required=True)
    ap.add_argument("--seeds", type=seeds_arg, default="5", help="N: seeds 0..N-1; or a range 1-2 or a list 0,2 "
                    "(sweep: crossed with tau when more than one)")
    ap.add_argument("--steps", type=int, help="override the base spec's RL steps (smoke tests)")
    ap.add_argument("--warm-start-steps", type=int, help="override the base spec's warm_start_sft_steps (smoke tests)")
    ap.add_argument("--methods", help="comma-separated subset of the part's methods (rlvr, rlhf, real)")
    ap.add_argument("--taus", type=lambda s: [float(x) for x in s.split(",")], default=list(TAUS), help="sweep grid")
    ap.add_argument("--out", default="bench/out/rl_quality")
    ap.add_argument("--layerwise-from", help="real: take layerwise_subset's runs from this `drpt-ray demo --real` "
                    "output (its seed<N>/metrics.jsonl; the demo's spec is the part's base) instead of "
                    "running them again")
    ap.add_argument("--report-only", action="store_true",
                    help="rlvr, rlhf, demo, real: report the finished runs of results.json, start none")
    args = ap.parse_args()
    print(f"machine: {machine_summary()}", flush=True)
    out = Path(args.out) / args.part
    out.mkdir(parents=True, exist_ok=True)
    {"demo": part_demo, "rlvr": part_rlvr, "rlhf": part_rlhf,
     "sweep": part_sweep, "real": part_real}[args.part](args, out)


if __name__ == "__main__":
    main()
