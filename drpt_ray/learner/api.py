"""What the trainer calls on a learner: one typed interface, two implementations.

`Learner` (drpt_ray/learner/learner.py) runs in the calling process; `LearnerGroup`
(drpt_ray/learner/group.py) shards each batch over N Ray Train ranks, each running a `Learner`.
The trainer holds either as a `LearnerAPI` and calls its methods directly.
"""

from __future__ import annotations

from typing import Protocol

import ray

from drpt_ray.learner.batch import RLBatch


class LearnerAPI(Protocol):
    def sft_step(self, general: dict, target: dict | None) -> dict:
        """One regularized SFT step on tokenized batches; its metrics."""

    def eval_sft(self, batch: dict) -> float | None:
        """Token-mean loss over every supervised token of `batch`."""

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers of the current policy (rank 0's)."""

    def score_rollouts(self, batch: RLBatch) -> RLBatch | None:
        """The batch with behaviour log-probs (and reference log-probs, values) filled in."""

    def capture_target(self, batch: RLBatch) -> dict:
        """Back the target objective of the target rollouts into the regularizer; its metrics."""

    def rl_step(self, batch: RLBatch) -> dict:
        """`algorithm.ppo_epochs` regularized optimizer steps on one rollout batch; its metrics."""

    def warm_start(self, batches: list[dict], lr: float) -> float:
        """Plain SFT steps before RL; the last loss."""

    def needs_target(self, step: int) -> bool:
        """Whether step `step` must bring target data."""

    def weights_ref(self) -> ray.ObjectRef | None:
        """The full weights under HF names, in the object store."""

    def save(self, path: str) -> None:
        """A checkpoint for an exact resume, into directory `path`."""

    def load(self, path: str) -> None:
        """Restore the checkpoint in directory `path`."""

    def save_model(self, path: str) -> str:
        """The final model and tokenizer, loadable with from_pretrained."""

    def remove(self) -> None:
        """Release hooks, processes and resources."""
