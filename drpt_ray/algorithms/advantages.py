"""Advantage estimators: one registry, one signature `fn(AdvantageInputs) -> (n, T) advantages`
(an estimator that trains a critic returns its value targets too: see `AdvantageMeta`).

Shapes: n responses, T response-token positions (right padding; `response_mask` is nonzero on
response tokens). Every estimator returns per-token advantages that are exactly 0 outside the mask.

Choices shared by the estimators:
- Standard deviations are the *sample* (Bessel-corrected, n-1) ones. verl, whose GRPO the paper's
  RLVR runs used, takes `torch.std` (unbiased) for the group std and an unbiased masked variance in
  `masked_whiten`; matching it keeps advantages comparable with the paper's runs. For a group of
  rewards [1, 0, 0, 1] this gives +-0.866 rather than the population-std +-1.
- The outcome estimators (grpo, grpo_no_std, rloo) score a response by its return
  `rewards + sum_t token_rewards` (verl's `token_level_rewards.sum(-1)`), so a KL-in-reward penalty
  is never silently dropped.
- A group of one response has no baseline: its outcome advantage is 0. When *every* group has size
  1 the whole batch would train on nothing, so those estimators raise instead (verl and OpenRLHF
  silently give a no-op or an un-baselined reward there).
- Discounting and GAE run over response tokens: a masked position inside a response (e.g. a tool
  output in a multi-turn rollout) is not a time step, it passes the return through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from drpt_ray.registry import Registry


@dataclass(frozen=True)
class AdvantageInputs:
    """Everything any estimator may read; estimators ignore fields they do not use.

    Attributes:
        rewards: (n,) sequence-level scalar rewards.
        group_ids: (n,) integer; responses to the same prompt share an id.
        response_mask: (n, T) bool/float, nonzero on response tokens.
        values: (n, T) critic values V(s_t), required by `gae`.
        token_rewards: (n, T) per-token rewards added to the outcome reward, e.g. the KL
            penalty `kl_penalty_tokens(...)` when KL is in the reward.
        gamma: discount over response tokens.
        lam: GAE lambda.
        eps: added to standard deviations before dividing.
        whiten: `gae` only: whiten advantages over all valid tokens of the batch.
            (REINFORCE++ always whitens; that is its definition.)

    Raises:
        ValueError: inconsistent shapes, non-integer group ids or an empty batch.
    """

    rewards: torch.Tensor
    group_ids: torch.Tensor
    response_mask: torch.Tensor
    values: torch.Tensor | None = None
    token_rewards: torch.Tensor | None = None
    gamma: float = 1.0
    lam: float = 1.0
    eps: float = 1e-6
    whiten: bool = True

    def __post_init__(self) -> None:
        if self.response_mask.dim() != 2 or self.response_mask.shape[0] == 0:
            raise ValueError(f"response_mask must be (n, T) with n >= 1, got {tuple(self.response_mask.shape)}")
        n = self.response_mask.shape[0]
        for name in ("rewards", "group_ids"):
            if tuple(getattr(self, name).shape) != (n,):
                raise ValueError(f"{name} must be ({n},), got {tuple(getattr(self, name).shape)}")
        for name in ("values", "token_rewards"):
            t = getattr(self, name)
            if t is not None and t.shape != self.response_mask.shape:
                want = tuple(self.response_mask.shape)
                raise ValueError(f"{name} must match response_mask {want}, got {tuple(t.shape)}")
        if self.group_ids.is_floating_point() or self.group_ids.is_complex():
            raise ValueError(f"group_ids must be an integer tensor, got {self.group_ids.dtype}")


@dataclass(frozen=True)
class AdvantageMeta:
    """What an estimator needs from the rest of the job (`ADVANTAGE_ESTIMATORS.meta(name)`).

    Attributes:
        needs_critic: it reads `AdvantageInputs.values`, so the learner trains a value head, and it
            returns (advantages, value targets) for that head instead of advantages alone.
        needs_groups: it baselines within the group of responses to one prompt, so a job must
            sample rollout.sampling.n >= 2 (with n = 1 every advantage would be 0).
    """

    needs_critic: bool = False
    needs_groups: bool = False


AdvantageFn = Callable[[AdvantageInputs], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator", AdvantageMeta)


def compute_advantages(name: str, inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the estimator `name` (registered or "module:function").

    Returns:
        advantages (n, T), and the critic's value targets (n, T) when the estimator needs a
        critic (None otherwise).
    """
    out = ADVANTAGE_ESTIMATORS.get(name)(inputs)
    return out if ADVANTAGE_ESTIMATORS.meta(name).needs_critic else (out, None)


