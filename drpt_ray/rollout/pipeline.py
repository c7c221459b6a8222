"""The rollouts of the training steps, as a pipeline of depth `rollout.max_staleness`.

`RolloutPipeline.take(step)` returns the general (and, when the learner asks, target) rollouts that
step trains on. It keeps up to `depth + 1` steps' generations in flight: a job is submitted with the
weights of the latest `publish`, so with depth k the workers generate the next k steps while the
learner scores, captures and updates, and a step trains rollouts at most k weight versions old
(older ones are dropped and generated again with the current weights; the bounded importance
weights of `algorithm.rollout_correction` correct the rest). Depth 0 is the synchronous loop: the one job in
flight is the step's own, sampled with the current weights. The trainer calls the same four
methods either way (`take`, `generate`, `publish`, `state_dict`), so it has no asynchronous branch.

Ordering is what makes this exact without locks: a Ray actor runs one caller's calls in submission
order, so a job submitted after a push samples with the pushed weights, and a push submitted after
a job waits for it (never a swap mid-sequence). With partial rollouts weights are offered instead
and taken at chunk boundaries, and each call names the version it needs (offers reach workers in
no fixed order). A worker that dies is restarted by Ray on the initial weights: its share is
generated again after the current weights are re-sent (`WeightSync.resend`).

A checkpoint (`state_dict`) waits for the jobs in flight and saves their prompts and rollouts, so a
resumed run trains exactly those before it generates anything new (docs/async.md).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import ray
from ray.actor import ActorHandle

from drpt_ray.config import RolloutSpec, SamplingSpec
from drpt_ray.data import Example
from drpt_ray.rollout.sync import WeightSync
from drpt_ray.rollout.worker import Rollout

# The examples of step `index`: general, and target when the learner will capture g_T then (else None).
Draw = Callable[[int], "tuple[list[Example], list[Example] | None]"]


@dataclass
class Sampled:
    """Rollouts of some prompts: `n` per example, in example order."""

    examples: list[Example]
    rollouts: list[Rollout]


@dataclass
class StepRollouts:
    """What `take` hands a step: its general and target rollouts, and how old and how costly they were."""

    index: int
    general: Sampled
    target: Sampled | None
    stats: dict[str, float]


@dataclass
class _Pending:
    """One generation in flight: each worker's share of the prompts and the ref of its answer."""

    shares: list[list[list[int]]]
    refs: list[ray.ObjectRef | None]
    sampling: SamplingSpec


@dataclass
class _Job:
    """The rollouts of one coming step: in flight (`_Pending`), or collected (a checkpoint saved them)."""

    index: int
    general_examples: list[Example]
    general: _Pending | list[Rollout]
    target_examples: list[Example] | None = None
    target: _Pending | list[Rollout] | None = None


def step_sampling(spec: RolloutSpec, seed: int, index: int) -> SamplingSpec:
    """The training sampling of step `index` (0-based): seeded per step, so a resume draws the same rollouts."""
    return spec.sampling.model_copy(update={"seed": seed * 1_000_003 + index})


