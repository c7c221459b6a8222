"""Feasible sets: how the general batch may be re-weighted, and the choice that aligns best with g_T.

Every rule returns *membership weights* pi (n,) >= 0 over the general examples. The curated
gradient is then the gradient of the pi-weighted normalised loss computed on the general batch:

    d = sum_i omega_i G_i,   omega_i = N * pi_i / sum_j pi_j u_j          (0 when sum_j pi_j u_j = 0)

where G_i is example i's gradient as it appears in the batch loss (carrying the loss normaliser
1/N) and u_i its normaliser units (supervised tokens for a token-mean loss). For a hard subset S
(pi = 1 on S) this is exactly method.md 1.3: d(S) = (T_B / T_S) sum_{i in S} G_i, the token-mean
gradient of S alone; an empty S gives d = 0.

Rules (method.md 1.2; which set uses which is in the registry, `sets.py`):
- `full`: pi = 1 (the ordinary batch gradient).
- `topk`: S = the k = max(1, floor(frac * n)) largest scores; ties broken by the lowest index so runs
  are reproducible.
- `filter`: S = {s_i >= 0} plus the least negative examples: of the negatives, the floor(frac * #neg)
  most negative are dropped. frac = 1 keeps exactly the non-negatives; frac = 0 keeps everything.
  Exactly-zero scores are kept.
- `soft` (beyond the paper): pi = softmax(s / (tau * sigma)), sigma = the population std of the scores
  being weighted (so tau is dimensionless and comparable across layers and steps). tau -> inf gives
  pi uniform = full training; tau -> 0 gives one-hot on the argmax = top-1. Any hard subset with
  uniform pi on S is also a special case, so the continuous knob interpolates the same spectrum
  that frac walks in steps. Constant scores (sigma = 0) give uniform weights.
"""

from __future__ import annotations

import math

import torch

from drpt_ray.config import RegularizerSpec
from drpt_ray.feasible_sets import FEASIBLE_SETS


def topk_weights(scores: torch.Tensor, frac: float) -> torch.Tensor:
    """Indicator of the k = max(1, floor(frac * n)) largest scores (stable: lowest index wins ties)."""
    n = scores.numel()
    k = max(1, math.floor(frac * n + 1e-9))
    order = torch.argsort(-scores, stable=True)
    pi = torch.zeros_like(scores)
    pi[order[:k]] = 1.0
    return pi


def filter_weights(scores: torch.Tensor, frac: float) -> torch.Tensor:
    """Indicator of s_i >= 0, plus the negatives that survive dropping floor(frac * #neg) most negative."""
    pi = (scores >= 0).to(scores.dtype)
    neg = torch.nonzero(scores < 0).flatten()
    n_drop = math.floor(frac * neg.numel() + 1e-9)
    if n_drop < neg.numel():
        # Keep the least negative ones: sort negatives ascending, skip the n_drop most negative.
        order = neg[torch.argsort(scores[neg], stable=True)]
        pi[order[n_drop:]] = 1.0
    return pi


def soft_weights(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """pi = softmax(s / (tau * std(s))); uniform when the scores are all equal."""
    sigma = scores.std(unbiased=False) if scores.numel() > 1 else scores.new_zeros(())
    if not torch.isfinite(sigma) or sigma <= 0:
        return torch.full_like(scores, 1.0 / scores.numel())
    return torch.softmax(scores / (tau * sigma), dim=0)


def subset_weights(scores: torch.Tensor, spec: RegularizerSpec) -> torch.Tensor:
    """The hard-subset rule named by `spec.selection` (top-k or filtering)."""
    if spec.selection == "topk":
        return topk_weights(scores, spec.frac)
    return filter_weights(scores, spec.frac)


def membership(scores: torch.Tensor, spec: RegularizerSpec) -> torch.Tensor:
    """pi (n,) of the configured feasible set from its scores: the soft rule or the hard subset rule."""
    if FEASIBLE_SETS.get(spec.feasible_set).soft:
        return soft_weights(scores, spec.tau)
    return subset_weights(scores, spec)


def example_weights(pi: torch.Tensor, units: torch.Tensor, normaliser: float) -> torch.Tensor:
    """omega_i = N * pi_i / sum_j pi_j u_j: turns membership into per-example gradient multipliers."""
    mass = (pi * units).sum()
    if mass <= 0:
        return torch.zeros_like(pi)
    return pi * (normaliser / mass)


def kept_fraction(pi: torch.Tensor) -> float:
    """|S| / n for hard subsets; the effective-sample-size fraction (sum pi)^2 / (n sum pi^2) for soft."""
    n = pi.numel()
    denom = (pi * pi).sum()
    if denom <= 0:
        return 0.0
    return float(pi.sum() ** 2 / (n * denom))
