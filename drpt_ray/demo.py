"""The embedded demos: the specs `drpt-ray demo` runs, shared with the tests and the benches.

- RLVR (`RLVR_DEMO`): the scarce_target task, a tiny Llama built in code, a short SFT warm start on
  the general pool, then GRPO with the Dr. layer-wise regularizer. General prompts are scored by a
  lenient proxy verifier, the scarce target split by the strict one. `rlvr_seed_table` runs it and
  full training over seeds and prints the held-out target reward as mean +- standard error.
- SFT (`sft_spec`): target-only vs full vs layer-wise SFT on the same task, at the settings of
  `bench/sft_quality.py` (which builds its runs with `sft_spec` too), printed beside the figures
  that benchmark recorded over 5 seeds.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from drpt_ray.config import JobSpec

RLVR_DEMO = {
    "mode": "rlvr",
    "data": {"task": "scarce_target"},
    "regularizer": {"feasible_set": "layerwise_subset", "selection": "filter", "frac": 1.0},
    "algorithm": {"advantage": "grpo", "policy_loss": "ppo_clip"},
    "rollout": {"sampling": {"n": 8, "max_new_tokens": 8, "temperature": 0.7}},
    "reward": {"kind": "task"},
    "optim": {"lr": 5e-4, "warmup_frac": 0.0, "schedule": "constant"},
    "warm_start_sft_steps": 200,
    "warm_start_lr": 1e-3,
    "steps": 100,
    "batch_size": 8,
    "target_batch_size": 4,
    "eval_every": 20,
    "checkpoint": {"resume": False},
}

# `drpt-ray demo --real` (and examples/reasoning_gym_smollm2.yaml, kept equal by a test): the
# 'format' setting on a real model. SmolLM2-135M-Instruct + LoRA; reasoning-gym's chain_sum (two
# terms of 1-2 digits); 16 target prompts scored strictly (<answer>N</answer>), 2,000 general ones
# scored leniently (the right number anywhere), 200 held out. SmolLM2 never writes the tag
# unprompted (0 of 400 samples, measured), so a short SFT warm start on general examples (half of
# them in the tag format, half in a plain sentence) makes the strict format reachable; warming up
# on the 16 target examples instead memorised them (SFT loss 0.007, every target reward 1, so the
# target's GRPO advantages and g_T were 0: measured). Then GRPO with the layer-wise regularizer.
REAL_DEMO = {
    "mode": "rlvr",
    "name": "reasoning-gym-format-smollm2",
    "model": {"path": "runs/smollm2", "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}},
    "data": {"task": "reasoning_gym", "n_target": 16, "n_eval": 200, "n_general": 2000, "max_len": 128},
    "regularizer": {"feasible_set": "layerwise_subset", "selection": "filter", "frac": 1.0},
    "algorithm": {"advantage": "grpo", "policy_loss": "ppo_clip", "rollout_correction": {"upper": 2.0}},
    # 2 CPUs for the engine: the synchronous loop's learner waits while it generates, so it may use both cores.
    "rollout": {"max_model_len": 256, "num_cpus_per_worker": 2.0,
                "sampling": {"n": 4, "max_new_tokens": 12, "temperature": 0.7}},
    "reward": {"kind": "task"},
    "optim": {"lr": 3e-4, "warmup_frac": 0.0, "schedule": "constant"},
    "resources": {"learner_num_cpus": 2.0},  # likewise: the learner's phases run while the engine waits
    "warm_start_sft_steps": 24,
    "warm_start_batch_size": 8,
    "warm_start_lr": 5e-4,
    "eval_before_warm_start": True,
    "steps": 16,
    "batch_size": 8,
    "target_batch_size": 4,
    "eval_every": 16,
    "eval_size": 200,
    "eval_samples": 4,
    "eval_k": 4,
    "output_dir": "runs/demo/real",
    "checkpoint": {"resume": False},
}

# The RLVR benchmark's spec (bench/rl_quality.py): the demo cut to 60 RL steps. Its greedy held-out
# reward saturates (the demo ends at 0.97 +- 0.01), so the bench's headline is the sampled pass@1 at
# the training temperature, which ended between 0.57 and 0.70 in the 100-step demo runs. A shorter
# warm start does not make a harder task: at 50 or 100 warm-start steps the policy has not learnt to
# stop (responses run to max_new_tokens), every reward is 0 and no method gets a signal (measured).
RLVR_HARD = RLVR_DEMO | {"steps": 60}

# The SFT benchmark's methods (bench/sft_quality.py runs all of them; the demo the first three).
SFT_METHODS: dict[str, dict] = {
    "target_only": {"feasible_set": "target_only"},
    "full": {"feasible_set": "full"},
    "layerwise top-k 0.5": {"feasible_set": "layerwise_subset", "selection": "topk", "frac": 0.5},
    "global top-k 0.5": {"feasible_set": "global_subset", "selection": "topk", "frac": 0.5},
    "soft tau=1": {"feasible_set": "soft_subset", "tau": 1.0},
    "soft tau=2": {"feasible_set": "soft_subset", "tau": 2.0},
    "soft tau=4": {"feasible_set": "soft_subset", "tau": 4.0},
}
SFT_DEMO_METHODS = ("target_only", "full", "layerwise top-k 0.5", "global top-k 0.5")
SFT_STEPS, SFT_LR = 3000, 3e-3

# As bench/sft_quality.py recorded it over seeds 0-4 at commit 4288287 (bench/README.md,
# "Scarce-target SFT quality"): final held-out target loss mean, SE, and on how many seeds the
# method ended below full training. The demo prints its single seed (0) beside these.
SFT_BENCH_FINAL = {"target_only": (4.707, 0.125, 0), "full": (0.227, 0.002, None),
                   "layerwise top-k 0.5": (0.171, 0.029, 4), "global top-k 0.5": (0.152, 0.010, 5)}


def sft_spec(method: str, seed: int, out: str | Path, steps: int = SFT_STEPS, lr: float = SFT_LR,
             reg: dict | None = None, **over) -> JobSpec:
    """One run of the scarce-target SFT experiment. Target-only trains on the 16-example pool with
    the general batch size (8); the regularized methods see one target example per step. `reg`: a
    regularizer for a `method` name that is not one of SFT_METHODS (bench/layerwise_stability.py)."""
    reg = reg or SFT_METHODS[method]
    return JobSpec(
        mode="sft", steps=steps, optim={"lr": lr}, regularizer=reg,
        target_batch_size=8 if reg["feasible_set"] == "target_only" else 1,
        seed=seed, data={"seed": seed + 1}, model={"tiny": {"seed": seed}},
        eval_every=max(1, steps // 30), output_dir=str(Path(out) / method.replace(" ", "_") / f"seed{seed}"),
        checkpoint={"resume": False}, **over,
    )


# A held-out target loss above this is "not learned yet" on scarce_target: full training's floor is
# 0.22 on every seed, and ~1.6 is the plateau where the format is known and both letter maps are not
# (2 of the 4 response tokens at ~log 26 each).
SFT_PLATEAU_LOSS = 0.5
SFT_IMPROVEMENT = 0.05  # a new best must be 5% below the previous one to count as progress
SFT_OVERFIT = 1.5  # ending this many times above its best: the run learned, then overfitted


def sft_outcome(curve: list[tuple[int, float]], losses: list[float]) -> dict:
    """Classify a scarce-target SFT run from its held-out curve [(step, loss)] and training losses.

    - blew up: a non-finite training loss, or the held-out loss ends above where it started;
    - overfit: it ends `SFT_OVERFIT` times above its best (target-only on its 16 examples);
    - stalled: it ends above `SFT_PLATEAU_LOSS`, or for a third of the run or longer the held-out
      loss found no new best (5% below the last) while that best was above `SFT_PLATEAU_LOSS`;
    - learned: neither.
    `plateau_steps` is that longest stretch, a continuous measure of how close a run came to stalling."""
    best, since, plateau = curve[0][1], curve[0][0], 0
    for step, v in curve[1:]:
        if v < best * (1 - SFT_IMPROVEMENT):
            best, since = v, step
        elif best > SFT_PLATEAU_LOSS:
            plateau = max(plateau, step - since)
    final, span = curve[-1][1], curve[-1][0] - curve[0][0]
    if not all(math.isfinite(x) for x in losses) or not math.isfinite(final) or final > curve[0][1]:
        outcome = "blew up"
    elif final > SFT_OVERFIT * min(v for _, v in curve):
        outcome = "overfit"
    elif final > SFT_PLATEAU_LOSS or plateau >= span / 3:
        outcome = "stalled"
    else:
        outcome = "learned"
    return {"outcome": outcome, "plateau_steps": plateau, "final": final, "best": min(v for _, v in curve)}


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)
