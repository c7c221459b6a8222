"""Reduction of per-token RL losses to a scalar, shared by the policy, value and KL losses.

Shapes: n responses, T response-token positions; masks are nonzero on response tokens.

Aggregation contract (what the Regularizer relies on, method.md 1.3). For every mode
    aggregate(l, mask, agg) == example_losses(l, mask, agg).sum() / example_units(mask, agg).sum()
and the same identity holds for any subset S of rows (slice l and mask to S first). The
Regularizer keeps a subset S and rescales its summed gradient by N / sum_{i in S} units_i, where
N = sum_j units_j over the whole batch, which turns the batch gradient's S-part into exactly the gradient
of `aggregate` over S alone.
    token_mean              : example loss = sum_t l_it,         units_i = T_i (its token count)
    seq_mean_token_mean     : example loss = (1/T_i) sum_t l_it, units_i = 1
    seq_mean_token_sum      : example loss = sum_t l_it,         units_i = 1
    seq_mean_token_sum_norm : example loss = sum_t l_it,         units_i = L_max (max_len)
`token_mean` averages over all valid tokens of the batch (not a mean of per-sequence means).
`seq_mean_token_sum_norm` is Dr. GRPO's aggregation (Liu et al. 2025, "Understanding R1-Zero-like
training"): the token sum over the batch divided by the constant n * L_max, so a token's weight
depends neither on its response's length (seq_mean_token_mean's 1/T_i favours short correct and long
wrong answers) nor on the batch's total length (token_mean's normaliser). L_max is the configured
maximum response length (rollout max_new_tokens), which the mask cannot know, so these functions
take it as `max_len`; the other modes ignore it.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def check_agg(agg: str, max_len: int | None = None) -> None:
    """Raise ValueError unless `agg` is one of AGG_MODES and `max_len` is given where it needs one.

    Raises:
        ValueError: unknown `agg` (the message lists the valid modes), or agg is
            seq_mean_token_sum_norm and max_len is None or < 1.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; valid: {list(AGG_MODES)}")
    if agg == "seq_mean_token_sum_norm" and (max_len is None or max_len < 1):
        raise ValueError(
            f"loss aggregation 'seq_mean_token_sum_norm' divides by n * max_len: pass max_len, the "
            f"maximum response length (rollout max_new_tokens) as a positive int, got {max_len!r}"
        )


def example_units(mask: torch.Tensor, agg: str, max_len: int | None = None) -> torch.Tensor:
    """Per-example normaliser units (see the module docstring).

    Args:
        mask: (n, T), nonzero on response tokens.
        agg: one of AGG_MODES.
        max_len: L_max, the maximum response length; required by seq_mean_token_sum_norm only.
    Returns:
        (n,) float: token counts for token_mean, max_len for seq_mean_token_sum_norm, ones otherwise.
    Raises:
        ValueError: unknown `agg`; max_len missing for seq_mean_token_sum_norm, or a response
            longer than it (the constant would then not bound the token count).
    """
    check_agg(agg, max_len)
    valid = mask != 0
    if agg == "token_mean":
        return valid.sum(dim=1).to(torch.get_default_dtype())
    if agg == "seq_mean_token_sum_norm":
        # Only a mask wider than max_len can hold a longer response: skip the device sync otherwise.
        if mask.shape[-1] > max_len and bool((valid.sum(dim=1) > max_len).any()):
            raise ValueError(
                f"a response has more than max_len={max_len} tokens; pass the maximum response length"
            )
        return torch.full((mask.shape[0],), float(max_len), device=mask.device)
    return torch.ones(mask.shape[0], device=mask.device)


def example_losses(per_token: torch.Tensor, mask: torch.Tensor, agg: str, max_len: int | None = None) -> torch.Tensor:
    """Per-example numerators of `aggregate` (see the module docstring).

    Args:
        per_token: (n, T) per-token losses; values outside the mask are ignored (even inf/nan).
        mask: (n, T), nonzero on response tokens.
        agg: one of AGG_MODES.
        max_len: required by seq_mean_token_sum_norm (checked here too, so that numerator and
            units refuse the same calls); the numerators themselves never depend on it.
    Returns:
        (n,) in per_token's dtype.
    Raises:
        ValueError: unknown `agg`; max_len missing for seq_mean_token_sum_norm.
    """
    check_agg(agg, max_len)
    valid = mask != 0
    sums = torch.where(valid, per_token, 0.0).sum(dim=1)
    if agg == "seq_mean_token_mean":
        return sums / valid.sum(dim=1).clamp(min=1)
    return sums


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, max_len: int | None = None) -> torch.Tensor:
    """Reduce per-token losses to the scalar batch loss.

    Args:
        per_token: (n, T).
        mask: (n, T), nonzero on response tokens.
        agg: one of AGG_MODES.
        max_len: L_max, the maximum response length; required by seq_mean_token_sum_norm only.
    Returns:
        () scalar: sum of example_losses / sum of example_units (0 when there are no tokens).
    Raises:
        ValueError: unknown `agg`; max_len missing for seq_mean_token_sum_norm (see example_units).
    """
    numer = example_losses(per_token, mask, agg, max_len=max_len).sum()
    denom = example_units(mask, agg, max_len=max_len).sum().to(numer.dtype)
    # No tokens at all: the numerator is 0 too; return 0 instead of 0/0.
    return numer / denom.clamp(min=torch.finfo(numer.dtype).tiny)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over all valid entries, as a Python float (for metrics); 0.0 when none."""
    valid = mask != 0
    return float(torch.where(valid, x.detach(), 0.0).sum() / valid.sum().clamp(min=1))
