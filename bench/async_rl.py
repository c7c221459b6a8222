"""Asynchronous RL: the synchronous loop against `rollout.max_staleness` 1 and 2 (and 1 with partial
rollouts), in one run.

    .venv/bin/python bench/async_rl.py --part demo --seeds 5 --out bench/out/async_rl
    .venv/bin/python bench/async_rl.py --part real --out bench/out/async_rl   # needs runs/smollm2
    # smoke: --part demo --seeds 1 --steps 6 --warm-start-steps 20

demo: the README demo (tiny model, scarce_target, GRPO + layer-wise) per seed and staleness, with
    `algorithm.rollout_correction: {upper: 2.0}` (token-level TIS) in every mode so that only the
    overlap differs. Per run: steps per second of the training loop (steps / the sum of
    `time/step`; evaluations excluded), the loop's seconds
    until the greedy held-out reward first reaches --reach, learner and rollout idle fractions (from
    `time/gen` and `time/rollout_busy`), final held-out reward and pass@1, and whether the run met
    tests/test_async.py's learning checks. "trained age": the mean age, in weight versions, of the
    trained samples (of their tokens with partial rollouts).
real: SmolLM2-135M-Instruct + LoRA on GSM8K, examples/gsm8k_smollm2.yaml cut to a few short steps
    (fewer samples and tokens, no warm start: throughput only; at this length every reward is 0).

Unpinned, both sides share this machine's 2 cores: the learner and the vLLM worker compete for
them, so the overlap can only fill the cores' idle time. `--pin` gives each side one core of its
own (taskset on every thread of the rollout engine and of the learner rank, once the job has
started): the closest this machine comes to separate devices. The table's last line also computes
what the synchronous runs' phase times would give on separate devices (a synchronous step costs
gen + the rest, an overlapped one max(gen, the rest)); computed, not measured.

Each part writes <out>/<part>/results.json (after every run; a rerun with the same settings reuses
the finished runs) and table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                     "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_key, _value)  # before Ray, vLLM or transformers read them

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drpt_ray.demo import RLVR_DEMO, mean_se  # noqa: E402
from drpt_ray.machine import machine_summary  # noqa: E402

# label -> (rollout.max_staleness, rollout.partial_rollouts)
MODES = {"sync": (0, False), "1": (1, False), "2": (2, False), "1 + partial": (1, True)}
QUIET = {"progress": False, "tensorboard": False, "checkpoint": {"resume": False}}
TIS = {"level": "token", "mode": "truncate", "upper": 2.0}


def with_mode(base: dict, mode: str) -> dict:
    k, partial = MODES[mode]
    return base | {"rollout": base["rollout"] | {"max_staleness": k, "partial_rollouts": partial},
                   "algorithm": base["algorithm"] | {"rollout_correction": TIS}}


def loop_figures(h: list[dict], workers: int) -> dict:
    """Throughput and idle shares of one run's training steps (evaluations excluded)."""
    steps = [m for m in h if "time/step" in m]
    wall = sum(m["time/step"] for m in steps)
    gen = sum(m["time/gen"] for m in steps)
    rest = wall - gen
    return {
        "steps_per_s": len(steps) / wall, "loop_s": wall,
        "learner_idle": gen / wall,
        "rollout_idle": max(0.0, 1 - sum(m.get("time/rollout_busy", 0.0) for m in steps) / (workers * wall)),
        "gen_s": gen / len(steps), "rest_s": rest / len(steps),
        # steady state: from the step after the pipeline filled
        "steady_step_s": statistics.fmean(m["time/step"] for m in steps[3:]) if len(steps) > 3 else wall / len(steps),
    }


