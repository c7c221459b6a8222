"""The regularizer's own price in RL: learner work on the same rows, plain against regularized.

    .venv/bin/python bench/rl_learner.py --model demo                 # the RLVR demo's tiny Llama
    .venv/bin/python bench/rl_learner.py --model smollm2              # SmolLM2-135M-Instruct + LoRA r 16
    .venv/bin/python bench/rl_learner.py --model smollm2 --full       # SmolLM2, full fine-tuning

One `Learner` (no Ray, no vLLM) and one rollout batch shaped like the model's demo spec (general:
batch_size x n rows; target: target_batch_size x n rows; random prompt and response tokens, GRPO
advantages of random 0/1 rewards, behaviour log-probs from the learner). Per round, in turn:

  plain, general rows       feasible_set full, rl_step(general): the update without any target rows
  plain, same rows          feasible_set full, rl_step(general + target rows): the fair baseline,
                            plain training on every row the regularized step reads
  <set>, separate           capture_target(target) (its own forward + backward), then rl_step(general)
  <set>, merged             the target rows in rl_step's one forward + backward (target_mode merged)

for the layer-wise and one-pass global subsets (top-k 0.5), `--repeats` interleaved rounds after
one warm-up round; the learner's weights move a little every call (lr 1e-7) and the regularizer is
swapped in place, so every variant sees the same model and batch. Reported: median seconds of the
learner work (capture + update) and ratios to both plain baselines. Goals (issue 25): <= 1.15x the
plain same-rows work on the demo model, <= 1.10x on SmolLM2. Output: a table on stdout and
bench/out/rl_learner/<model>.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from drpt_ray.algorithms import ADVANTAGE_ESTIMATORS, AdvantageInputs
from drpt_ray.config import JobSpec, RegularizerSpec
from drpt_ray.demo import REAL_DEMO, RLVR_DEMO
from drpt_ray.learner import Learner, RLBatch, build_batch
from drpt_ray.learner.batch import cat_rl
from drpt_ray.machine import machine_summary
from drpt_ray.regularize import Regularizer

OUT = Path(__file__).resolve().parent / "out" / "rl_learner"
SETS = {"layer-wise": {"feasible_set": "layerwise_subset"}, "global one-pass": {"feasible_set": "global_subset"}}


def rollouts(learner: Learner, prompts: int, n: int, prompt_len: int, response_len: int, seed: int) -> RLBatch:
    g = torch.Generator().manual_seed(seed)
    vocab = learner.policy.config.vocab_size
    ids, responses, rewards, groups = [], [], [], []
    for p in range(prompts):
        prompt = torch.randint(10, vocab, (prompt_len,), generator=g).tolist()
        for _ in range(n):
            ids.append(prompt)
            responses.append(torch.randint(10, vocab, (response_len,), generator=g).tolist())
            rewards.append(float(torch.rand(1, generator=g) > 0.5))
            groups.append(p)
    batch = learner.score_rollouts(build_batch(ids, responses, rewards, groups, pad_id=0))
    batch.advantages = ADVANTAGE_ESTIMATORS.get("grpo")(AdvantageInputs(batch.rewards, batch.group_ids,
                                                                        batch.response_mask))
    return batch


def use(learner: Learner, reg: dict) -> None:
    """Swap the learner's regularizer (and the spec it reads the target mode from) in place."""
    learner.reg.remove()
    spec = RegularizerSpec(**{"selection": "topk", "frac": 0.5, **reg})
    learner.spec = learner.spec.model_copy(update={"regularizer": spec})
    learner.reg = Regularizer(learner.policy, spec)


def variants(general: RLBatch, target: RLBatch) -> dict:
    both = cat_rl([general, target])
    out = {"plain, general rows": ({"feasible_set": "full"}, None, general),
           "plain, same rows": ({"feasible_set": "full"}, None, both)}
    for name, reg in SETS.items():
        out[f"{name}, separate"] = (reg | {"target_mode": "separate"}, target, general)
        out[f"{name}, merged"] = (reg | {"target_mode": "merged"}, target, general)
    return out


def run(learner: Learner, reg: dict, target: RLBatch | None, batch: RLBatch) -> float:
    use(learner, reg)
    t0 = time.perf_counter()
    if target is not None:
        learner.capture_target(target)
    learner.rl_step(batch)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("demo", "smollm2"), default="demo")
    ap.add_argument("--full", action="store_true", help="smollm2: full fine-tuning instead of LoRA")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, help="default: 16 (demo), 80 (smollm2, a chat-templated prompt)")
    ap.add_argument("--response-len", type=int, help="default: the spec's max_new_tokens")
    args = ap.parse_args()
    base = dict(RLVR_DEMO if args.model == "demo" else REAL_DEMO)
    if args.full:
        base["model"] = {k: v for k, v in base["model"].items() if k != "lora"}
    base |= {"output_dir": str(OUT / "run"), "optim": {"lr": 1e-7, "warmup_frac": 0.0, "schedule": "constant"},
             "progress": False}
    spec = JobSpec.model_validate(base)
    learner = Learner(spec)
    n = spec.rollout.sampling.n
    prompt_len = args.prompt_len or (16 if args.model == "demo" else 80)
    response_len = args.response_len or spec.rollout.sampling.max_new_tokens
    general = rollouts(learner, spec.batch_size, n, prompt_len, response_len, seed=0)
    target = rollouts(learner, spec.target_batch_size, n, prompt_len, response_len, seed=1)
    runs = variants(general, target)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.repeats + 1):  # round 0 warms up
        for name, (reg, tgt, batch) in runs.items():
            s = run(learner, reg, tgt, batch)
            if r:
                times[name].append(s)
        print(f"round {r}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items() if v), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    trained = "full fine-tuning" if args.full or args.model == "demo" else "LoRA r 16"
    head = (f"{args.model} ({trained}), general {general.size} rows + target {target.size} rows, prompt {prompt_len} + "
            f"response {response_len} tokens, medians of {args.repeats} interleaved rounds; {machine_summary()}")
    rows = ["| learner work (capture + update) | median s | x plain, general rows | x plain, same rows |",
            "|---|---|---|---|"]
    for name, s in med.items():
        rows.append(f"| {name} | {s:.3f} | {s / med['plain, general rows']:.2f} | {s / med['plain, same rows']:.2f} |")
    report = head + "\n\n" + "\n".join(rows) + "\n"
    print("\n" + report)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.model}{'_full' if args.full else ''}.md").write_text(report)


if __name__ == "__main__":
    main()
