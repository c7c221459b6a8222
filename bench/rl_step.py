"""RL step benchmark: where the time of one RLVR step goes, and how fast the vLLM rollout is.

    .venv/bin/python bench/rl_step.py            # full: 30-step runs, hidden 256 and 1024, 64 prompts
    .venv/bin/python bench/rl_step.py --quick    # smoke run: 8-step runs, hidden 256, 16 prompts

Part 1, per-phase breakdown. `drpt_ray.trainer.run_job` runs the RLVR demo spec (`drpt_ray.demo.RLVR_DEMO`:
tiny Llama, 200-step SFT warm start, GRPO, n=8, 8 new tokens, local Ray with one vLLM worker) twice
in this process: once with the demo's regularizer (`layerwise_subset`) and once with
`feasible_set: full` (no target rollouts, no scoring). Each step's `time/<phase>` metrics come from
`result.history`; the first `--skip` steps are warm-up and dropped. Per phase we report the median
seconds and its share = median(phase) / median(step). "other" is the median of
step - sum(phases): the Ray round trips around learner calls that no phase timer covers. Shares of
medians need not add up to exactly 100%. In the regularized run `gen`, `reward`, `logprob` and `adv`
also include the target rollouts (4 prompts x 8) that the plain run does not make.
  regularized learner step / plain learner step
      = median(time/update + time/regularize) [regularized run] / median(time/update) [plain run]
  weight-sync fraction = median(time/sync) / median(time/step), per run (goal <= 5%).
Evaluation only runs at the last step (eval_every = steps) and is outside every step timer anyway.

Part 2, rollout throughput. For each hidden size a fresh child process (so that no Ray, no earlier
engine and no earlier model share its memory or threads) builds a random 2-layer Llama with
`tiny_model` and, in that one process, generates from the same prompt token ids with:
  hf             transformers `generate`, float32, default (sdpa) attention, torch.no_grad,
                 batched with left padding, do_sample, temperature 1, top_k 0 (off, as in vLLM),
                 min_new_tokens = max_new_tokens, so every row yields exactly 64 tokens
  stock fixed    `engine._llm.generate` (stock vLLM on the RolloutEngine's own LLM object),
                 SamplingParams(temperature=1, ignore_eos=True): the same fixed 64 tokens as hf
  stock          `engine._llm.generate` with the RolloutEngine's params minus logprobs, eos allowed
  stock + logprobs=0  the same plus logprobs=0, i.e. exactly what RolloutEngine asks vLLM for
  RolloutEngine  `RolloutEngine.generate` with a SamplingSpec (it has no ignore_eos, so rows may
                 stop at eos; it asks vLLM for the sampled token's log-prob and builds Rollouts)
  ... (seeded)   the last two with a per-request seed, as the trainer always calls it
Throughput is tokens actually produced (sum of response lengths) / wall seconds, so eos-stopped
rows are counted as what they are. Every method is warmed up once, then `--repeats` rounds run all
methods in turn (interleaved, so background load hits every method alike); medians are reported.
Each ratio is given two ways: of the median tok/s (as asked), and as the median of per-round ratios,
which is the more robust one when other processes load the machine between rounds.
  RolloutEngine / stock       goal >= 0.95x (the wrapper's overhead, same eos behaviour)
  vLLM / HF = stock fixed / hf   goal >= 2x at hidden 1024, batch 64 (docs: /work/shared/docs/targets.md)

Outputs: markdown tables on stdout, `bench/out/rl_step/results.json` and `bench/out/rl_step/report.md`.
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

# vLLM reads these when it is imported or its engine starts: set before anything can import it.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine (what RolloutEngine needs)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # else vLLM reserves most of RAM for KV cache
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built in code
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "rl_step"
PHASES = ("sample", "gen", "reward", "logprob", "adv", "regularize", "update", "sync")
RUNS = {
    "regularized (layerwise_subset)": None,  # None: the demo's own regularizer
    "plain (full)": {"feasible_set": "full"},
}
SYNC_GOAL, WRAPPER_GOAL, VLLM_HF_GOAL = 0.05, 0.95, 2.0
BASE_PROMPTS = [
    "The quick brown fox",
    "Question: what is 2 + 3? Answer:",
    "Once upon a time",
    "We train the policy with",
    "Please think step by step",
    "The weather was cold, so",
    "A model learns from data",
    "Good answers are short",
]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ----------------------------------------------------------------------------------------------
# Part 1: per-phase breakdown of an RL step


def run_rl(name: str, regularizer: dict | None, steps: int) -> list[dict]:
    """One `run_job` of the RLVR demo (with `regularizer` swapped in when given); returns the step metrics."""
    from drpt_ray.demo import RLVR_DEMO
    from drpt_ray.config import JobSpec
    from drpt_ray.trainer import run_job

    slug = "regularized" if regularizer is None else "plain"
    overrides = {
        "steps": steps,
        "eval_every": steps,  # one eval at the end: it is outside the step timers, so only costs wall time
        "progress": False,
        "tensorboard": False,
        "output_dir": str(OUT / slug),
        "checkpoint": {"resume": False},  # a stale checkpoint would skip the steps we want to time
    }
    if regularizer is not None:
        overrides["regularizer"] = regularizer
    spec = JobSpec.model_validate(RLVR_DEMO | overrides)
    t0 = time.perf_counter()
    result = run_job(spec)
    print(f"[{name}] {result.steps} steps in {time.perf_counter() - t0:.1f} s (incl. Ray/vLLM start, warm start)",
          flush=True)
    return [m for m in result.history if "time/step" in m]


def phase_stats(history: list[dict], skip: int) -> dict:
    """Median seconds and share of the step per phase, after dropping `skip` warm-up steps."""
    rows = history[skip:]
    step = median([m["time/step"] for m in rows])
    out = {"steps_timed": len(rows), "step_s": step, "phases": {}}
    for p in PHASES:
        s = median([m.get(f"time/{p}", 0.0) for m in rows])  # a phase a step skipped took 0 s
        out["phases"][p] = {"median_s": s, "share": s / step}
    other = median([m["time/step"] - sum(m.get(f"time/{p}", 0.0) for p in PHASES) for m in rows])
    out["phases"]["other"] = {"median_s": other, "share": other / step}
    out["learner_s"] = median([m.get("time/update", 0.0) + m.get("time/regularize", 0.0) for m in rows])
    out["update_s"] = median([m.get("time/update", 0.0) for m in rows])
    out["sync_fraction"] = out["phases"]["sync"]["median_s"] / step
    out["response_len"] = median([m.get("reward/response_len", float("nan")) for m in rows])
    return out


def part1(steps: int, skip: int) -> dict:
    """Both RL runs, their phase tables and the two headline ratios."""
    import ray

    runs = {}
    for name, reg in RUNS.items():
        runs[name] = phase_stats(run_rl(name, reg, steps), skip)
    ray.shutdown()  # part 2 runs in child processes; free the Ray workers' memory and CPU first
    reg_run, plain_run = runs["regularized (layerwise_subset)"], runs["plain (full)"]
    return {
        "steps": steps,
        "skip": skip,
        "runs": runs,
        "learner_ratio": reg_run["learner_s"] / plain_run["update_s"],
    }


def part1_tables(res: dict) -> str:
    names = list(res["runs"])
    head = "| phase | " + " | ".join(f"{n} median s | share" for n in names) + " |"
    lines = [head, "|---|" + "---|---|" * len(names)]
    for p in (*PHASES, "other"):
        cells = [f"{r['phases'][p]['median_s']:.4f} | {100 * r['phases'][p]['share']:.1f}%"
                 for r in res["runs"].values()]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines.append("| **step** | " + " | ".join(f"**{r['step_s']:.4f}** | 100%" for r in res["runs"].values()) + " |")
    reg_run, plain_run = res["runs"].values()
    summary = [
        "| metric | value | goal |",
        "|---|---|---|",
        f"| regularized learner step / plain learner step (median(update+regularize) {reg_run['learner_s']:.4f} s / "
        f"median(update) {plain_run['update_s']:.4f} s) | {res['learner_ratio']:.2f}x | - |",
    ]
    for n, r in res["runs"].items():
        ok = "ok" if r["sync_fraction"] <= SYNC_GOAL else "MISSED"
        summary.append(f"| weight-sync fraction, {n} | {100 * r['sync_fraction']:.1f}% | <= 5% ({ok}) |")
    for n, r in res["runs"].items():
        summary.append(f"| median response length (tokens), {n} | {r['response_len']:.2f} | - |")
    return "\n".join(lines) + "\n\n" + "\n".join(summary)


# ----------------------------------------------------------------------------------------------
# Part 2: rollout throughput (runs in a child process per hidden size)


def model_spec(hidden: int):
    """2 layers, head_dim 64 (vLLM CPU needs a multiple of 16), 4:1 GQA, Llama-like MLP width ~8/3 x hidden."""
    from drpt_ray.config import TinyModelSpec

    heads = max(1, hidden // 64)
    inter = -(-(8 * hidden // 3) // 64) * 64
    return TinyModelSpec(hidden_size=hidden, intermediate_size=inter, num_layers=2, num_heads=heads,
                         num_kv_heads=max(1, heads // 4), seed=0)


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    """`n` distinct short prompts (5-15 tokens) as token ids, shared by every method."""
    texts = [f"{BASE_PROMPTS[i % len(BASE_PROMPTS)]} {i}" for i in range(n)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def hf_generate_fn(model, prompts: list[list[int]], new_tokens: int, pad_id: int, eos_id: int):
    """A closure running one batched HF `generate` (left padded, fixed length); returns tokens produced."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run() -> int:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
            )
        produced = out.shape[1] - width
        assert produced == new_tokens, f"HF produced {produced} tokens per row, expected {new_tokens}"
        return produced * len(prompts)

    return run