def learned(h: list[dict], mode: str) -> bool:
    """tests/test_async.py's checks (and the demo test's): bounded staleness, exactly k once filled
    (with partial rollouts a job may start on weights offered after it was submitted: at most k),
    no collapse, held-out rise."""
    k, partial = MODES[mode]
    series = lambda key: [m[key] for m in h if key in m]  # noqa: E731
    evals = series("eval/target_reward")
    steps = [m for m in h if m["step"] > 0]
    bounded = all(m.get("rollout/staleness_max", 0) <= k for m in steps)
    exact = partial or all(m.get("rollout/staleness_mean", k) == k for m in steps[k:])
    return (bounded and exact and sum(series("rollout/dropped")) == 0
            and sum(evals[-2:]) / 2 >= evals[0] + min(0.1, (1 - evals[0]) / 2)
            and min(series("reward/reward_mean")) > 0.15 and sum(series("reward/response_len")[-10:]) / 10 < 6.0)


def demo_run(mode: str, seed: int, out: Path, args) -> dict:
    from drpt_ray.config import JobSpec
    from drpt_ray.trainer import run_job

    spec = with_mode(RLVR_DEMO, mode) | QUIET | {"seed": seed, "eval_every": args.eval_every,
                                                 "output_dir": str(out / slug(mode) / f"seed{seed}")}
    if args.steps:
        spec["steps"] = args.steps
    if args.warm_start_steps is not None:
        spec["warm_start_sft_steps"] = args.warm_start_steps
    h = run_job(JobSpec.model_validate(spec), on_metrics=pin_at_start if args.pin else None).history
    evals = [m for m in h if "eval/target_reward" in m]
    loop_s, reached = 0.0, None
    for m in h:
        loop_s += m.get("time/step", 0.0)
        if reached is None and m.get("eval/target_reward", -1) >= args.reach:
            reached = loop_s
    return {**loop_figures(h, 1), "reach_s": reached,
            "final": evals[-1]["eval/target_reward"], "start": evals[0]["eval/target_reward"],
            "pass@1": evals[-1].get("eval/target_pass@1"),
            **token_staleness(h)}


def real_run(mode: str, seed: int, out: Path, args) -> dict:
    import yaml

    from drpt_ray.config import JobSpec
    from drpt_ray.trainer import run_job

    base = yaml.safe_load((ROOT / "examples" / "gsm8k_smollm2.yaml").read_text())
    base["rollout"]["sampling"] |= {"n": 4, "max_new_tokens": args.real_tokens}
    base |= {"warm_start_sft_steps": 0, "eval_before_warm_start": False, "steps": args.steps or 4, "batch_size": 2,
             "target_batch_size": 1, "eval_every": 1000, "eval_size": 2, "eval_samples": 0}
    spec = with_mode(base, mode) | QUIET | {"seed": seed, "output_dir": str(out / slug(mode))}
    spec["model"]["path"] = str(ROOT / spec["model"]["path"])
    h = run_job(JobSpec.model_validate(spec), on_metrics=pin_at_start if args.pin else None).history
    return {**loop_figures(h, 1), **token_staleness(h),
            "phases": {p: statistics.fmean(m[f"time/{p}"] for m in h if f"time/{p}" in m)
                       for p in ("gen", "logprob", "regularize", "update", "sync")}}


def pin_at_start(m: dict) -> None:
    """--pin: when the job logs its step 0, give the rollout engine CPU 0 and the learner rank CPU 1
    (every thread of each process): each side on its own core, as on separate devices."""
    if m["step"] != 0:
        return
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        core = 0 if title.startswith("ray::RolloutEngine") else 1 if title.startswith("ray::RayTrainWorker") else None
        if core is not None:
            subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(p.pid)], check=True, capture_output=True)


def token_staleness(h: list[dict]) -> dict:
    """Mean age of the trained tokens (partial rollouts) or samples, in weight versions."""
    steps = [m for m in h if "rollout/staleness_mean" in m]
    if not steps:
        return {"token_age": 0.0}
    return {"token_age": statistics.fmean(m.get("rollout/token_staleness_mean", m["rollout/staleness_mean"])
                                          for m in steps)}


def slug(mode: str) -> str:
    return "k" + mode.replace(" + ", "_")


