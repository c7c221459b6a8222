"""Stability toolkit for RL post-training: the checks and corrections verl, TRL and DAPO ship.

Shapes: n responses, T response-token positions, V vocabulary; masks are nonzero on response tokens.

- `token_entropy`: policy entropy per position, the first thing to watch for collapse.
- `log_ratios`, `correction_weights`, `correction_metrics`, `mismatch_kl`: vLLM samples from a
  slightly different distribution than the learner computes (kernels, precision, older weights), so
  "on-policy" data is off-policy. The learner/rollout ratio, per token, per response, or as the
  response's geometric mean, reweights the loss: truncated (TIS; Yao et al. 2025, "Your efficient
  RL framework secretly brings you off-policy RL training"; verl's `rollout_is`) or masked outside
  [lower, upper] (IcePop when two-sided; TRL's sequence mask); the mismatch KL measures how far the
  two have drifted.
- `has_reward_variance`, `refill`: a group whose responses all got the same reward has zero
  advantage and adds no gradient; DAPO's dynamic sampling drops such groups and draws again.
- `between_prompt_variance_fraction`: how much of a batch's reward variance lies between prompts.
- `pass_at_k`: the unbiased pass@k estimator (Chen et al. 2021) for evaluation.
- `DivergenceGuard`: alerts when a run stops learning (no reward variance for K steps) or its
  entropy collapses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Generic, Protocol, Sequence, TypeVar

import torch

from drpt_ray.algorithms.aggregation import masked_mean
from drpt_ray.algorithms.kl import k3

ZERO_STD = 1e-6


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, from log_softmax (no overflow for large logits).

    Differentiable, so it can serve as an entropy bonus as well as a metric. Logits of -inf
    (tokens a sampler masked out) contribute 0 and keep the value and its gradient finite.

    Args:
        logits: (..., V).
    Returns:
        (...) in logits' dtype.
    """
    logp = torch.log_softmax(logits, dim=-1)
    # p log p -> 0 as p -> 0, but 0 * -inf is nan: zero the log where the probability is exactly 0.
    logp_finite = logp.masked_fill(torch.isneginf(logp), 0.0)
    return -(logp.exp() * logp_finite).sum(dim=-1)


def _check_same_shape(learner_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> None:
    if not learner_logprobs.shape == rollout_logprobs.shape == mask.shape:
        raise ValueError(
            f"learner_logprobs {tuple(learner_logprobs.shape)}, rollout_logprobs {tuple(rollout_logprobs.shape)} "
            f"and mask {tuple(mask.shape)} must have the same shape"
        )


def log_ratios(learner_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
               level: str) -> torch.Tensor:
    """log(pi_learner / pi_rollout) at `level`, on every token of a response (0 outside the mask).

    token: each token's own; sequence: the response's sum (the whole response's ratio); geometric:
    the response's mean (the geometric mean of its token ratios, which does not grow with length).
    Detached: a weight, not a path for the gradient.

    Raises:
        ValueError: shapes differ, or an unknown level.
    """
    _check_same_shape(learner_logprobs, rollout_logprobs, mask)
    on = mask != 0
    per_token = torch.where(on, learner_logprobs.detach() - rollout_logprobs.detach(), 0.0)
    if level == "token":
        return per_token
    if level not in ("sequence", "geometric"):
        raise ValueError(f"rollout correction level must be token, sequence or geometric, got {level!r}")
    per_row = per_token.sum(-1, keepdim=True)
    if level == "geometric":
        per_row = per_row / on.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(on, per_row.expand_as(per_token), 0.0)


def correction_weights(log_ratio: torch.Tensor, mask: torch.Tensor, mode: str,
                       upper: float | None, lower: float | None = None) -> torch.Tensor:
    """Importance weights w = r = exp(log_ratio) that correct the rollout/learner mismatch, bounded.

    truncate (TIS): min(r, upper); `lower` unused. mask (IcePop-style when two-sided): r where
    lower <= r <= upper, else 0: a token or response the two policies disagree on too much adds no
    gradient. `upper` None: plain importance weights (truncate only).

    Returns:
        (n, T) weights, 0 outside the mask.
    Raises:
        ValueError: an unknown mode, upper <= 0, lower < 0 or lower >= upper, mask mode without upper.
    """
    if upper is not None and upper <= 0:
        raise ValueError(f"rollout correction upper must be > 0 (or None for no truncation), got {upper}")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"rollout correction mode must be truncate or mask, got {mode!r}")
    if mode == "mask" and (upper is None or (lower is not None and not 0 <= lower < upper)):
        raise ValueError(f"rollout correction mask needs 0 <= lower < upper, got lower={lower}, upper={upper}")
    # exp of the clamped log: a sequence-level log ratio may overflow exp before any cap applies
    w = log_ratio.exp() if upper is None else log_ratio.clamp(max=math.log(upper)).exp()
    if mode == "mask":
        keep = log_ratio <= math.log(upper)
        if lower:
            keep &= log_ratio >= math.log(lower)
        w = torch.where(keep, w, 0.0)
    return torch.where(mask != 0, w, 0.0)


