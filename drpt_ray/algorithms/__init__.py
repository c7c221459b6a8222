"""RL algorithms in pure torch: advantage estimators, policy/value losses, KL estimators, and the
stability toolkit (entropy, truncated importance sampling, dynamic sampling, pass@k, divergence
guard), and the target objectives whose gradient the regularizer projects onto.

Each kind has one registry (`ADVANTAGE_ESTIMATORS`, `POLICY_LOSSES`, `KL_ESTIMATORS`,
`TARGET_OBJECTIVES`) with one
signature; importing this package registers the built-ins, so every Ray actor that imports it
sees them. Config names a built-in ("grpo") or a user function by import path ("pkg.mod:fn").
"""

from drpt_ray.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageFn,
    AdvantageInputs,
    AdvantageMeta,
    compute_advantages,
    gae_returns,
    masked_whiten,
)
from drpt_ray.algorithms.aggregation import AGG_MODES, aggregate, example_losses, example_units
from drpt_ray.algorithms.kl import KL_ESTIMATORS, KLFn, kl_loss, kl_penalty_tokens
from drpt_ray.algorithms.losses import (
    POLICY_LOSSES,
    PolicyLossFn,
    PolicyLossInputs,
    PolicyLossOutput,
    ValueLossOutput,
    value_loss,
)
from drpt_ray.algorithms.target import TARGET_OBJECTIVES, TargetInputs, TargetObjectiveFn, standardised_rewards
from drpt_ray.algorithms.stability import (
    DivergenceGuard,
    Refill,
    between_prompt_variance_fraction,
    has_reward_variance,
    mismatch_kl,
    pass_at_k,
    correction_metrics,
    correction_weights,
    log_ratios,
    refill,
    token_entropy,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "AdvantageFn",
    "AdvantageInputs",
    "AdvantageMeta",
    "DivergenceGuard",
    "KLFn",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "PolicyLossFn",
    "PolicyLossInputs",
    "PolicyLossOutput",
    "Refill",
    "TARGET_OBJECTIVES",
    "TargetInputs",
    "TargetObjectiveFn",
    "ValueLossOutput",
    "aggregate",
    "between_prompt_variance_fraction",
    "compute_advantages",
    "correction_metrics",
    "correction_weights",
    "example_losses",
    "example_units",
    "gae_returns",
    "has_reward_variance",
    "kl_loss",
    "kl_penalty_tokens",
    "log_ratios",
    "masked_whiten",
    "mismatch_kl",
    "pass_at_k",
    "refill",
    "standardised_rewards",
    "token_entropy",
    "value_loss",
]
