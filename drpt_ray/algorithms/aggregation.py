"""Reduction of per-token RL losses to a scalar, shared by the policy, value and KL losses.

Shapes: n responses, T response-token positions; masks are nonzero on response tokens.

Aggregation contract (what the Regularizer relies on, method.md 1.3). For every mode
    aggregate(l, mask, agg) == example_losses(l, mask, agg).sum() / example_units(mask, agg).sum()
and the same identity holds for any subset S of rows (slice l and mask to S first). The
Regularizer keeps a subset S and rescales its summed gradient by N / sum_{i in S} units_i, where
N = sum_j units_j over the whole batch, which turns the batch gradient's S-part into exactly the gradient
of `aggregate` over S alone.
    token_mean           : example loss = sum_t l_it,            units_i = T_i (its token count)
    seq_mean_token_mean  : example loss = (1/T_i) sum_t l_it,    units_i = 1
    seq_mean_token_sum   : example loss = sum_t l_it,            units_i = 1
`token_mean` averages over all valid tokens of the batch (not a mean of per-sequence means).
"""

from __future__ import annotations

import torch

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def check_agg(agg: str) -> None:
    """Raise ValueError listing the valid modes unless `agg` is one of AGG_MODES."""
    if agg not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; valid: {list(AGG_MODES)}")


def example_units(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Per-example normaliser units (see the module docstring).

    Args:
        mask: (n, T), nonzero on response tokens.
        agg: one of AGG_MODES.
    Returns:
        (n,) float: token counts for token_mean, ones otherwise.
    Raises:
        ValueError: unknown `agg`.
    """
    check_agg(agg)
    valid = mask != 0
    if agg == "token_mean":
        return valid.sum(dim=1).to(torch.get_default_dtype())
    return torch.ones(mask.shape[0], device=mask.device)


def example_losses(per_token: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Per-example numerators of `aggregate` (see the module docstring).

    Args:
        per_token: (n, T) per-token losses; values outside the mask are ignored (even inf/nan).
        mask: (n, T), nonzero on response tokens.
        agg: one of AGG_MODES.
    Returns:
        (n,) in per_token's dtype.
    Raises:
        ValueError: unknown `agg`.
    """
    check_agg(agg)
    valid = mask != 0
    sums = torch.where(valid, per_token, 0.0).sum(dim=1)
    if agg == "seq_mean_token_mean":
        return sums / valid.sum(dim=1).clamp(min=1)
    return sums


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Reduce per-token losses to the scalar batch loss.

    Args:
        per_token: (n, T).
        mask: (n, T), nonzero on response tokens.
        agg: one of AGG_MODES.
    Returns:
        () scalar: sum of example_losses / sum of example_units (0 when there are no tokens).
    Raises:
        ValueError: unknown `agg`.
    """
    numer = example_losses(per_token, mask, agg).sum()
    denom = example_units(mask, agg).sum().to(numer.dtype)
    # No tokens at all: the numerator is 0 too; return 0 instead of 0/0.
    return numer / denom.clamp(min=torch.finfo(numer.dtype).tiny)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over all valid entries, as a Python float (for metrics); 0.0 when none."""
    valid = mask != 0
    return float(torch.where(valid, x.detach(), 0.0).sum() / valid.sum().clamp(min=1))
