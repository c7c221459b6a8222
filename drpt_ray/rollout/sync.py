"""Weight sync from the learner to the rollout workers: one door, `WeightSync`.

The learner puts its full HF-named weights (or, with `rollout.lora_adapter_sync`, its LoRA
adapter: `AdapterWeights`) in the Ray object store (rank 0 of the learner group,
`LearnerAPI.weights_ref`); only the reference reaches the driver, and `push` hands it to every
worker, which reloads in place (`RolloutEngine.update_weights`) and records the version. A worker
that died (Ray restarts it on the initial weights, version 0) or answered with stale weights gets
the same object again from `resend`: the weights are never copied into the driver. `publish` is
the door the trainer uses, and the choice of transport is made here, once: the synchronous loop
pushes and waits; the asynchronous one pushes without waiting (the load queues behind the
generation in flight); with partial rollouts it `offer`s them, and a generation in flight takes
them at its next chunk boundary. This is the
place to swap in a GPU transport later (an NCCL broadcast from the learner rank, CUDA IPC handles
for colocated workers) without touching the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
import torch
from ray.actor import ActorHandle


@dataclass
class AdapterWeights:
    """What a LoRA run with `rollout.lora_adapter_sync` publishes instead of full weights: the
    adapter's tensors under peft's saved names and its `LoraConfig` as a dict; the engine serves
    them as a vLLM LoRARequest on its unchanged base weights."""

    tensors: dict[str, torch.Tensor]
    config: dict


class WeightSync:
    """The weights version the rollout workers must hold, and the object that holds it."""

    def __init__(self, workers: list[ActorHandle], offer: bool = False, wait: bool = True):
        """`offer`: partial rollouts (weights are offered, taken at chunk boundaries); `wait`: a push
        returns once every worker has loaded the weights (the synchronous loop)."""
        self.workers, self._offer, self._wait = workers, offer, wait
        self.version = 0  # the workers start on the model's initial weights
        self._weights: ray.ObjectRef | None = None

    def publish(self, weights: ray.ObjectRef) -> None:
        """New weights to every worker by this sync's door (`offer`, or `push` waiting or not)."""
        if self._offer:
            self.offer(weights)
        else:
            self.push(weights, wait=self._wait)

    def state_dict(self) -> dict:
        return {"version": self.version}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a checkpoint's version: the (restarted) workers hold the initial weights until the
        next publish, which brings them to exactly that version."""
        self.version = state["version"] - 1

    def push(self, weights: ray.ObjectRef, wait: bool = True) -> None:
        """New weights to every worker; bumps the version.

        `wait`: return once every worker has loaded them. Without it the loads queue behind each
        worker's calls in flight: a Ray actor runs one caller's calls in submission order, so the
        generation in progress finishes on the old weights (never a swap mid-sequence) and every
        `generate` submitted after this push samples with these weights.
        """
        self.version += 1
        self._weights = weights  # kept for `resend` until the next push
        loads = [w.update_weights.remote(weights, self.version) for w in self.workers]
        if wait:
            ray.get(loads)

    def offer(self, weights: ray.ObjectRef) -> None:
        """Partial rollouts: new weights offered to every worker (returns at once); a generation in
        progress takes them at its next chunk boundary, a later call at its start
        (`RolloutEngine.offer_weights`, in the `control` concurrency group). Bumps the version."""
        self.version += 1
        self._weights = weights
        for w in self.workers:
            w.offer_weights.options(concurrency_group="control").remote(weights, self.version)

    def resend(self, worker: ActorHandle) -> None:
        """The current weights to one (restarted or stale) worker."""
        if self._weights is not None:
            ray.get(worker.update_weights.remote(self._weights, self.version))
