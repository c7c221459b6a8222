"""Rollout workers: vLLM engines (in Ray actors) that sample, score and take new weights in place."""

from drpt_ray.rollout.sync import AdapterWeights, WeightSync
from drpt_ray.rollout.worker import (PartialRolloutWorker, Rollout, RolloutEngine, RolloutWorker, engine_env,
                                     make_rollout_workers)

__all__ = ["AdapterWeights", "PartialRolloutWorker", "Rollout", "WeightSync", "RolloutEngine",
           "RolloutWorker", "engine_env", "make_rollout_workers"]