def vllm_fns(engine, prompts: list[list[int]], new_tokens: int, seed: int) -> dict:
    """Closures for the stock-vLLM and RolloutEngine variants; each returns tokens actually produced."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from drpt_ray.config import SamplingSpec

    inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]

    def stock(**kw):
        params = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=new_tokens, **kw)
        return lambda: sum(len(c.token_ids) for o in engine._llm.generate(inputs, params, use_tqdm=False)
                           for c in o.outputs)

    def wrapped(s):
        spec = SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, seed=s)
        return lambda: sum(len(r.response_ids) for r in engine.generate(prompts, spec))

    return {
        "stock fixed (ignore_eos)": stock(ignore_eos=True),
        "stock": stock(),
        # What RolloutEngine asks vLLM for on top of stock: splits its cost into vLLM's log-prob
        # output path and the wrapper's own Python (building Rollouts).
        "stock + logprobs=0": stock(logprobs=0),
        "RolloutEngine": wrapped(None),
        "stock (seeded)": stock(seed=seed),
        "RolloutEngine (seeded)": wrapped(seed),
    }


def time_methods(fns: dict, repeats: int) -> dict:
    """Warm each method up once, then `repeats` interleaved rounds; medians of seconds and tok/s."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[tuple[int, float]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            tokens = fn()
            samples[name].append((tokens, time.perf_counter() - t0))
    return {
        name: {
            "tokens": median([t for t, _ in s]),
            "seconds": median([dt for _, dt in s]),
            "tok_s": median([t / dt for t, dt in s]),
            "tok_s_all": [t / dt for t, dt in s],
        }
        for name, s in samples.items()
    }


