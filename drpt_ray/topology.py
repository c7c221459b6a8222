"""A job's topology, in one place: the processes it runs, what each reserves, the environment they get.

`plan(spec)` is read by the trainer (where the learner runs, how many CPUs a local Ray needs, the
reward model's CPUs), by Ray Tune (a trial's placement group and its learner group) and by the
KubeRay renderer (the worker pods). The processes of one job:

- the driver: runs `run_job`'s loop (a CLI process, a Tune trial, a Ray job's entrypoint). In SFT
  with one learner worker the learner trains inside it (there are no rollout workers to share
  weights with, so Ray would only add start-up time); the driver then reserves the learner's shape.
- the learner: otherwise `resources.learner_num_workers` Ray Train workers, one bundle each, placed
  by `resources.placement_strategy` (Ray Train reserves their placement group itself).
- RL only: `rollout.num_workers` vLLM RolloutWorker actors, and with `reward.kind: model` one
  reward-model actor.

`DRIVER_ENV` is the environment every drpt-ray process starts with (a value already set in the
environment wins). The vLLM KV-cache size is not in it: each rollout worker gets its own from
`rollout.kv_cache_gib` (drpt_ray.rollout.worker.engine_env).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from drpt_ray.config import JobSpec

DRIVER_ENV = {
    "HF_HUB_OFFLINE": "1",  # no hub access at run time: models are built in code or read from disk
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process vLLM engine: required by the in-place weight reload
    "TOKENIZERS_PARALLELISM": "false",  # the tokenizers' thread pool would fork-warn in every Ray worker
    "RAY_USAGE_STATS_ENABLED": "0",
}
DRIVER_CPUS = 1.0  # the process running run_job's loop, when the learner is elsewhere
REWARD_MODEL_CPUS = 0.5  # the RLHF reward-model actor (a forward per step)


@dataclass(frozen=True)
class Bundle:
    """What one process reserves."""

    cpus: float
    gpus: float = 0.0

    def resources(self) -> dict[str, float]:
        """Ray's resource dict (no GPU key when it holds none)."""
        return {"CPU": float(self.cpus), **({"GPU": float(self.gpus)} if self.gpus else {})}


@dataclass(frozen=True)
class Plan:
    learner_in_driver: bool
    driver: Bundle
    learner: tuple[Bundle, ...]  # Ray Train workers; () when the learner runs in the driver
    placement_strategy: str  # of the learner's bundles
    rollout: tuple[Bundle, ...]
    reward_model: Bundle | None

    @property
    def actors(self) -> list[Bundle]:
        """Every process Ray places apart from the driver."""
        return [*self.learner, *self.rollout, *([self.reward_model] if self.reward_model else [])]

    def total(self) -> dict[str, float]:
        """Everything the job holds while it runs, the driver included."""
        out: dict[str, float] = {}
        for b in [self.driver, *self.actors]:
            for k, v in b.resources().items():
                out[k] = out.get(k, 0.0) + v
        return out


def plan(spec: JobSpec) -> Plan:
    res, rl = spec.resources, spec.mode != "sft"
    in_driver = not rl and res.learner_num_workers == 1
    learner = Bundle(res.learner_num_cpus, res.learner_num_gpus)
    ro = spec.rollout
    return Plan(
        learner_in_driver=in_driver,
        driver=learner if in_driver else Bundle(DRIVER_CPUS),
        learner=() if in_driver else (learner,) * res.learner_num_workers,
        placement_strategy=res.placement_strategy,
        rollout=(Bundle(ro.num_cpus_per_worker, ro.num_gpus_per_worker),) * ro.num_workers if rl else (),
        reward_model=Bundle(REWARD_MODEL_CPUS) if rl and spec.reward.kind == "model" else None,
    )


def driver_env() -> dict[str, str]:
    """`DRIVER_ENV` with the values this process already has: what Ray workers must inherit."""
    return {k: os.environ.get(k, v) for k, v in DRIVER_ENV.items()}


def apply_driver_env() -> None:
    """Give this process `DRIVER_ENV` (keeping values already set); before transformers, vLLM or Ray read them."""
    for k, v in DRIVER_ENV.items():
        os.environ.setdefault(k, v)
