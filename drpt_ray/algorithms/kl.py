"""Per-token KL estimators for KL(pi || ref) from tokens sampled from pi, and their two uses.

Schulman's estimators ("Approximating KL divergence", 2020), with d = ref_logp - logp:
    k1 = -d                   unbiased, can be negative, high variance
    k2 = 0.5 d^2              biased, non-negative, low variance
    k3 = exp(d) - d - 1       unbiased, non-negative, low variance (verl's "low_var_kl")
All take (n, T) log-probs of the sampled tokens and return (n, T).

Uses: `kl_penalty_tokens` for KL in the reward (token_rewards of the advantage estimators;
RLHF/TRL style) and `kl_loss` for KL as a loss term (RLVR/verl style: k3, coef 0.001).
"""

from __future__ import annotations

from typing import Callable

import torch

from drpt_ray.algorithms.aggregation import aggregate
from drpt_ray.registry import Registry

KLFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """logp - ref_logp: (n, T) -> (n, T)."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """0.5 (logp - ref_logp)^2: (n, T) -> (n, T)."""
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(d) - d - 1 with d = ref_logp - logp: (n, T) -> (n, T), always >= 0.

    Clamped as verl's low_var_kl (which the paper's RLVR runs used): d to [-20, 20] so exp cannot
    overflow when the learner finds a sampled token near-impossible, and the result to at most
    10. Both clamps are inactive for |d| <~ 2.5 and only cut the gradient of outlier tokens.
    """
    d = torch.clamp(ref_logp - logp, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(d) - d - 1.0, max=10.0)


def kl_penalty_tokens(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1", coef: float = 0.0) -> torch.Tensor:
    """Per-token reward penalty -coef * KL for KL in the reward (AdvantageInputs.token_rewards).

    Detached: a reward carries no gradient.

    Args:
        logp: (n, T) log-probs of the sampled tokens under the policy.
        ref_logp: (n, T) under the reference policy.
        kind: a KL_ESTIMATORS name.
        coef: KL coefficient beta.
    Returns:
        (n, T) penalties (masking is left to the advantage estimators).
    Raises:
        ValueError: unknown `kind`.
    """
    return -coef * KL_ESTIMATORS.get(kind)(logp.detach(), ref_logp.detach())


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "k3",
    agg: str = "token_mean",
    max_len: int | None = None,
) -> torch.Tensor:
    """KL to the reference as a loss term (the caller multiplies by its coefficient).

    Args:
        logp: (n, T) policy log-probs (differentiable).
        ref_logp: (n, T) reference log-probs.
        mask: (n, T), nonzero on response tokens.
        kind: a KL_ESTIMATORS name.
        agg: one of aggregation.AGG_MODES.
        max_len: maximum response length; required by seq_mean_token_sum_norm only.
    Returns:
        () scalar.
    Raises:
        ValueError: unknown `kind` or `agg`, or max_len missing for seq_mean_token_sum_norm.
    """
    return aggregate(KL_ESTIMATORS.get(kind)(logp, ref_logp.detach()), mask, agg, max_len=max_len)
