"""Target objectives of RL (`algorithm.target_objective`): the loss whose gradient is g_T.

The learner backs the objective of the target rollouts into the regularizer's per-layer cache
(`Learner.capture_target`); every entry is a token-mean over the whole target batch's response
tokens (`TargetInputs.tokens`, global over data-parallel ranks). method.md 3.4 / 4.3;
docs/target-objectives.md says why `token_pg` is the default.

Metadata (`TargetObjectiveMeta`): `standardised_rewards` asks the learner for the batch-standardised
rewards z (global over ranks); `weighs_advantages` says the objective reads the advantages, so the
importance weights that correct stale rollouts (they multiply the advantages) reach it: the
asynchronous loop refuses an objective without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from drpt_ray.registry import Registry

ZERO_VARIANCE_STD = 1e-6


@dataclass(frozen=True)
class TargetInputs:
    """What an objective sees. Shapes: n target rollouts, T response-token positions.

    logp: [n, T] the learner's log-probs of the sampled tokens (with grad).
    mask: [n, T] nonzero on response tokens.
    advantages: [n, T] the target rollouts' own advantages (group-relative with GRPO).
    tokens: the normaliser, response tokens of the whole target batch (all ranks).
    z: [n] batch-standardised rewards over all ranks (objectives with `standardised_rewards`), else None.
    train_loss: the configured policy loss on these rows (this rank's share of the global aggregate).
    """

    logp: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    tokens: torch.Tensor
    z: torch.Tensor | None
    train_loss: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class TargetObjectiveMeta:
    standardised_rewards: bool = False
    weighs_advantages: bool = True


TargetObjectiveFn = Callable[[TargetInputs], torch.Tensor]
TARGET_OBJECTIVES: Registry[TargetObjectiveFn] = Registry("target objective", TargetObjectiveMeta)


def standardised_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """(r - mean) / (std + 1e-8), or r - 0.5 when the batch has no variance (the paper's
    zero-variance guard, so g_T is never zero)."""
    r = rewards.double()
    if r.numel() < 2 or r.std() < ZERO_VARIANCE_STD:
        return r - 0.5
    return (r - r.mean()) / (r.std() + 1e-8)


@TARGET_OBJECTIVES.register("token_pg")
def token_pg(x: TargetInputs) -> torch.Tensor:
    """-sum_{i,t} A_it log pi(y_it) / T: the policy gradient with the target batch's own advantages."""
    return -(x.advantages * x.logp * x.mask).sum() / x.tokens


@TARGET_OBJECTIVES.register("reward", standardised_rewards=True, weighs_advantages=False)
def reward(x: TargetInputs) -> torch.Tensor:
    """-sum_i z_i sum_t log pi(y_it) / T: the paper's RLVR objective, reward-weighted log-likelihood."""
    return -(x.z.to(x.logp.dtype)[:, None] * x.logp * x.mask).sum() / x.tokens


@TARGET_OBJECTIVES.register("train_loss")
def train_loss(x: TargetInputs) -> torch.Tensor:
    """The configured policy loss itself, at ratio 1."""
    return x.train_loss()
