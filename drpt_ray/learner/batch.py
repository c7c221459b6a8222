"""The learner's RL batch: rollouts turned into right-padded tensors.

Positions follow the causal shift: `token_logprobs` gives log p(x_t | x_<t) at index t-1, so a
response token at sequence index j sits at logprob index j-1. Every per-token tensor here is
(n, L-1) in that logprob layout, with `response_mask` nonzero exactly on response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F


@dataclass
class RLBatch:
    input_ids: torch.Tensor  # (n, L) prompt + response, right-padded
    attention_mask: torch.Tensor  # (n, L)
    response_mask: torch.Tensor  # (n, L-1) float, 1 on response-token logprob positions
    rewards: torch.Tensor  # (n,) sequence rewards
    group_ids: torch.Tensor  # (n,) long, one id per prompt
    advantages: torch.Tensor | None = None  # (n, L-1)
    old_logprobs: torch.Tensor | None = None  # (n, L-1) behaviour policy (learner recompute)
    ref_logprobs: torch.Tensor | None = None  # (n, L-1) reference policy, when KL is used
    values: torch.Tensor | None = None  # (n, L-1) critic values at rollout time
    returns: torch.Tensor | None = None  # (n, L-1) critic targets
    rollout_logprobs: torch.Tensor | None = None  # (n, L-1) the rollout engine's log-probs of the sampled tokens
    truncated: torch.Tensor | None = None  # (n,) bool, the response hit max_new_tokens

    def rows(self, rows: torch.Tensor | None) -> "RLBatch":
        """The sub-batch of `rows` (the whole batch when None)."""
        if rows is None:
            return self
        return replace(self, **{f.name: _take(getattr(self, f.name), rows) for f in fields(self)})

    def to(self, device) -> "RLBatch":
        """The batch on `device` (tensors already there are shared, not copied)."""
        return replace(self, **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                for f in fields(self)})

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def without_truncated(self) -> "RLBatch":
        """The batch with the responses that hit max_new_tokens masked out of every loss (DAPO /
        TRL's `mask_truncated_completions`: a cut response is no evidence about its ending).
        Apply after the advantages, so a cut response still counts in its group's baseline."""
        keep = (~self.truncated).to(self.response_mask.dtype)[:, None]
        return replace(self, response_mask=self.response_mask * keep)


def cat_rl(parts: list[RLBatch]) -> RLBatch:
    """Stack batches row-wise (shards back in order, or general then target rows), right-padding the
    narrower ones: their extra positions are masked out everywhere (attention, response, losses)."""
    width = max(b.input_ids.shape[1] for b in parts)
    out = {}
    for f in fields(RLBatch):
        vals = [getattr(b, f.name) for b in parts]
        if all(v is None for v in vals):
            out[f.name] = None
            continue
        if any(v is None for v in vals):
            raise ValueError(f"cannot stack RL batches: {f.name} is set in some and not in others")
        out[f.name] = torch.cat([F.pad(v, (0, width - b.input_ids.shape[1])) if v.dim() == 2 else v
                                 for v, b in zip(vals, parts)])
    return RLBatch(**out)


def _take(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[rows]


def build_batch(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    rewards: list[float],
    group_ids: list[int],
    pad_id: int,
    rollout_logprobs: list[list[float]] | None = None,
    truncated: list[bool] | None = None,
) -> RLBatch:
    """Pack (prompt, response) token lists into an RLBatch (right padding); the engine's per-token
    log-probs, when given, land on the response positions of `rollout_logprobs`."""
    n = len(prompt_ids)
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros(n, width, dtype=torch.long)
    resp = torch.zeros(n, width - 1)
    engine_lp = torch.zeros(n, width - 1) if rollout_logprobs is not None else None
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[i, : len(p) + len(r)] = 1
        resp[i, len(p) - 1 : len(p) + len(r) - 1] = 1.0
        if engine_lp is not None:
            engine_lp[i, len(p) - 1 : len(p) + len(r) - 1] = torch.tensor(rollout_logprobs[i], dtype=torch.float32)
    return RLBatch(
        input_ids=ids,
        attention_mask=attn,
        response_mask=resp,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_ids=torch.tensor(group_ids, dtype=torch.long),
        rollout_logprobs=engine_lp,
        truncated=torch.tensor(truncated, dtype=torch.bool) if truncated is not None else None,
    )
