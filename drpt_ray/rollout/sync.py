"""Weight sync from the learner to the rollout workers: one door, `WeightSync`.

The learner puts its full HF-named weights in the Ray object store (rank 0 of the learner group,
`LearnerAPI.weights_ref`); only the reference reaches the driver, and `push` hands it to every
worker, which reloads in place (`RolloutEngine.update_weights`) and records the version. A worker
that died (Ray restarts it on the initial weights, version 0) or answered with stale weights gets
the same object again from `resend`: the weights are never copied into the driver. This is the
place to swap in a GPU transport later (an NCCL broadcast from the learner rank, CUDA IPC handles
for colocated workers) without touching the trainer.
"""

from __future__ import annotations

import ray
from ray.actor import ActorHandle


class WeightSync:
    """The weights version the rollout workers must hold, and the object that holds it."""

    def __init__(self, workers: list[ActorHandle]):
        self.workers = workers
        self.version = 0  # the workers start on the model's initial weights
        self._weights: ray.ObjectRef | None = None

    def push(self, weights: ray.ObjectRef) -> None:
        """New weights to every worker (waits until all have loaded them); bumps the version."""
        self.version += 1
        self._weights = weights  # kept for `resend` until the next push
        ray.get([w.update_weights.remote(weights, self.version) for w in self.workers])

    def resend(self, worker: ActorHandle) -> None:
        """The current weights to one (restarted or stale) worker."""
        if self._weights is not None:
            ray.get(worker.update_weights.remote(self._weights, self.version))