class RolloutPipeline:
    """Submission, collection, re-issue after a worker dies, and the version rule of the rollouts.

    Args:
        workers: The rollout worker actors.
        spec: The rollout section (depth = `max_staleness`, partial rollouts, sampling).
        seed: The job's seed (per-step sampling seeds).
        steps: The job's length: nothing is submitted for a step past it.
        encode: A prompt's token ids.
        draw: The examples of a step (called once per step, in step order).
    """

    def __init__(self, workers: list[ActorHandle], spec: RolloutSpec, seed: int, steps: int,
                 encode: Callable[[str], list[int]], draw: Draw):
        self.workers, self.spec, self.seed, self.steps = workers, spec, seed, steps
        self.depth = spec.max_staleness
        self.weights = WeightSync(workers, offer=spec.partial_rollouts, wait=self.depth == 0)
        self._encode, self._draw = encode, draw
        self._jobs: deque[_Job] = deque()

    def sampling(self, index: int) -> SamplingSpec:
        return step_sampling(self.spec, self.seed, index)

    # -- the step's rollouts

    def take(self, index: int) -> StepRollouts:
        """The rollouts step `index` trains on (waits for them), after submitting the coming steps'."""
        self._fill(index)
        job = self._jobs.popleft()
        assert job.index == index, f"step {index} would train the rollouts of step {job.index}"
        stats = {"rollout/dropped": 0.0, "time/rollout_busy": 0.0}
        general = Sampled(job.general_examples, self._rollouts(job.general, index, stats))
        target = (Sampled(job.target_examples, self._rollouts(job.target, index, stats))
                  if job.target is not None and job.target_examples is not None else None)
        trained = general.rollouts + (target.rollouts if target else [])
        ages = [self.weights.version - r.weights_version for r in trained]
        stats.update({"rollout/job": float(index), "rollout/trained": float(len(general.rollouts)),
                      "rollout/staleness_mean": sum(ages) / len(ages), "rollout/staleness_max": float(max(ages))})
        if self.spec.partial_rollouts:  # a sequence's age is its oldest token's; its tokens may be younger
            token_ages = [self.weights.version - v for r in trained
                          for v in (r.token_versions or [r.weights_version] * len(r.response_ids))]
            stats["rollout/token_staleness_mean"] = sum(token_ages) / max(1, len(token_ages))
            stats["rollout/partial_frac"] = sum(len(set(r.token_versions or [])) > 1 for r in trained) / len(trained)
        return StepRollouts(index, general, target, stats)

    def generate(self, examples: list[Example], sampling: SamplingSpec) -> tuple[list[Rollout], float]:
        """Sample `examples` with the current weights (waits, behind the jobs in flight); returns the
        rollouts and the workers' busy seconds."""
        rollouts, _, busy = self._collect(self._submit(examples, sampling), max_age=0)
        return rollouts, busy

    def publish(self, weights: ray.ObjectRef) -> None:
        """New learner weights for every rollout after this call (`WeightSync.publish` picks the door)."""
        self.weights.publish(weights)

    # -- checkpoints

    def state_dict(self) -> dict:
        """The weights version and the jobs in flight, collected (a dead worker's share is generated
        again, as in training); the jobs keep their rollouts and later train on them."""
        for job in self._jobs:
            if isinstance(job.general, _Pending):
                job.general = self._collect(job.general, self.depth)[0]
            if isinstance(job.target, _Pending):
                job.target = self._collect(job.target, self.depth)[0]
        jobs = []
        for job in self._jobs:
            saved: dict = {"index": job.index}
            for name, examples, rollouts in (("general", job.general_examples, job.general),
                                              ("target", job.target_examples, job.target)):
                if rollouts is not None:
                    saved[name] = {"examples": [e.__dict__ for e in examples],
                                   "rollouts": [r.__dict__ for r in rollouts]}
            jobs.append(saved)
        return {"weights_version": self.weights.version, "pipeline": jobs}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the saved jobs train first, and the next `publish` brings the workers to the
        checkpoint's weights version, so the saved rollouts keep their age."""
        self.weights.load_state_dict({"version": state.get("weights_version", 1)})
        self._jobs = deque()
        for saved in state.get("pipeline", []):
            parts = {name: ([Example(**e) for e in saved[name]["examples"]],
                            [Rollout(**r) for r in saved[name]["rollouts"]])
                     for name in ("general", "target") if name in saved}
            self._jobs.append(_Job(saved["index"], *parts["general"], *parts.get("target", (None, None))))

    # -- transport

    def _fill(self, index: int) -> None:
        """Submit the coming steps' rollouts until `depth + 1` are in flight (the first being step
        `index`'s); each samples with the weights of the latest publish."""
        while len(self._jobs) <= self.depth and index + len(self._jobs) < self.steps:
            i = index + len(self._jobs)
            general, target = self._draw(i)
            job = _Job(i, general, self._submit(general, self.sampling(i), chunked=True))
            if target is not None:
                job.target_examples, job.target = target, self._submit(target, self.sampling(i), chunked=True)
            self._jobs.append(job)

    def _rollouts(self, part: _Pending | list[Rollout], index: int, stats: dict) -> list[Rollout]:
        """A job's rollouts; those sampled more than `depth` versions ago are dropped (counted) and
        generated again with the current weights."""
        if isinstance(part, _Pending):
            rollouts, dropped, busy = self._collect(part, self.depth)
        elif all(self.weights.version - r.weights_version <= self.depth for r in part):  # saved by a checkpoint
            rollouts, dropped, busy = part, 0, 0.0
        else:
            n = self.spec.sampling.n
            prompts = [part[i * n].prompt_ids for i in range(len(part) // n)]
            rollouts, _, busy = self._collect(self._submit_ids(prompts, self.sampling(index)), max_age=0)
            dropped = len(part)
        stats["rollout/dropped"] += dropped
        stats["time/rollout_busy"] += busy
        return rollouts

    def _submit(self, examples: list[Example], sampling: SamplingSpec, chunked: bool = False) -> _Pending:
        return self._submit_ids([self._encode(e.prompt) for e in examples], sampling, chunked)

    def _submit_ids(self, prompt_ids: list[list[int]], sampling: SamplingSpec, chunked: bool = False) -> _Pending:
        """Split prompts over the workers and start generating (returns at once). With partial
        rollouts every call names the weights version it needs and `chunked` (a training job) lets
        newer weights take over between chunks."""
        w = len(self.workers)
        shares = [prompt_ids[i::w] for i in range(w)]
        extra = ((self.weights.version, self.spec.partial_chunk_tokens if chunked else None)
                 if self.spec.partial_rollouts else ())
        refs = [worker.generate.remote(s, sampling, *extra) if s else None for worker, s in zip(self.workers, shares)]
        return _Pending(shares, refs, sampling)

    def _collect(self, pending: _Pending, max_age: int) -> tuple[list[Rollout], int, float]:
        """Wait for `pending`: its rollouts in prompt order, how many were dropped as older than
        `max_age` versions, and the workers' busy seconds (dropped ones included). A share whose
        worker died, or that came back too old, is generated again with the current weights."""
        by_worker, dropped, busy = [], 0, 0.0
        for worker, share, ref in zip(self.workers, pending.shares, pending.refs):
            if ref is None:
                by_worker.append([])
                continue
            try:
                out = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
                out = None
            if out is not None:
                busy += out[0].engine_seconds
                if any(self.weights.version - r.weights_version > max_age for r in out):
                    dropped, out = dropped + len(out), None
            if out is None:
                out = self._reissue(worker, share, pending.sampling)
                busy += out[0].engine_seconds
            by_worker.append(out)
        # restore the caller's prompt order: worker k served prompts k, k+W, k+2W, ...
        n, w = pending.sampling.n, len(self.workers)
        ordered: list[Rollout] = []
        for i in range(sum(len(s) for s in pending.shares)):
            group = by_worker[i % w][(i // w) * n : (i // w + 1) * n]
            ordered += [Rollout(**{**r.__dict__, "prompt_index": i}) for r in group]
        return ordered, dropped, busy

    def _reissue(self, worker: ActorHandle, share: list[list[int]], sampling: SamplingSpec) -> list[Rollout]:
        """A worker died (Ray restarts it, back on the initial weights) or answered with stale
        weights: wait until it is healthy, give it the current weights, and generate its share again."""
        deadline = time.time() + 300
        while True:
            try:
                ray.get(worker.health.remote(), timeout=60)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if time.time() > deadline:
                    raise RuntimeError("a rollout worker did not come back within 300 s") from None
                time.sleep(1.0)
        self.weights.resend(worker)
        return ray.get(worker.generate.remote(share, sampling))