def rollout_child(hidden: int, n_prompts: int, new_tokens: int, repeats: int) -> dict:
    """Build the model, HF and vLLM on it in this process, and time every method."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drpt_ray.config import RolloutSpec
    from drpt_ray.models import tiny_model
    from drpt_ray.rollout.worker import RolloutEngine

    spec = model_spec(hidden)
    path = tiny_model(OUT / "models" / f"llama-h{hidden}", spec)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = make_prompts(tok, n_prompts)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    threads_before = torch.get_num_threads()
    # max_model_len only needs prompt + new tokens; the default 256 leaves room.
    engine = RolloutEngine(str(path), RolloutSpec(max_model_len=256, kv_cache_gib=1), seed=0)
    fns = {"hf": hf_generate_fn(model, prompts, new_tokens, tok.pad_token_id, tok.eos_token_id)}
    fns |= vllm_fns(engine, prompts, new_tokens, seed=1234)
    results = time_methods(fns, repeats)
    return {
        "hidden": hidden,
        "spec": spec.model_dump(),
        "params": sum(p.numel() for p in model.parameters()),
        "prompts": n_prompts,
        "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "engine_start_s": engine.start_seconds,
        # vLLM's CPU worker replaces torch.set_num_threads; record that HF ran with the same threads.
        "torch_threads": [threads_before, torch.get_num_threads()],
        "hf_attn": getattr(model.config, "_attn_implementation", None),
        "methods": results,
    }


def part2(hiddens: list[int], n_prompts: int, new_tokens: int, repeats: int) -> list[dict]:
    """One child process per hidden size (a clean process: no Ray, no previous engine or model)."""
    out = []
    for h in hiddens:
        dest = OUT / f"rollout_h{h}.json"
        cmd = [sys.executable, __file__, "--rollout-child", str(h), "--prompts", str(n_prompts),
               "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--child-out", str(dest)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        res = json.loads(dest.read_text())
        print(f"[rollout hidden {h}] done in {time.perf_counter() - t0:.1f} s", flush=True)
        out.append(res)
    return out


RATIOS = {  # name: (numerator method, denominator method, goal)
    "RolloutEngine / stock": ("RolloutEngine", "stock", f">= {WRAPPER_GOAL}x"),
    "RolloutEngine / stock + logprobs=0": ("RolloutEngine", "stock + logprobs=0", "-"),
    "RolloutEngine / stock (seeded)": ("RolloutEngine (seeded)", "stock (seeded)", f">= {WRAPPER_GOAL}x"),
    "vLLM / HF (fixed length)": ("stock fixed (ignore_eos)", "hf", f">= {VLLM_HF_GOAL}x at hidden 1024, batch 64"),
    "RolloutEngine (seeded) / HF": ("RolloutEngine (seeded)", "hf", "-"),
}


def ratios(r: dict) -> dict:
    """Each ratio two ways: of the median tok/s, and the median of per-round ratios (the two methods
    of one round ran seconds apart, so a load change between rounds cancels out of the latter)."""
    m = r["methods"]
    out = {}
    for name, (num, den, _) in RATIOS.items():
        per_round = [a / b for a, b in zip(m[num]["tok_s_all"], m[den]["tok_s_all"])]
        out[name] = {"of_medians": m[num]["tok_s"] / m[den]["tok_s"], "per_round_median": median(per_round)}
    return out


def part2_tables(results: list[dict]) -> str:
    lines = ["| hidden | params | batch | method | tokens | median s | tok/s (median) | tok/s per round |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, v in r["methods"].items():
            rounds = ", ".join(f"{x:,.0f}" for x in v["tok_s_all"])
            lines.append(f"| {r['hidden']} | {r['params'] / 1e6:.2f}M | {r['prompts']} | {name} | {v['tokens']:.0f} | "
                         f"{v['seconds']:.3f} | {v['tok_s']:,.0f} | {rounds} |")
    lines += ["", "| hidden | batch | ratio | of median tok/s | median of per-round ratios | goal |",
              "|---|---|---|---|---|---|"]
    for r in results:
        for name, v in ratios(r).items():
            lines.append(f"| {r['hidden']} | {r['prompts']} | {name} | {v['of_medians']:.2f}x | "
                         f"{v['per_round_median']:.2f}x | {RATIOS[name][2]} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 8 RL steps, hidden 256 only, 16 prompts")
    p.add_argument("--steps", type=int, help="RL steps per run (default 30; quick 8)")
    p.add_argument("--skip", type=int, default=3, help="warm-up RL steps dropped from the statistics")
    p.add_argument("--hidden", type=int, nargs="+",
                   help="hidden sizes for the rollout part (default 256 1024; quick 256)")
    p.add_argument("--prompts", type=int, help="prompts per generate call (default 64; quick 16)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per rollout method (after one warm-up)")
    p.add_argument("--skip-rl", action="store_true", help="only the rollout part")
    p.add_argument("--skip-rollout", action="store_true", help="only the RL-step part")
    p.add_argument("--rollout-child", type=int, help=argparse.SUPPRESS)  # internal: one hidden size, in a child
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.steps = a.steps or (8 if a.quick else 30)
    a.hidden = a.hidden or ([256] if a.quick else [256, 1024])
    a.prompts = a.prompts or (16 if a.quick else 64)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.rollout_child is not None:
        res = rollout_child(args.rollout_child, args.prompts, args.new_tokens, args.repeats)
        Path(args.child_out).write_text(json.dumps(res, indent=2))
        return 0
    from drpt_ray.machine import machine_summary

    machine = machine_summary()
    print(f"machine: {machine}", flush=True)
    t0 = time.perf_counter()
    results: dict = {"args": {k: v for k, v in vars(args).items() if not k.startswith("child")}}
    sections = [f"# RL step benchmark ({'quick' if args.quick else 'full'})", f"machine: {machine}"]
    if not args.skip_rl:
        results["rl_step"] = part1(args.steps, args.skip)
        sections += [f"## Per-phase breakdown ({args.steps} steps, first {args.skip} dropped, medians)",
                     part1_tables(results["rl_step"])]
    if not args.skip_rollout:
        results["rollout"] = part2(args.hidden, args.prompts, args.new_tokens, args.repeats)
        for r in results["rollout"]:
            r["ratios"] = ratios(r)
        sections += [f"## Rollout throughput ({args.new_tokens} new tokens/prompt, temperature 1, "
                     f"warm-up 1 + {args.repeats} interleaved rounds, medians)", part2_tables(results["rollout"])]
    results["wall_s"] = time.perf_counter() - t0
    report = "\n\n".join(sections) + f"\n\nwall time {results['wall_s']:.0f} s\n"
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    (OUT / "report.md").write_text(report)
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
