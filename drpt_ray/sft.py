"""Supervised fine-tuning with a Dr. regularizer, in-process (`drpt-ray sft CONFIG.yaml`).

One step, as in method.md 1.4 / 4.1:
  1. (every `refresh_every` steps) capture g_T: backward of the token-mean loss of a target batch
     drawn by cycling a shuffled target pool (separate mode), or carry the target rows inside the
     batch (merged mode);
  2. regularized backward of the general batch's token-mean loss on response tokens: hooked
     weights receive the curated gradient;
  3. clip the curated gradient, AdamW, LR schedule (linear warmup, then linear/cosine/constant).
Every `eval_every` steps the held-out target loss is measured. Metrics go to `metrics.jsonl`, to an
optional callback, and to a progress bar; the run ends with a plot and the saved model.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from drpt_ray.config import OptimSpec, SFTSpec
from drpt_ray.data import Example, load_task, supervised_token_counts, tokenize_sft
from drpt_ray.losses import token_mean_loss
from drpt_ray.models import load_model
from drpt_ray.regularize import Regularizer

MetricsCallback = Callable[[dict], None]


@dataclass
class SFTResult:
    output_dir: Path
    final_eval_loss: float
    best_eval_loss: float
    history: list[dict]


def lr_factor(step: int, total: int, spec: OptimSpec) -> float:
    """Multiplier of the peak LR at `step` (0-based): linear warmup, then the chosen decay."""
    warmup = math.ceil(spec.warmup_frac * total)
    if step < warmup:
        return (step + 1) / warmup
    if spec.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if spec.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def make_optimizer(model: torch.nn.Module, spec: OptimSpec, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, spec))
    return opt, sched


def cycle(pool: list[Example], batch_size: int, rng: random.Random) -> Iterator[list[Example]]:
    """Endless batches from `pool`, reshuffled at every pass (a batch may straddle two passes)."""
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(pool)))
                rng.shuffle(order)
            batch.append(pool[order.pop()])
        yield batch


@torch.no_grad()
def eval_loss(model, batch: dict[str, torch.Tensor], chunk: int = 64) -> float:
    """Token-mean loss over every supervised token of `batch`, in chunks of rows."""
    was_training = model.training
    model.eval()
    n = batch["input_ids"].shape[0]
    total = tokens = 0.0
    for lo in range(0, n, chunk):
        rows = torch.arange(lo, min(n, lo + chunk))
        count = float(supervised_token_counts(batch["labels"][rows]).sum())
        total += float(token_mean_loss(model, batch, rows)) * count
        tokens += count
    model.train(was_training)
    return total / max(tokens, 1.0)


def sft_step(model, reg: Regularizer, opt, sched, general: dict, target: dict | None, spec: SFTSpec) -> dict:
    """One regularized SFT step; returns its metrics."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    metrics: dict = {}
    if spec.regularizer.target_mode == "merged":
        rows_batch = _concat_rows(general, target)
        n_target = target["input_ids"].shape[0]
    else:
        rows_batch, n_target = general, 0
        if target is not None:
            metrics["target_loss"] = _capture(reg, model, target)
    seen: dict = {}

    def loss_fn(rows):
        loss = token_mean_loss(model, rows_batch, rows)
        if rows is None:
            seen["loss"] = float(loss.detach())
        return loss

    stats = reg.backward(loss_fn, supervised_token_counts(rows_batch["labels"]), n_target_rows=n_target)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = spec.optim.max_grad_norm if spec.optim.max_grad_norm is not None else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    metrics.update(loss=seen.get("loss", float("nan")), grad_norm=grad_norm, lr=lr, **stats.summary())
    metrics["time/step_s"] = time.perf_counter() - t0
    return metrics


def _capture(reg: Regularizer, model, target: dict) -> float:
    loss = token_mean_loss(model, target)
    reg.capture_target(loss)
    return float(loss.detach())


def _concat_rows(a: dict, b: dict) -> dict:
    """Stack general rows then target rows (merged mode), right-padding to the longer batch."""
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}

    def widen(t, key):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad[key])

    return {k: torch.cat([widen(a[k], k), widen(b[k], k)]) for k in a}


def train_sft(spec: SFTSpec, on_metrics: MetricsCallback | None = None) -> SFTResult:
    """Run an SFT job end to end. Writes metrics.jsonl, curves.png and model/ under spec.output_dir."""
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(spec.model_dump_json(indent=2))
    torch.manual_seed(spec.seed)
    model, tok = load_model(spec.model, out)
    model.train()
    splits = load_task(spec.data)
    rng = random.Random(spec.seed)
    general_batches = cycle(splits.general, spec.batch_size, rng)
    target_batches = cycle(splits.target, spec.target_batch_size, rng)
    eval_batch = tokenize_sft(tok, splits.eval, spec.data.max_len)
    reg = Regularizer(model, spec.regularizer)
    opt, sched = make_optimizer(model, spec.optim, spec.steps)
    history: list[dict] = []
    evals: list[float] = []
    bar = tqdm(range(spec.steps), disable=not spec.progress, desc=f"sft[{spec.regularizer.feasible_set}]")
    with open(out / "metrics.jsonl", "w") as log:
        for step in bar:
            general = tokenize_sft(tok, next(general_batches), spec.data.max_len)
            wants_target = spec.regularizer.target_mode == "merged" or reg.needs_refresh(step)
            target = tokenize_sft(tok, next(target_batches), spec.data.max_len) if wants_target else None
            m = {"step": step + 1, **sft_step(model, reg, opt, sched, general, target, spec)}
            if (step + 1) % spec.eval_every == 0 or step == 0 or step + 1 == spec.steps:
                m["eval/target_loss"] = eval_loss(model, eval_batch)
                evals.append(m["eval/target_loss"])
                bar.set_postfix(loss=f"{m['loss']:.3f}", eval=f"{evals[-1]:.3f}")
            history.append(m)
            log.write(json.dumps(m) + "\n")
            log.flush()
            if on_metrics is not None:
                on_metrics(m)
    reg.remove()
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    plot_curves(history, out / "curves.png", title=f"SFT {spec.regularizer.feasible_set}")
    return SFTResult(out, final_eval_loss=evals[-1], best_eval_loss=min(evals), history=history)


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Training loss and held-out target loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=0.8, alpha=0.6, label="general-batch loss")
    ev = [(h["step"], h["eval/target_loss"]) for h in history if "eval/target_loss" in h]
    ax.plot([s for s, _ in ev], [v for _, v in ev], marker="o", ms=3, label="held-out target loss")
    ax.set_xlabel("step")
    ax.set_ylabel("token-mean CE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