def correction_metrics(log_ratio: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, mode: str,
                       upper: float | None) -> dict[str, float]:
    """What verl and slime log about the correction, over the response tokens: the mean weight,
    quantiles of the ratio, and the share of tokens capped (truncate) or masked out (mask)."""
    on = mask != 0
    ratio, w = log_ratio[on].exp(), weights[on]
    if ratio.numel() == 0:
        return {}
    q = torch.quantile(ratio.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    m = {"is_weight_mean": float(w.mean()), "is_ratio_p05": float(q[0]), "is_ratio_p50": float(q[1]),
         "is_ratio_p95": float(q[2])}
    if mode == "mask":
        m["is_masked_frac"] = float((w == 0).float().mean())
    elif upper is not None:
        m["is_capped_frac"] = float((ratio >= upper).float().mean())
    return m


def mismatch_kl(learner_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Token-mean k3 estimate of KL(rollout || learner) over the mask, as a float (a metric).

    The tokens were sampled by the rollout engine, so k3 with ratio r = pi_learner / pi_rollout,
    r - 1 - log r, is unbiased and never negative. This is kl.k3(rollout, learner), with its
    clamps: a single token counts at most 10, so one near-impossible token cannot dominate.

    Args:
        learner_logprobs: (n, T) log-probs of the sampled tokens under the learner.
        rollout_logprobs: (n, T) log-probs the rollout engine reported for them.
        mask: (n, T), nonzero on response tokens.
    Returns:
        The mean over valid tokens; 0.0 when there are none.
    Raises:
        ValueError: shapes differ.
    """
    _check_same_shape(learner_logprobs, rollout_logprobs, mask)
    return masked_mean(k3(rollout_logprobs.detach(), learner_logprobs.detach()), mask)


def has_reward_variance(rewards: Sequence[float], tol: float = ZERO_STD) -> bool:
    """Whether a prompt's responses got different rewards (max - min > tol). A group without
    variance has zero advantage under any group baseline: it spends compute and adds no gradient,
    so DAPO's dynamic sampling drops it and samples more prompts."""
    return max(rewards) - min(rewards) > tol


class _Scored(Protocol):
    rewards: list[float]


G = TypeVar("G", bound=_Scored)


@dataclass
class Refill(Generic[G]):
    """What dynamic sampling drew: the groups to train on, every group generated, the draws made."""

    kept: list[G]
    seen: list[G]
    rounds: int


def refill(draw: Callable[[], list[G]], batch_size: int, max_rounds: int) -> Refill[G]:
    """DAPO's dynamic sampling: keep drawing batches and keep the groups whose rewards differ, until
    `batch_size` are kept (extras dropped) or `max_rounds` draws were made. With no informative group
    at all, the last draw is kept: it trains to a zero policy gradient, as without filtering."""
    kept: list[G] = []
    seen: list[G] = []
    last: list[G] = []
    rounds = 0
    while rounds < max_rounds and len(kept) < batch_size:
        last = draw()
        kept, seen, rounds = kept + [g for g in last if has_reward_variance(g.rewards)], seen + last, rounds + 1
    return Refill(kept[:batch_size] if kept else last, seen, rounds)


def between_prompt_variance_fraction(rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Share of the reward variance that lies between prompts rather than within them: how much of
    the `reward` target objective (one baseline for the whole batch) says "more / less of
    everything on this prompt" instead of "this response rather than that one"."""
    r = rewards.double()
    total = float(((r - r.mean()) ** 2).sum())
    if total <= 0:
        return 0.0
    ids, inverse = torch.unique(group_ids, return_inverse=True)
    group_mean = torch.zeros(len(ids), dtype=r.dtype).index_add_(0, inverse, r) / torch.bincount(inverse).to(r.dtype)
    return float(((group_mean[inverse] - r.mean()) ** 2).sum()) / total


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    The binomial ratio is computed as prod_{i=n-c+1}^{n} (1 - k / i), which neither overflows
    nor loses precision for large n, as Chen et al.'s reference code does.

    Raises:
        ValueError: k < 1, k > n, or c outside [0, n].
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n correct samples, got n={n}, c={c}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


@dataclass
class DivergenceGuard:
    """Alerts when a run stops learning or its policy collapses.

    Attributes:
        zero_variance_steps: K; alert once the batch reward std has been < 1e-6 for K steps in a
            row (every response scored alike, so every advantage and the gradient are 0). 0
            disables.
        entropy_floor: alert when the token entropy falls below it; None disables.
        entropy_ceiling: alert when the token entropy rises above it (having been below); None
            disables. The collapse
            seen in this project's benches goes that way: unlikelihood on the policy's own samples
            drives the entropy towards uniform (ln V), EOS disappears, every response runs to the
            cap; with a continuous (reward-model) reward the batch never loses its variance, so
            only the entropy shows it.
        streak: consecutive zero-variance steps so far (state, restored on resume).
        low_entropy: whether the last measured entropy was under the floor (state).
        high_entropy: whether the last measured entropy was over the ceiling (state).
        was_below_ceiling: whether any measured entropy was at or under the ceiling (state).

    An alert says something new: the zero-variance one fires at K, 2K, 3K, ... steps of one
    streak, the entropy ones when the entropy crosses under the floor or over the ceiling, so a
    stream of alerts stays readable while a run sits collapsed.
    """

    zero_variance_steps: int = 0
    entropy_floor: float | None = None
    entropy_ceiling: float | None = None
    streak: int = field(default=0, init=False)
    low_entropy: bool = field(default=False, init=False)
    high_entropy: bool = field(default=False, init=False)
    was_below_ceiling: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.zero_variance_steps < 0:
            raise ValueError(f"zero_variance_steps must be >= 0 (0 disables), got {self.zero_variance_steps}")

    def update(self, batch_reward_std: float, entropy: float | None) -> str | None:
        """Record one step; return an alert naming each tripped check and its numbers, else None.

        Args:
            batch_reward_std: std of the rewards over the whole batch this step.
            entropy: mean token entropy of the policy this step, or None when not measured.
        """
        self.streak = self.streak + 1 if batch_reward_std < ZERO_STD else 0
        reasons = []
        if self.zero_variance_steps and self.streak and self.streak % self.zero_variance_steps == 0:
            reasons.append(
                f"batch reward std < {ZERO_STD:g} for {self.streak} consecutive steps "
                f"(zero_variance_steps={self.zero_variance_steps}): every advantage is 0, nothing is learned"
            )
        was_low = self.low_entropy
        if self.entropy_floor is not None and entropy is not None:
            self.low_entropy = entropy < self.entropy_floor
        if self.low_entropy and not was_low:
            reasons.append(
                f"token entropy {entropy:.4g} < entropy_floor {self.entropy_floor:.4g}: the policy is collapsing"
            )
        was_high = self.high_entropy
        if self.entropy_ceiling is not None and entropy is not None:
            # A rise, not a level: a policy that starts near uniform (a random model) is not collapsing.
            self.high_entropy = self.was_below_ceiling and entropy > self.entropy_ceiling
            self.was_below_ceiling = self.was_below_ceiling or entropy <= self.entropy_ceiling
        if self.high_entropy and not was_high:
            reasons.append(
                f"token entropy {entropy:.4g} > entropy_ceiling {self.entropy_ceiling:.4g}: the policy is "
                "becoming uniform (responses lose their end and run to the length cap)"
            )
        return "; ".join(reasons) or None

    @property
    def alarmed(self) -> bool:
        """Whether the run is in a state an alert was raised for (a streak of K or more, or the
        entropy under the floor or over the ceiling): checkpoints taken now would not be good states."""
        zero_variance = bool(self.zero_variance_steps and self.streak >= self.zero_variance_steps)
        return zero_variance or self.low_entropy or self.high_entropy

    def state_dict(self) -> dict[str, int]:
        """The state a resumed run needs (the settings come from config)."""
        return {"streak": self.streak, "low_entropy": int(self.low_entropy), "high_entropy": int(self.high_entropy),
                "was_below_ceiling": int(self.was_below_ceiling)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the state saved by `state_dict`."""
        self.streak, self.low_entropy = int(state["streak"]), bool(state["low_entropy"])
        # absent in checkpoints from before the ceiling
        self.high_entropy, self.was_below_ceiling = (bool(state.get("high_entropy", 0)),
                                                     bool(state.get("was_below_ceiling", 0)))
