"""Regularizer overhead: one learner step (forward, regularized backward, clip, AdamW) per method,
as a ratio to plain full training measured in the same run, beside its analytic FLOP ratio.

Times: all methods of one shape run in one process, interleaved round-robin (so background load
hits every method alike), medians over `--repeats` rounds after `--warmup`. Memory: each method
runs alone in a fresh process; peak = RSS high-water mark above the pre-step baseline.
Target capture (one extra forward/backward of the target batch, amortised by `refresh_every`) is
timed separately.

    .venv/bin/python bench/regularizer_overhead.py                 # main table + scaling tables
    .venv/bin/python bench/regularizer_overhead.py --quick         # smaller, for a smoke run

FLOP model (per hooked Linear, in units of one O x I matmul over all n*T rows): forward 1,
grad_input 1, weight grad 1, so a plain step is 3 (attention/softmax/norm work is added from the
shapes, same for every method). Extras: exact ghost scoring +1; assembling the curated gradient
from the kept rows costs the kept fraction f instead of the weight grad's 1; a k x k sketch costs
(O k + I k + k^2) / (O I) per row instead of the ghost's 1; soft weights keep every row (f = 1);
two-pass re-runs forward+backward on the subset (+3f, and the first pass needs no weight grad).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS: dict[str, dict | None] = {
    "full (no hooks)": None,
    "full (hooked)": {"feasible_set": "full"},
    "layerwise ghost": {"feasible_set": "layerwise_subset", "kernel": "ghost"},
    "layerwise direct": {"feasible_set": "layerwise_subset", "kernel": "direct", "direct_chunk": 8},
    "layerwise sketch": {"feasible_set": "layerwise_subset", "kernel": "sketch", "sketch": {"dim": 64}},
    "global one-pass": {"feasible_set": "global_subset", "passes": "one_pass", "kernel": "ghost"},
    "global two-pass": {"feasible_set": "global_subset", "passes": "two_pass", "kernel": "ghost"},
    "soft (layer)": {"feasible_set": "soft_subset", "tau": 1.0, "kernel": "ghost"},
}
FRAC = 0.5
VOCAB = 512


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def linear_shapes(hidden: int, inter: int, layers: int, vocab: int) -> list[tuple[int, int]]:
    per_layer = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    return per_layer * layers + [(vocab, hidden)]


def flop_ratio(method: str, hidden: int, inter: int, layers: int, seq: int) -> float:
    """Analytic step FLOPs of `method` / plain full training (see module docstring)."""
    shapes = linear_shapes(hidden, inter, layers, VOCAB)
    # attention scores + weighted sum: 2 matmuls of T x T x hidden per layer, x3 for fwd + bwd,
    # expressed per row in units of multiply-adds, like the Linear terms.
    attn = 3 * 2 * seq * hidden * layers
    base = sum(3 * o * i for o, i in shapes) + attn
    spec = METHODS[method]
    if spec is None or spec["feasible_set"] == "full":
        return 1.0
    f = 1.0 if spec["feasible_set"] == "soft_subset" else FRAC
    extra = 0.0
    for o, i in shapes:
        k = min(64, o), min(64, i + 1)
        score = (o * k[0] + i * k[1] + k[0] * k[1]) if spec.get("kernel") == "sketch" else o * i
        if spec.get("passes") == "two_pass":
            extra += score - o * i + 3 * f * o * i  # pass 1 skips the weight grad; pass 2 on S
        else:
            extra += score - (1 - f) * o * i
    if spec.get("passes") == "two_pass":
        extra += f * attn
    return (base + extra) / base


def _setup(cfg: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from drpt_ray.data import supervised_token_counts

    torch.manual_seed(0)
    h, layers, batch, seq = cfg["hidden"], cfg["layers"], cfg["batch"], cfg["seq"]
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=h, intermediate_size=cfg["inter"], num_hidden_layers=layers,
            num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 64),
            max_position_embeddings=seq, tie_word_embeddings=False, attn_implementation="eager",
        )
    )
    model.train()

    def make(n):
        ids = torch.randint(4, VOCAB, (n, seq))
        labels = ids.clone()
        labels[:, : seq // 8] = -100  # a short unsupervised prompt
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    general, target = make(batch), make(1)
    return model, general, target, supervised_token_counts(general["labels"])


def one_step(model, opt, spec: dict | None, general, target, units) -> tuple[float, float]:
    """(step seconds, capture seconds) of one learner step with the regularizer `spec` (None: a
    plain step without hooks), hooks installed only for it. bench/real_model.py uses it too."""
    import torch

    from drpt_ray.config import RegularizerSpec
    from drpt_ray.lm_losses import token_mean_loss
    from drpt_ray.regularize import Regularizer

    reg = Regularizer(model, RegularizerSpec(**{"frac": FRAC, **spec})) if spec is not None else None
    opt.zero_grad(set_to_none=True)
    c0 = time.perf_counter()
    if reg is not None and reg.needs_refresh(0):
        reg.capture_target(token_mean_loss(model, target))
    t0 = time.perf_counter()
    if reg is None:
        token_mean_loss(model, general).backward()
    else:
        reg.backward(lambda rows: token_mean_loss(model, general, rows), units)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    t1 = time.perf_counter()
    if reg is not None:
        reg.remove()
    return t1 - t0, t0 - c0


def time_worker(cfg: dict) -> dict:
    """Time every method of `cfg["methods"]` in one process, interleaved round-robin, so that any
    background load hits all of them alike; medians per method."""
    import torch

    model, general, target, units = _setup(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)  # tiny LR: the weights barely move between rounds
    times: dict[str, list] = {m: [] for m in cfg["methods"]}
    for it in range(cfg["warmup"] + cfg["repeats"]):
        for m in cfg["methods"]:
            st, ct = one_step(model, opt, METHODS[m], general, target, units)
            if it >= cfg["warmup"]:
                times[m].append((st, ct))
    return {m: {"step_s": statistics.median(t[0] for t in ts), "capture_s": statistics.median(t[1] for t in ts)}
            for m, ts in times.items()}


def memory_worker(cfg: dict) -> dict:
    """Peak RSS above the pre-step baseline for one method, alone in this process."""
    import torch

    model, general, target, units = _setup(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)
    rss0 = _rss_mb()
    for _ in range(2):
        one_step(model, opt, METHODS[cfg["method"]], general, target, units)
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0}


def _subprocess(kind: str, cfg: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, __file__, f"--{kind}", json.dumps(cfg)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} {cfg}: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_all(shapes: list[dict], methods: list[str], warmup: int, repeats: int, threads: int) -> list[dict]:
    from tqdm import tqdm

    out = []
    for s in tqdm(shapes, desc="overhead shapes"):
        timing = _subprocess("time", {**s, "methods": methods, "warmup": warmup, "repeats": repeats}, threads)
        for m in methods:
            mem = _subprocess("memory", {**s, "method": m}, threads)
            out.append({**s, "method": m, **timing[m], **mem})
    return out


def table(results: list[dict], shape_keys: tuple[str, ...]) -> str:
    lines = [
        "| " + " | ".join(shape_keys)
        + " | method | step ms | x full | FLOP bound | x bound | capture ms | peak MB | x full mem |",
        "|" + "---|" * (len(shape_keys) + 9),
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r[k] for k in shape_keys), []).append(r)
    for key, rs in groups.items():
        base = next(r for r in rs if r["method"] == "full (no hooks)")
        for r in rs:
            bound = flop_ratio(r["method"], r["hidden"], r["inter"], r["layers"], r["seq"])
            ratio = r["step_s"] / base["step_s"]
            mem = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else float("nan")
            cap = f"{1000 * r['capture_s']:.1f}" if r["capture_s"] > 1e-4 else "-"
            lines.append(
                "| " + " | ".join(str(k) for k in key)
                + f" | {r['method']} | {1000 * r['step_s']:.1f} | {ratio:.2f} | {bound:.2f} | {ratio / bound:.2f} | "
                f"{cap} | {r['peak_mb']:.0f} | {mem:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", help=argparse.SUPPRESS)
    ap.add_argument("--memory", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke run)")
    ap.add_argument("--main-only", action="store_true", help="only the main table (hidden 256), no scaling tables")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/out/regularizer_overhead")
    args = ap.parse_args()
    if args.time or args.memory:
        fn, cfg = (time_worker, args.time) if args.time else (memory_worker, args.memory)
        print(json.dumps(fn(json.loads(cfg))))
        return
    from drpt_ray.machine import machine_summary

    machine = machine_summary()
    print(f"machine: {machine}", flush=True)

    def shape(h, b, t, layers=4):
        return {"hidden": h, "inter": int(h * 8 / 3) // 16 * 16, "layers": layers, "batch": b, "seq": t}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repeats, warmup = (3, 1) if args.quick else (args.repeats, args.warmup)
    main_shape = [shape(128, 4, 64)] if args.quick else [shape(256, 8, 128)]
    sections = [("main: hidden 256, 4 layers, batch 8, seq 128", main_shape, list(METHODS), ("hidden", "batch", "seq"))]
    if not (args.quick or args.main_only):
        core = ["full (no hooks)", "layerwise ghost", "layerwise sketch", "global one-pass"]
        sections.append(("scaling over batch x seq (hidden 256)",
                         [shape(256, 4, 64), shape(256, 16, 256)], core, ("batch", "seq")))
        sections.append(("scaling over hidden (batch 8, seq 128)",
                         [shape(512, 8, 128), shape(1024, 8, 128)], core, ("hidden",)))
    report = [f"machine: {machine}\n"]
    all_results = []
    for title, shapes, methods, keys in sections:
        res = run_all(shapes, methods, warmup, repeats, args.threads)
        all_results += res
        text = f"### {title}\n\n{table(res, keys)}\n"
        print(text, flush=True)
        report.append(text)
    (out / "results.json").write_text(json.dumps(all_results, indent=1))
    (out / "report.md").write_text("\n".join(report))


if __name__ == "__main__":
    main()