def _dtype(inputs: AdvantageInputs) -> torch.dtype:
    """Floating dtype of the computation: the rewards' own, or the default for integer rewards."""
    return inputs.rewards.dtype if inputs.rewards.is_floating_point() else torch.get_default_dtype()


def _token_rewards(inputs: AdvantageInputs) -> torch.Tensor:
    """(n, T) reward per token: `rewards` at each row's last response token plus `token_rewards`.

    `torch.where`, not a multiply, so that padding holding inf/nan cannot leak in.
    """
    mask = inputs.response_mask != 0
    n, t = mask.shape
    positions = torch.arange(t, device=mask.device).expand(n, t)
    last = torch.where(mask, positions, -1).amax(dim=1)  # -1: the row has no response token
    out = torch.zeros(n, t, dtype=_dtype(inputs), device=mask.device)
    has_tokens = last >= 0
    rows = torch.arange(n, device=mask.device)[has_tokens]
    out[rows, last[has_tokens]] = inputs.rewards[has_tokens].to(out.dtype)
    if inputs.token_rewards is not None:
        out = out + torch.where(mask, inputs.token_rewards.to(out.dtype), 0.0)
    return out


def _returns_per_sequence(inputs: AdvantageInputs) -> torch.Tensor:
    """(n,) undiscounted return of each response: rewards + sum of its masked token_rewards.

    Computed from `rewards` directly, not from `_token_rewards`, so a response without tokens
    still counts in its group's baseline.
    """
    scores = inputs.rewards.to(_dtype(inputs))
    if inputs.token_rewards is None:
        return scores
    return scores + torch.where(inputs.response_mask != 0, inputs.token_rewards.to(scores.dtype), 0.0).sum(dim=1)


