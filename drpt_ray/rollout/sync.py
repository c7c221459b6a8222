"""Weight sync from the learner to the rollout workers: the one narrow interface the trainer calls.

CPU path (the only one implemented): the state dict goes into the Ray object store once and every worker
reloads it in place (`RolloutEngine.update_weights`). This is the place to swap in a GPU transport later
(NCCL broadcast from the learner rank, or CUDA IPC handles for colocated workers) without touching the trainer.
"""

from __future__ import annotations

import time

import ray
import torch
from ray.actor import ActorHandle


def sync_weights(workers: list[ActorHandle], state_dict: dict[str, torch.Tensor], version: int | None = None) -> float:
    """Push full Hugging Face-named weights to every rollout worker and wait until all have loaded them.

    Args:
        workers: `RolloutWorker` handles (see `make_rollout_workers`).
        state_dict: Plain HF names and full tensors (for a peft model: the merged weights).
        version: Weights version to record on the workers (e.g. the learner's step); None increments each
            worker's own counter.

    Returns:
        Wall seconds for the whole sync (object-store put, transfer and every reload).
    """
    start = time.perf_counter()
    # Detached CPU copies: the object store serialises host memory, and one put is shared by all workers.
    ref = ray.put({name: t.detach().cpu() for name, t in state_dict.items()})
    ray.get([w.update_weights.remote(ref, version) for w in workers])
    return time.perf_counter() - start
