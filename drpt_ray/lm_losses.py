"""Causal-LM losses with explicit normalisation, shared by SFT, the target objectives and the tests.

A batch is a dict with `input_ids`, `attention_mask` and `labels` (n, L); labels are -100 where
nothing is supervised. The loss predicts labels[:, 1:] from logits[:, :-1], so an example's
supervised token count is `(labels[:, 1:] != -100).sum(1)`: the count the loss really averages
over (method.md 9.1), and the `units` the Regularizer rescales by.

The loss is computed in the model's dtype (float64 models get a float64 loss; HF's
`outputs.loss` would upcast to float32 only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def select_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The sub-batch of `rows` (all rows when None)."""
    if rows is None:
        return batch
    return {k: v[rows] for k, v in batch.items()}


def concat_rows(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack a's rows then b's (general then target rows, merged mode), right-padding to the longer batch."""
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}

    def widen(t: torch.Tensor, key: str) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=pad[key])

    return {k: torch.cat([widen(a[k], k), widen(b[k], k)]) for k in a}


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t >= 1 from a causal LM's logits over `input_ids`: (n, L-1)."""
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t >= 1: (n, L-1) in the model's dtype."""
    return next_token_logprobs(model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits,
                               input_ids)


def sequence_loss_sums(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed token cross-entropy and supervised token counts: ((n,), (n,))."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    n, t = labels.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(n * t, -1), labels.reshape(-1), ignore_index=-100, reduction="none")
    return ce.view(n, t).sum(dim=1), (labels != -100).sum(dim=1)


def token_mean_loss(model, batch: dict[str, torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
    """Token-mean cross-entropy over the supervised tokens of `rows` (all rows when None)."""
    sums, counts = sequence_loss_sums(model, select_rows(batch, rows))
    return sums.sum() / counts.sum().clamp(min=1)