def _group_stats(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row group size, group sum and group sample std.

    Args:
        scores: (n,) float.
        group_ids: (n,) integer.
    Returns:
        counts (n,), sums (n,), std (n,): each row gets its group's value; std is the Bessel-
        corrected one and 0 for groups of size 1.
    Raises:
        ValueError: every group has size 1 (no baseline anywhere; training would be a no-op).
    """
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if int(counts.max()) < 2:
        raise ValueError(
            "every group has a single response, so no group baseline exists and every advantage "
            "would be 0; sample n >= 2 responses per prompt"
        )
    counts = counts.to(scores.dtype)
    sums = torch.zeros_like(counts).index_add_(0, inverse, scores)
    mean = sums / counts
    sq = torch.zeros_like(counts).index_add_(0, inverse, (scores - mean[inverse]) ** 2)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))
    return counts[inverse], sums[inverse], std[inverse]


def _broadcast(per_sequence: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(n,) -> (n, T): the sequence value on every response token, 0 elsewhere."""
    return torch.where(response_mask != 0, per_sequence[:, None], 0.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - masked mean) / (masked sample std + eps) over all valid entries; 0 outside the mask.

    Args:
        x: (n, T) float.
        mask: (n, T), nonzero on valid entries.
        eps: added to the std.
    Returns:
        (n, T) whitened x, exactly 0 where mask is 0 (and everywhere when nothing is valid).
    """
    valid = mask != 0
    count = valid.sum()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    mean = torch.where(valid, x, zero).sum() / count.clamp(min=1)
    centred = torch.where(valid, x - mean, zero)
    std = torch.sqrt((centred**2).sum() / (count - 1).clamp(min=1))
    return centred / (std + eps)


def _group_centred(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's return minus its group's mean, and its group's sample std."""
    scores = _returns_per_sequence(inputs)
    counts, sums, std = _group_stats(scores, inputs.group_ids)
    return scores - sums / counts, std


@ADVANTAGE_ESTIMATORS.register("grpo", needs_groups=True)
def grpo(inputs: AdvantageInputs) -> torch.Tensor:
    """GRPO: (R_i - group mean) / (group sample std + eps), broadcast over response tokens.

    Args:
        inputs: rewards, group_ids, response_mask (+ token_rewards folded into R_i), eps.
    Returns:
        (n, T) advantages; 0 outside the mask and for groups of one response.
    Raises:
        ValueError: every group has size 1.
    """
    centred, std = _group_centred(inputs)
    return _broadcast(centred / (std + inputs.eps), inputs.response_mask)


@ADVANTAGE_ESTIMATORS.register("grpo_no_std", needs_groups=True)
def grpo_no_std(inputs: AdvantageInputs) -> torch.Tensor:
    """Dr. GRPO style: R_i - group mean, no std division (avoids up-weighting easy/hard prompts).

    Args/Returns/Raises: as `grpo`.
    """
    centred, _ = _group_centred(inputs)
    return _broadcast(centred, inputs.response_mask)


@ADVANTAGE_ESTIMATORS.register("rloo", needs_groups=True)
def rloo(inputs: AdvantageInputs) -> torch.Tensor:
    """RLOO: R_i - mean of the *other* responses of its group, broadcast over response tokens.

    Equals k/(k-1) (R_i - group mean) for a group of size k. A group of one response has no
    "others"; its advantage is 0.

    Args:
        inputs: rewards, group_ids, response_mask (+ token_rewards folded into R_i).
    Returns:
        (n, T) advantages; 0 outside the mask and for groups of one response.
    Raises:
        ValueError: every group has size 1.
    """
    scores = _returns_per_sequence(inputs)
    counts, sums, _ = _group_stats(scores, inputs.group_ids)
    others = (sums - scores) / (counts - 1).clamp(min=1)
    return _broadcast(torch.where(counts > 1, scores - others, 0.0), inputs.response_mask)


def _discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} over response tokens (masked positions pass G through).

    Args:
        rewards: (n, T) per-token rewards, 0 outside the mask.
        mask: (n, T), nonzero on response tokens.
        gamma: discount.
    Returns:
        (n, T) returns, 0 outside the mask.
    """
    valid = mask != 0
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(valid[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(valid[:, t], running, 0.0)
    return returns


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp(inputs: AdvantageInputs) -> torch.Tensor:
    """REINFORCE++: discounted token returns, whitened over all valid tokens of the batch.

    The outcome reward sits on each response's last token, `token_rewards` (KL in reward) on
    every token; returns are discounted with `gamma` backwards, then `masked_whiten`ed.

    Args:
        inputs: rewards, response_mask, token_rewards (optional), gamma, eps.
    Returns:
        (n, T) advantages, 0 outside the mask.
    """
    returns = _discounted_returns(_token_rewards(inputs), inputs.response_mask, inputs.gamma)
    return masked_whiten(returns, inputs.response_mask, inputs.eps)


@ADVANTAGE_ESTIMATORS.register("gae", needs_critic=True)
def gae_returns(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO generalised advantage estimation and the value targets.

    delta_t = r_t + gamma V_{t+1} - V_t (V after the last response token is 0),
    A_t = delta_t + gamma lam A_{t+1}, returns_t = A_t + V_t (from the *unwhitened* A_t, so the
    value target is a lambda-return), then A is whitened when `inputs.whiten`.

    Args:
        inputs: rewards, response_mask, values (required), token_rewards (optional), gamma,
            lam, eps, whiten.
    Returns:
        advantages (n, T) and returns (n, T), both 0 outside the mask.
    Raises:
        ValueError: `inputs.values` is None.
    """
    if inputs.values is None:
        raise ValueError("gae needs critic values: AdvantageInputs.values is None")
    rewards = _token_rewards(inputs)
    values = inputs.values.to(rewards.dtype)
    valid = inputs.response_mask != 0
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + inputs.gamma * next_value - values[:, t]
        adv_t = delta + inputs.gamma * inputs.lam * next_adv
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_adv = torch.where(valid[:, t], adv_t, next_adv)
        advantages[:, t] = torch.where(valid[:, t], adv_t, 0.0)
    returns = torch.where(valid, advantages + values, 0.0)
    if inputs.whiten:
        advantages = masked_whiten(advantages, valid, inputs.eps)
    return advantages, returns