def run_all(part: str, modes: list[str], seeds: int, out: Path, settings: dict, run_one) -> list[dict]:
    path = out / "results.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    done = {(r["mode"], r["seed"]): r for r in old.get("runs", []) if old.get("settings") == settings}
    results = []
    for seed in range(seeds):
        for mode in modes:
            if (mode, seed) not in done:
                t0 = time.perf_counter()
                done[mode, seed] = {"mode": mode, "seed": seed, **run_one(mode, seed),
                                    "seconds": time.perf_counter() - t0}
                print(f"{part} {mode} seed {seed}: " + ", ".join(f"{key} {v:.3f}" for key, v in done[mode, seed].items()
                                                                 if isinstance(v, float)), flush=True)
            # re-judged from the run's log, so a reused run meets today's checks
            if part == "demo" and not settings["steps"]:
                log = out / slug(mode) / f"seed{seed}" / "metrics.jsonl"
                done[mode, seed]["learned"] = learned([json.loads(line) for line in log.read_text().splitlines()], mode)
            results.append(done[mode, seed])
            path.write_text(json.dumps({"settings": settings, "runs": results}, default=str))
    return results


def fmt(xs: list[float], digits: int = 2) -> str:
    m, se = mean_se(xs)
    return f"{m:.{digits}f} +- {se:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def table(results: list[dict], part: str, modes: list[str]) -> str:
    sync = [r for r in results if r["mode"] == "sync"]
    # what separate devices would give: the synchronous phase times, overlapped
    projected = statistics.fmean((r["gen_s"] + r["rest_s"]) / max(r["gen_s"], r["rest_s"]) for r in sync)
    base = statistics.fmean(r["steps_per_s"] for r in sync)
    lines = [f"# Asynchronous RL ({part}), measured on this 2-core CPU machine", "",
             "| max_staleness | steps/s | x sync | steady s/step | learner idle | rollout idle | trained age | "
             + ("loop s to reach | held-out final | pass@1 | learned |"
                if part == "demo" else "gen / logprob / regularize / update / sync s |"),
             "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if part == "demo" else "")]
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        row = [mode, fmt([r["steps_per_s"] for r in rs], 3),
               f"{statistics.fmean(r['steps_per_s'] for r in rs) / base:.2f}",
               fmt([r["steady_step_s"] for r in rs]),
               fmt([r["learner_idle"] for r in rs]), fmt([r["rollout_idle"] for r in rs]),
               fmt([r["token_age"] for r in rs])]
        if part == "demo":
            reached = [r["reach_s"] for r in rs if r["reach_s"] is not None]
            row += [f"{fmt(reached, 1)} ({len(reached)}/{len(rs)} reached)" if reached else f"0/{len(rs)} reached",
                    fmt([r["final"] for r in rs], 3), fmt([r["pass@1"] for r in rs if r["pass@1"] is not None], 3),
                    f"{sum(bool(r.get('learned')) for r in rs)}/{len(rs)}"]
        else:
            (r,) = rs
            row.append(" / ".join(f"{r['phases'][p]:.1f}" for p in ("gen", "logprob", "regularize", "update", "sync")))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Separate devices (computed from the synchronous runs' phase times, not measured): "
              f"an overlapped step would run {projected:.2f}x the synchronous steps/s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("demo", "real"), required=True)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None, help="override the spec's steps (smoke / real part)")
    ap.add_argument("--warm-start-steps", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--reach", type=float, default=0.9, help="demo: the held-out greedy reward to time")
    ap.add_argument("--real-tokens", type=int, default=128, help="real: max_new_tokens")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {list(MODES)}")
    ap.add_argument("--pin", action="store_true",
                    help="the rollout engine on CPU 0, the learner on CPU 1 (results under <part>_pinned)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "async_rl")
    args = ap.parse_args()
    machine = machine_summary()
    print(f"machine: {machine}", flush=True)
    out = args.out / (args.part + ("_pinned" if args.pin else ""))
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "seeds", "modes")}
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        ap.error(f"--modes: unknown {sorted(unknown)}; choose from {list(MODES)}")
    runner = demo_run if args.part == "demo" else real_run
    results = run_all(args.part, modes, args.seeds if args.part == "demo" else 1,
                      out, settings, lambda k, seed: runner(k, seed, out, args))
    text = table(results, args.part, modes) + f"\nmachine: {machine}\n"
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
