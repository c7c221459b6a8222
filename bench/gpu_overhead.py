"""The regularizer's price on a GPU at the paper's benchmark setting: torch + transformers (+ peft) only.

    python bench/gpu_overhead.py                        # Llama-3.2-1B shape, random weights, bf16, sdpa, on cuda
    python bench/gpu_overhead.py --tiny --device cpu    # a tiny shape (what tests/test_gpu_overhead.py runs)

No Ray and no vLLM: it runs where only torch, transformers and peft are installed (the GPU machine
this project is lent has torch 2.11 + CUDA 13 and no network; drpt_ray also needs pydantic and
PyYAML there, see bench/README.md). A random-weight Llama of Llama-3.2-1B's shape (hidden 2048, 16
layers, 32/8 heads, MLP 8192, vocab 128256, tied embeddings) in bf16 with sdpa attention, a batch
of `--rows` general rows and `--target-rows` target rows of `--seq` tokens (random ids, the first
quarter a prompt without labels), token-mean cross-entropy, AdamW. Trained weights: LoRA r 32 on
every linear layer, then full fine-tuning. Per round, interleaved, each variant one optimizer step:

  plain, general rows        backward of the general rows only
  plain, same rows           backward of general + target rows: the fair baseline
  <set>, separate            capture_target on the target rows (own forward + backward), then the
                             regularized backward of the general rows
  <set>, merged              one forward + backward of general + target rows (target_mode merged)

for the layer-wise subset (ghost kernel) and the one-pass global subset, top-k 0.5. Reported per
variant: median step seconds (CUDA synchronised), x plain general rows, x plain same rows, the FLOP
bound of that ratio (regularizer.md's unit count: a hooked block adds a score, +1 unit, and
assembles the kept fraction f instead of the whole gradient, on the general rows' tokens only) and
peak memory. Output: a table on stdout and, with --out, a markdown file.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

FRAC = 0.5
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True,
                rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True)
SETS = {"layer-wise": {"feasible_set": "layerwise_subset", "kernel": "ghost"},
        "global one-pass": {"feasible_set": "global_subset"}}


def build(config: dict, lora_r: int | None, dtype: torch.dtype, device: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa")).to(dtype=dtype, device=device)
    if lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear"))
    return model.train()


def rows(n: int, seq: int, vocab: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def variants() -> dict[str, dict | None]:
    out: dict[str, dict | None] = {"plain, general rows": None, "plain, same rows": None}
    for name, reg in SETS.items():
        out[f"{name}, separate"] = reg | {"target_mode": "separate"}
        out[f"{name}, merged"] = reg | {"target_mode": "merged"}
    return out


def step(model: nn.Module, opt, name: str, reg: dict | None, general: dict, target: dict, device: str) -> float:
    """Seconds of one optimizer step of variant `name` (hooks installed before the clock starts)."""
    from drpt_ray.config import RegularizerSpec
    from drpt_ray.data import supervised_token_counts
    from drpt_ray.lm_losses import concat_rows, token_mean_loss
    from drpt_ray.regularize import Regularizer

    both = concat_rows(general, target)
    r = Regularizer(model, RegularizerSpec(**reg, selection="topk", frac=FRAC)) if reg is not None else None
    _sync(device)
    t0 = time.perf_counter()
    if r is None:
        token_mean_loss(model, both if name == "plain, same rows" else general).backward()
    elif reg["target_mode"] == "separate":
        r.capture_target(token_mean_loss(model, target))
        r.backward(lambda idx: token_mean_loss(model, general, idx), supervised_token_counts(general["labels"]))
    else:
        r.backward(lambda idx: token_mean_loss(model, both, idx), supervised_token_counts(both["labels"]),
                   n_target_rows=target["input_ids"].shape[0])
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - t0
    if r is not None:
        r.remove()
    return seconds


def flop_bound(model: nn.Module, general_rows: int, target_rows: int) -> float:
    """Regularized / plain FLOPs on the same rows (module docstring), counted over the model's Linear
    layers only: attention's own matmuls cost the same in every variant, so leaving them out makes
    the bound a little higher than the true one."""
    from drpt_ray.regularize.hooks import find_blocks

    hooked = {id(b.module) for b in find_blocks(model, False, [])}
    base = extra = 0.0
    for m in model.modules():
        if type(m) is nn.Linear:
            units = m.in_features * m.out_features
            base += units * (3 if m.weight.requires_grad else 2)
            if id(m) in hooked:
                extra += FRAC * units
    return 1 + general_rows / (general_rows + target_rows) * extra / base


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args, lora_r: int | None) -> list[tuple]:
    dtype = getattr(torch, args.dtype)
    model = build(TINY if args.tiny else LLAMA_1B, lora_r, dtype, args.device)
    vocab = model.config.vocab_size
    general = rows(args.rows, args.seq, vocab, args.device, 0)
    target = rows(args.target_rows, args.seq, vocab, args.device, 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)
    times: dict[str, list[float]] = {name: [] for name in variants()}
    peak: dict[str, float] = {}
    for it in range(args.warmup + args.repeats):
        for name, reg in variants().items():
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            s = step(model, opt, name, reg, general, target, args.device)
            if args.device.startswith("cuda"):
                peak[name] = torch.cuda.max_memory_allocated() / 2**30
            if it >= args.warmup:
                times[name].append(s)
    med = {k: statistics.median(v) for k, v in times.items()}
    bound = flop_bound(model, args.rows, args.target_rows)
    trained = f"LoRA r {lora_r}" if lora_r else "full fine-tuning"
    out = []
    for name, s in med.items():
        same = s / med["plain, same rows"]
        b = 1.0 if name.startswith("plain") else bound
        out.append((trained, name, s, s / med["plain, general rows"], same, b, same / b, peak.get(name, float("nan"))))
    del model, opt
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-64 Llama instead of the 1B shape")
    ap.add_argument("--rows", type=int, default=16, help="general rows (n)")
    ap.add_argument("--target-rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512, help="tokens per row (T)")
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = measure(args, args.lora_r) + measure(args, None)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    head = (f"{'tiny Llama' if args.tiny else 'Llama-3.2-1B shape (random weights)'}, {args.dtype}, sdpa, {name}, "
            f"torch {torch.__version__}; {args.rows} general + {args.target_rows} target rows of {args.seq} tokens; "
            f"top-k {FRAC}; medians of {args.repeats} interleaved rounds after {args.warmup} warm-up; "
            f"{time.perf_counter() - t0:.0f} s in all")
    lines = ["| trained | variant | step s | x plain, general rows | x plain, same rows | FLOP bound | x bound "
             "| peak GiB |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t} | {v} | {s:.4f} | {g:.2f} | {same:.2f} | {b:.3f} | {xb:.2f} | {'-' if m != m else f'{m:.1f}'} |"
              for t, v, s, g, same, b, xb, m in results]
    report = head + "\n\n" + "\n".join(lines) + "\n"
    print(report, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return report


if __name__ == "__main__":
    main()
