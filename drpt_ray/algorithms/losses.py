"""Policy losses (one registry, one signature) and the PPO value loss.

Shapes: n responses, T response-token positions; masks are nonzero on response tokens. Every loss
reduces its per-token terms with `aggregate` (re-exported here with `example_units` and
`example_losses`; the per-example normalisation contract the Regularizer relies on is documented
in `drpt_ray.algorithms.aggregation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from drpt_ray.algorithms.aggregation import AGG_MODES, aggregate, check_agg, example_losses, example_units, masked_mean
from drpt_ray.algorithms.kl import k3
from drpt_ray.registry import Registry

__all__ = [
    "AGG_MODES",
    "POLICY_LOSSES",
    "PolicyLossFn",
    "PolicyLossInputs",
    "PolicyLossOutput",
    "ValueLossOutput",
    "aggregate",
    "example_losses",
    "example_units",
    "ppo_clip",
    "reinforce",
    "value_loss",
]


@dataclass(frozen=True)
class PolicyLossInputs:
    """Everything any policy loss may read.

    Attributes:
        logprobs: (n, T) log pi_theta of the sampled tokens (differentiable).
        old_logprobs: (n, T) behaviour-policy log-probs, computed by the learner at rollout time.
        advantages: (n, T).
        response_mask: (n, T), nonzero on response tokens.
        clip_eps: lower clip: the ratio is clamped to [1 - clip_eps, 1 + clip_eps_high].
        clip_eps_high: upper clip; None means clip_eps (DAPO's clip-higher when larger).
        agg: one of AGG_MODES.
        max_len: maximum response length (rollout max_new_tokens); required by
            seq_mean_token_sum_norm, ignored by the other modes.

    Raises:
        ValueError: shape mismatch, unknown `agg`, or max_len missing for seq_mean_token_sum_norm.
    """

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    response_mask: torch.Tensor
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    agg: str = "token_mean"
    max_len: int | None = None

    def __post_init__(self) -> None:
        shape = self.logprobs.shape
        for name in ("old_logprobs", "advantages", "response_mask"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} must match logprobs {tuple(shape)}, got {tuple(getattr(self, name).shape)}")
        check_agg(self.agg, self.max_len)


@dataclass(frozen=True)
class PolicyLossOutput:
    """loss: () differentiable scalar. clip_frac: fraction of valid tokens where the clipped
    branch is the active one. approx_kl: k3 estimate of KL(old || current), token mean."""

    loss: torch.Tensor
    clip_frac: float
    approx_kl: float


PolicyLossFn = Callable[[PolicyLossInputs], PolicyLossOutput]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


def _approx_kl(inputs: PolicyLossInputs) -> float:
    # Samples come from the behaviour policy, so k3(old, current) estimates KL(old || current)
    # without bias and is never negative (verl's k1 metric can be).
    return masked_mean(k3(inputs.old_logprobs.detach(), inputs.logprobs.detach()), inputs.response_mask)


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(inputs: PolicyLossInputs) -> PolicyLossOutput:
    """PPO clipped surrogate: per token max(-A r, -A clip(r, 1 - eps, 1 + eps_high)).

    r = exp(logprobs - old_logprobs). With old == current (first step on fresh rollouts) the
    loss value is -A and its gradient is that of `reinforce`.

    Args:
        inputs: logprobs, old_logprobs, advantages, response_mask, clip_eps, clip_eps_high, agg, max_len.
    Returns:
        loss aggregated with `inputs.agg`; clip_frac over all valid tokens; approx_kl.
    """
    eps_high = inputs.clip_eps if inputs.clip_eps_high is None else inputs.clip_eps_high
    ratio = torch.exp(inputs.logprobs - inputs.old_logprobs)
    unclipped = -inputs.advantages * ratio
    clipped = -inputs.advantages * torch.clamp(ratio, 1.0 - inputs.clip_eps, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    return PolicyLossOutput(
        loss=aggregate(per_token, inputs.response_mask, inputs.agg, max_len=inputs.max_len),
        clip_frac=masked_mean((clipped > unclipped).to(per_token.dtype), inputs.response_mask),
        approx_kl=_approx_kl(inputs),
    )


@POLICY_LOSSES.register("reinforce")
def reinforce(inputs: PolicyLossInputs) -> PolicyLossOutput:
    """Plain policy gradient: per token -A log pi (no ratio, no clipping; clip_frac is 0).

    Args:
        inputs: logprobs, advantages, response_mask, agg, max_len (old_logprobs only for approx_kl).
    Returns:
        loss aggregated with `inputs.agg`; clip_frac 0.0; approx_kl.
    """
    per_token = -inputs.advantages * inputs.logprobs
    return PolicyLossOutput(
        loss=aggregate(per_token, inputs.response_mask, inputs.agg, max_len=inputs.max_len),
        clip_frac=0.0,
        approx_kl=_approx_kl(inputs),
    )


@dataclass(frozen=True)
class ValueLossOutput:
    """loss: () differentiable scalar. clip_frac: fraction of valid tokens where the clipped
    error is the larger one."""

    loss: torch.Tensor
    clip_frac: float


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    agg: str = "token_mean",
    max_len: int | None = None,
) -> ValueLossOutput:
    """PPO clipped value loss: per token 0.5 max((V - R)^2, (V_clip - R)^2).

    V_clip = old_values + clamp(values - old_values, -clip, clip): the critic is kept near the
    values it had at rollout time, as the policy is by the ratio clip. clip=None: unclipped.

    Args:
        values: (n, T) current critic values (differentiable).
        old_values: (n, T) values at rollout time.
        returns: (n, T) value targets, e.g. from `gae_returns`.
        mask: (n, T), nonzero on response tokens.
        clip: value clip range, or None.
        agg: one of AGG_MODES.
        max_len: maximum response length; required by seq_mean_token_sum_norm only.
    Returns:
        ValueLossOutput.
    Raises:
        ValueError: unknown `agg`, or max_len missing for seq_mean_token_sum_norm.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        return ValueLossOutput(loss=0.5 * aggregate(unclipped, mask, agg, max_len=max_len), clip_frac=0.0)
    clipped = (old_values + torch.clamp(values - old_values, -clip, clip) - returns) ** 2
    return ValueLossOutput(
        loss=0.5 * aggregate(torch.maximum(unclipped, clipped), mask, agg, max_len=max_len),
        clip_frac=masked_mean((clipped > unclipped).to(values.dtype), mask),
    )
