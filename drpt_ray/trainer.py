"""The driver loop: one `step` for SFT, RLHF and RLVR (SFT skips the rollout phases).

One RL step, each phase one call inside one named timer (metrics `time/<phase>`):
  1. gen       RolloutWorkers (vLLM) sample `n` responses per prompt (general prompts, and on
               refresh steps target prompts) with the current weights
  2. reward    verifiable function or reward model; general and target splits scored apart.
               With dynamic sampling (DAPO) 1-2 repeat on fresh prompts until the batch holds
               `batch_size` groups whose rewards differ, or `max_sampling_rounds` is spent
  3. logprob   learner recomputes behaviour log-probs (+ reference log-probs, + values)
  4. adv       advantages from the registry (GRPO group norm, ..., GAE with the critic)
  5. regularize  learner captures the target gradient g_T from the target rollouts
  6. update    learner: regularized backward of the policy loss -> clip -> AdamW
  7. sync      learner weights -> object store -> every RolloutWorker (in place)
then metrics (JSONL, TensorBoard, the callback the control plane streams) and checkpoints.

Asynchronous RL (`rollout.max_staleness` k > 0, docs/async.md): the rollouts of the next k steps
are submitted before the learner's phases run, so the workers generate while the learner scores,
captures and updates; the push in `sync` does not wait (it queues behind the generation in flight).
A step trains the oldest job in the pipeline; a sample more than k versions old is dropped and
generated again, and the capped importance weights of `algorithm.tis_cap` correct the rest.
`gen` is then the time the learner waited for rollouts. k = 0 is the synchronous loop above.

Topology (`build`, from `drpt_ray.topology.plan`): in RL modes the learner is a `LearnerGroup`,
N data-parallel ranks on Ray Train (`resources.learner_num_workers`; N = 1 is one rank); in SFT
with one worker it is a `Learner` in the driver process. The loop calls either through
`LearnerAPI`, and weights reach the rollout workers through one `WeightSync`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
import torch
from tqdm.auto import tqdm

from drpt_ray.algorithms import (
    AdvantageInputs,
    DivergenceGuard,
    compute_advantages,
    has_reward_variance,
    kl_penalty_tokens,
    mismatch_kl,
    pass_at_k,
    tis_weights,
)
from drpt_ray.config import DivergenceSpec, JobSpec, SamplingSpec
from drpt_ray.data import Example, TaskSplits, load_task, render_chat, tokenize_sft
from drpt_ray.errors import Diverged
from drpt_ray.learner import Learner, LearnerAPI, LearnerGroup, build_batch
from drpt_ray.metrics import MetricLogger
from drpt_ray.models import model_dir
from drpt_ray.rollout import Rollout, WeightSync, make_rollout_workers
from drpt_ray.topology import driver_env, plan

MetricsCallback = Callable[[dict], None]
AlertCallback = Callable[[int, str], None]


# ----------------------------------------------------------------------------------------------
# small pieces


class BatchSampler:
    """Endless batches over a pool, reshuffled every epoch, with a two-int state for exact resume.

    Epoch e's order is a permutation seeded by (seed, e); a batch may straddle two epochs.
    """

    def __init__(self, pool: list, batch_size: int, seed: int):
        self.pool, self.batch_size, self.seed = pool, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.pool)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> list:
        out = []
        while len(out) < self.batch_size:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append(self.pool[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._permutation(self.epoch)


@contextmanager
def timer(metrics: dict, phase: str):
    t0 = time.perf_counter()
    yield
    metrics[f"time/{phase}"] = metrics.get(f"time/{phase}", 0.0) + time.perf_counter() - t0


@dataclass
class JobResult:
    output_dir: Path
    steps: int
    final: dict
    history: list[dict] = field(default_factory=list)


@dataclass
class Context:
    """Everything the loop holds: the spec, the actors and the data cursors."""

    spec: JobSpec
    out: Path
    splits: TaskSplits
    tokenizer: Any
    learner: LearnerAPI
    general: BatchSampler
    target: BatchSampler
    workers: list = field(default_factory=list)
    weights: WeightSync = field(default_factory=lambda: WeightSync([]))
    reward: Any = None
    step: int = 0
    guard: DivergenceGuard | None = None  # RL only
    pipeline: deque[Job] = field(default_factory=deque)  # asynchronous RL: rollouts of the coming steps


# ----------------------------------------------------------------------------------------------
# preflight and topology


def preflight(spec: JobSpec) -> TaskSplits:
    """Every check a user's spec can fail, before any actor starts; errors name the field."""
    if spec.mode != "sft":
        from drpt_ray.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES

        # User code named by import path: the spec's own validation imports nothing (Registry.check),
        # so this is where such a path first resolves, and where a user estimator's metadata is read.
        try:
            POLICY_LOSSES.get(spec.algorithm.policy_loss)
        except ValueError as e:
            raise ValueError(f"algorithm.policy_loss: {e}") from None
        try:
            needs_groups = ADVANTAGE_ESTIMATORS.meta(spec.algorithm.advantage).needs_groups
        except ValueError as e:
            raise ValueError(f"algorithm.advantage: {e}") from None
        spec.check_groups(needs_groups)
    if spec.model.path is not None:
        model_dir(spec.model, spec.output_dir)  # raises ValueError naming model.path
    splits = load_task(spec.data)
    if spec.mode != "sft":
        from drpt_ray.rewards import check_reward

        check_reward(spec.reward, spec.data.task)
    return splits


def init_ray(cpus_needed: float, address: str | None) -> None:
    """Join `address`, or start a local Ray with at least `cpus_needed` logical CPUs; no-op if Ray is up."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": driver_env(), "worker_process_setup_hook": "drpt_ray.quiet.quiet_workers"}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return
    ray.init(num_cpus=max(math.ceil(cpus_needed), os.cpu_count() or 1), include_dashboard=False, runtime_env=runtime_env)


def build(spec: JobSpec, splits: TaskSplits, address: str | None) -> Context:
    """The topology, in order: learner, rollout workers, reward."""
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    topology = plan(spec)
    learner: LearnerAPI
    if topology.learner_in_driver:
        learner = Learner(spec)
        tokenizer = learner.tokenizer
    else:
        init_ray(topology.total()["CPU"], address)
        learner = LearnerGroup(spec)
        path = model_dir(spec.model, out)
        tokenizer = _tokenizer(path)
    if spec.data.uses_chat_template:
        splits = render_chat(splits, tokenizer)  # ctx.splits is all the driver tokenizes prompts from
    ctx = Context(
        spec=spec, out=out, splits=splits, tokenizer=tokenizer, learner=learner,
        general=BatchSampler(splits.general, spec.batch_size, spec.seed),
        target=BatchSampler(splits.target, spec.target_batch_size, spec.seed + 1),
        guard=divergence_guard(spec.divergence, len(tokenizer)) if spec.mode != "sft" else None,
    )
    if spec.mode != "sft":
        from drpt_ray.rewards import make_reward

        ctx.workers = make_rollout_workers(str(path), spec.rollout, spec.seed)
        ctx.weights = WeightSync(ctx.workers)
        ctx.reward = make_reward(spec.reward, spec.data.task, out)
    return ctx


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------------------------
# rollouts


@dataclass
class Pending:
    """One generation in flight: each worker's share of the prompts and the ref of its answer."""

    shares: list[list[list[int]]]
    refs: list[ray.ObjectRef | None]
    sampling: SamplingSpec


def submit(ctx: Context, prompt_ids: list[list[int]], sampling: SamplingSpec, chunked: bool = False) -> Pending:
    """Split prompts over the workers and start generating (returns at once). With partial rollouts
    every call names the weights version it needs (offers reach a worker in no fixed order) and
    `chunked` (a training job) lets newer weights take over between chunks."""
    shares = [prompt_ids[i :: len(ctx.workers)] for i in range(len(ctx.workers))]
    rollout = ctx.spec.rollout
    extra = (ctx.weights.version, rollout.partial_chunk_tokens if chunked else None) if rollout.partial_rollouts else ()
    return Pending(shares, [w.generate.remote(s, sampling, *extra) if s else None for w, s in zip(ctx.workers, shares)], sampling)


@dataclass
class Collected:
    """The rollouts of a `Pending` in prompt order, how many came back too old and were dropped,
    and the workers' busy seconds they cost (dropped ones included)."""

    rollouts: list[Rollout]
    dropped: int = 0
    busy: float = 0.0


def collect(ctx: Context, pending: Pending, max_age: int = 0) -> Collected:
    """Wait for `pending`; a share whose worker died, or whose rollouts were sampled more than `max_age`
    weight versions before the current one, is dropped and generated again with the current weights."""
    by_worker, dropped, busy = [], 0, 0.0
    for w, share, ref in zip(ctx.workers, pending.shares, pending.refs):
        if ref is None:
            by_worker.append([])
            continue
        try:
            out = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
            out = None
        if out is not None:
            busy += out[0].engine_seconds
            if any(ctx.weights.version - r.weights_version > max_age for r in out):
                dropped, out = dropped + len(out), None
        if out is None:
            out = _reissue(ctx, w, share, pending.sampling)
            busy += out[0].engine_seconds
        by_worker.append(out)
    # restore the caller's prompt order: worker k served prompts k, k+W, k+2W, ...
    n = pending.sampling.n
    ordered: list[Rollout] = []
    for i in range(sum(len(s) for s in pending.shares)):
        k, j = i % len(ctx.workers), i // len(ctx.workers)
        group = by_worker[k][j * n : (j + 1) * n]
        ordered += [Rollout(**{**r.__dict__, "prompt_index": i}) for r in group]
    return Collected(ordered, dropped, busy)


def generate(ctx: Context, prompt_ids: list[list[int]], sampling: SamplingSpec, metrics: dict) -> list[Rollout]:
    """Sample with the current weights (waits); adds the workers' busy seconds to `metrics`."""
    got = collect(ctx, submit(ctx, prompt_ids, sampling))
    metrics["time/rollout_busy"] = metrics.get("time/rollout_busy", 0.0) + got.busy
    return got.rollouts


def _reissue(ctx: Context, worker, share, sampling) -> list[Rollout]:
    """A worker died (Ray restarts it, back on the initial weights) or answered with stale weights:
    wait until it is healthy, give it the current weights, and generate its share again."""
    deadline = time.time() + 300
    while True:
        try:
            ray.get(worker.health.remote(), timeout=60)
            break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            if time.time() > deadline:
                raise RuntimeError("a rollout worker did not come back within 300 s") from None
            time.sleep(1.0)
    ctx.weights.resend(worker)
    return ray.get(worker.generate.remote(share, sampling))


def sync(ctx: Context) -> None:
    """Learner weights -> object store -> every worker (the reference only passes through the driver).
    Asynchronous: without waiting; each worker loads them after the generation it is running, or
    with partial rollouts at that generation's next chunk boundary."""
    weights = ctx.learner.weights_ref()
    if ctx.spec.rollout.partial_rollouts:
        ctx.weights.offer(weights)
    else:
        ctx.weights.push(weights, wait=not ctx.spec.rollout.max_staleness)


def _prompt_ids(ctx: Context, examples: list[Example]) -> list[list[int]]:
    return [ctx.tokenizer(e.prompt)["input_ids"] for e in examples]


@dataclass
class Group:
    """One prompt's `n` rollouts and their rewards."""

    example: Example
    rollouts: list[Rollout]
    rewards: list[float]
    errors: int = 0


def score_groups(ctx: Context, examples: list[Example], rollouts: list[Rollout], split: str, n: int, metrics: dict) -> list[Group]:
    """The reward phase for `n` rollouts per example, grouped by example."""
    with timer(metrics, "reward"):
        scored = ctx.reward([examples[r.prompt_index].prompt for r in rollouts], [r.text for r in rollouts],
                            [examples[r.prompt_index].scored_against for r in rollouts], split)
    return [Group(e, rollouts[i * n : (i + 1) * n], scored.scores[i * n : (i + 1) * n], scored.errors if i == 0 else 0)
            for i, e in enumerate(examples)]


def sample_groups(ctx: Context, examples: list[Example], split: str, sampling: SamplingSpec, metrics: dict) -> list[Group]:
    """gen + reward for one set of prompts, with the current weights."""
    with timer(metrics, "gen"):
        rollouts = generate(ctx, _prompt_ids(ctx, examples), sampling, metrics)
    return score_groups(ctx, examples, rollouts, split, sampling.n, metrics)


@dataclass
class Refill:
    """What dynamic sampling drew: the groups to train on, every group generated, the rounds spent."""

    kept: list[Group]
    seen: list[Group]
    rounds: int


def refill(draw: Callable[[], list[Group]], batch_size: int, max_rounds: int) -> Refill:
    """DAPO's dynamic sampling: keep drawing batches and keep the groups whose rewards differ, until
    `batch_size` are kept (extras dropped) or `max_rounds` draws were made. With no informative group
    at all, the last draw is kept: it trains to a zero policy gradient, as without filtering."""
    kept, seen, last, rounds = [], [], [], 0
    while rounds < max_rounds and len(kept) < batch_size:
        last = draw()
        kept, seen, rounds = kept + [g for g in last if has_reward_variance(g.rewards)], seen + last, rounds + 1
    return Refill(kept[:batch_size] if kept else last, seen, rounds)


def general_groups(ctx: Context, sampling, metrics: dict, first: list[Group] | None = None) -> list[Group]:
    """The step's general groups (with `filter_zero_variance_groups`, refilled by `refill`); `first`:
    the first draw, already generated (the asynchronous loop's; later draws use the current weights)."""
    alg = ctx.spec.algorithm
    draws: list[list[Group]] = []

    def draw() -> list[Group]:
        if first is not None and not draws:
            draws.append(first)
        else:
            draws.append(sample_groups(ctx, ctx.general.next(), "general", sampling, metrics))
        return draws[-1]

    r = refill(draw, ctx.spec.batch_size, alg.max_sampling_rounds if alg.filter_zero_variance_groups else 1)
    metrics["reward/zero_variance_frac"] = sum(not has_reward_variance(g.rewards) for g in draws[0]) / len(draws[0])
    # Every rollout generated this step is an unbiased sample of the policy: the reward to watch,
    # and the one whose variance tells the divergence guard whether anything is left to learn.
    every = torch.tensor([x for g in r.seen for x in g.rewards])
    metrics.update({"reward/reward_mean": float(every.mean()), "reward/reward_std": float(every.std()) if every.numel() > 1 else 0.0})
    if not alg.filter_zero_variance_groups:
        return draws[0]
    metrics.update({"reward/sampling_rounds": float(r.rounds), "reward/kept_groups": float(len(r.kept))})
    return r.kept


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


def rollout_batch(ctx: Context, groups: list[Group], metrics: dict, prefix: str, train: bool):
    """logprob + adv for sampled groups; returns the learner-ready RLBatch. `train`: the batch the
    policy loss sees (TIS and truncation masking apply to it, not to the target batch)."""
    spec = ctx.spec
    alg = spec.algorithm
    rollouts = [r for g in groups for r in g.rollouts]
    rewards = [x for g in groups for x in g.rewards]
    batch = build_batch(
        [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], rewards,
        [i for i, g in enumerate(groups) for _ in g.rollouts], ctx.tokenizer.pad_token_id,
        rollout_logprobs=[r.response_logprobs for r in rollouts],
        truncated=[r.finish_reason == "length" for r in rollouts],
    )
    with timer(metrics, "logprob"):
        batch = ctx.learner.score_rollouts(batch)
    with timer(metrics, "adv"):
        token_rewards = None
        if batch.ref_logprobs is not None and alg.kl_in_reward:
            token_rewards = kl_penalty_tokens(batch.old_logprobs, batch.ref_logprobs, alg.kl_estimator, alg.kl_coef)
        inputs = AdvantageInputs(
            rewards=batch.rewards, group_ids=batch.group_ids, response_mask=batch.response_mask,
            values=batch.values, token_rewards=token_rewards, gamma=alg.gamma, lam=alg.lam,
        )
        batch.advantages, batch.returns = compute_advantages(alg.advantage, inputs)  # returns: None without a critic
        mask = batch.response_mask
        if train:
            metrics["rollout/mismatch_kl"] = mismatch_kl(batch.old_logprobs, batch.rollout_logprobs, mask)
        if alg.tis_cap is not None and (train or spec.rollout.max_staleness):
            # The learner's old log-probs (current weights) define the PPO ratio; vLLM's are what
            # actually sampled, asynchronously with weights up to max_staleness versions older: one
            # capped weight corrects both the engine's mismatch and the staleness.
            weights = tis_weights(batch.old_logprobs, batch.rollout_logprobs, mask, alg.tis_cap)
            batch.advantages = batch.advantages * weights
            if spec.rollout.max_staleness:
                on = mask != 0
                name = "async/" + ("" if train else "target_")
                metrics[name + "is_weight_mean"] = float(weights[on].mean())
                metrics[name + "is_capped_frac"] = float((weights[on] >= alg.tis_cap).float().mean())
        if train and alg.mask_truncated_completions:
            batch = batch.without_truncated()
    if not train:
        metrics[f"{prefix}between_prompt_var_frac"] = between_prompt_variance_fraction(batch.rewards, batch.group_ids)
    metrics.setdefault(f"{prefix}reward_mean", float(batch.rewards.mean()))
    metrics.setdefault(f"{prefix}reward_std", float(batch.rewards.std()) if batch.size > 1 else 0.0)
    metrics.update({
        f"{prefix}response_len": sum(len(r.response_ids) for r in rollouts) / len(rollouts),
        f"{prefix}truncated_frac": float(batch.truncated.float().mean()),
        f"{prefix}reward_errors": float(sum(g.errors for g in groups)),
    })
    return batch


# ----------------------------------------------------------------------------------------------
# the step


def step_sampling(spec: JobSpec, index: int) -> SamplingSpec:
    """The training sampling of step `index` (0-based): seeded per step, so a resume draws the same rollouts."""
    return spec.rollout.sampling.model_copy(update={"seed": spec.seed * 1_000_003 + index})


def step(ctx: Context) -> dict:
    """One training step of any mode; returns its metrics."""
    spec, m = ctx.spec, {"step": ctx.step + 1}
    t0 = time.perf_counter()
    wants_target = ctx.learner.needs_target(ctx.step)
    if spec.mode == "sft":
        with timer(m, "sample"):
            general = tokenize_sft(ctx.tokenizer, ctx.general.next(), spec.data.max_len)
            target = tokenize_sft(ctx.tokenizer, ctx.target.next(), spec.data.max_len) if wants_target else None
        m.update(ctx.learner.sft_step(general, target))
    else:
        if spec.rollout.max_staleness:
            groups, target = async_groups(ctx, m, wants_target)
        else:
            sampling = step_sampling(spec, ctx.step)
            groups = general_groups(ctx, sampling, m)
            target = sample_groups(ctx, ctx.target.next(), "target", sampling, m) if wants_target else None
        batch = rollout_batch(ctx, groups, m, "reward/", train=True)
        if target is not None:
            m.update(ctx.learner.capture_target(rollout_batch(ctx, target, m, "target/", train=False)))
        m.update(ctx.learner.rl_step(batch))
        with timer(m, "sync"):
            sync(ctx)
    m["time/step"] = time.perf_counter() - t0
    if spec.mode != "sft":
        # The learner waits while rollouts are generated (all of `gen` in the synchronous loop, only
        # what the overlap did not hide in the asynchronous one); the workers idle the rest of the step.
        # A batch generated during the previous step counts in the step that trains on it.
        m["async/learner_idle_frac"] = m["time/gen"] / m["time/step"]
        m["async/rollout_idle_frac"] = max(0.0, 1 - m.get("time/rollout_busy", 0.0) / (len(ctx.workers) * m["time/step"]))
        m["async/steps_per_s"] = 1 / m["time/step"]
    ctx.step += 1
    return m


# ----------------------------------------------------------------------------------------------
# the asynchronous loop (rollout.max_staleness > 0)


@dataclass
class Job:
    """Asynchronous RL: the rollouts of one coming step, generated while the learner updates.

    A worker runs its calls in submission order, so a job submitted after a weight push samples
    with those weights, and a push submitted after a job waits for it (weights never change
    mid-sequence; with partial rollouts they are offered and taken at chunk boundaries, and each
    call names its version). `general`/`target` hold a `Pending` while generating, the rollouts
    once a checkpoint saved them.
    """

    index: int  # the step (0-based) that trains on it
    general_examples: list[Example]
    general: Pending | list[Rollout]
    target_examples: list[Example] | None = None
    target: Pending | list[Rollout] | None = None


def fill_pipeline(ctx: Context) -> None:
    """Submit the rollouts of the coming steps until `max_staleness + 1` are in flight; each samples
    with the weights of the latest push, so a job is trained at most `max_staleness` versions later."""
    spec = ctx.spec
    while len(ctx.pipeline) <= spec.rollout.max_staleness and ctx.step + len(ctx.pipeline) < spec.steps:
        index = ctx.step + len(ctx.pipeline)
        sampling = step_sampling(spec, index)
        general = ctx.general.next()
        job = Job(index, general, submit(ctx, _prompt_ids(ctx, general), sampling, chunked=True))
        if ctx.learner.needs_target(index):
            job.target_examples = ctx.target.next()
            job.target = submit(ctx, _prompt_ids(ctx, job.target_examples), sampling, chunked=True)
        ctx.pipeline.append(job)


def _job_rollouts(ctx: Context, part: Pending | list[Rollout], index: int, m: dict) -> list[Rollout]:
    """A job's rollouts; those sampled more than `max_staleness` versions ago are dropped (counted)
    and generated again with the current weights."""
    k = ctx.spec.rollout.max_staleness
    if isinstance(part, Pending):
        got = collect(ctx, part, max_age=k)
        m["async/dropped"] = m.get("async/dropped", 0.0) + got.dropped
        m["time/rollout_busy"] = m.get("time/rollout_busy", 0.0) + got.busy
        return got.rollouts
    if all(ctx.weights.version - r.weights_version <= k for r in part):  # saved by a checkpoint
        return part
    m["async/dropped"] = m.get("async/dropped", 0.0) + len(part)
    n = ctx.spec.rollout.sampling.n
    return generate(ctx, [part[i * n].prompt_ids for i in range(len(part) // n)], step_sampling(ctx.spec, index), m)


def async_groups(ctx: Context, m: dict, wants_target: bool) -> tuple[list[Group], list[Group] | None]:
    """The step's general and target groups from the pipeline (submitting the coming steps' first)."""
    fill_pipeline(ctx)
    job = ctx.pipeline.popleft()
    n = ctx.spec.rollout.sampling.n
    with timer(m, "gen"):  # the wait: what generation the learner's previous update did not hide
        general = _job_rollouts(ctx, job.general, job.index, m)
        target = _job_rollouts(ctx, job.target, job.index, m) if job.target is not None else None
    groups = general_groups(ctx, step_sampling(ctx.spec, job.index), m, first=score_groups(ctx, job.general_examples, general, "general", n, m))
    if target is not None:
        target_groups = score_groups(ctx, job.target_examples, target, "target", n, m)
    elif wants_target:  # the learner asks for a capture the job did not foresee: sample it now
        target_groups = sample_groups(ctx, ctx.target.next(), "target", step_sampling(ctx.spec, job.index), m)
    else:
        target_groups = None
    trained = [r for g in groups + (target_groups or []) for r in g.rollouts]
    ages = [ctx.weights.version - r.weights_version for r in trained]
    m.update({"async/job": float(job.index), "async/trained": float(sum(len(g.rollouts) for g in groups)),
              "async/staleness_mean": sum(ages) / len(ages), "async/staleness_max": float(max(ages))})
    if ctx.spec.rollout.partial_rollouts:  # a sequence's age is its oldest token's; its tokens may be younger
        token_ages = [ctx.weights.version - v for r in trained for v in (r.token_versions or [r.weights_version] * len(r.response_ids))]
        m["async/token_staleness_mean"] = sum(token_ages) / max(1, len(token_ages))
        m["async/partial_frac"] = sum(len(set(r.token_versions or [])) > 1 for r in trained) / len(trained)
    m.setdefault("async/dropped", 0.0)
    return groups, target_groups


def _saved_job(ctx: Context, job: Job) -> dict:
    """A job for a checkpoint: its prompts and its rollouts. Waits for them (a dead worker's share is
    generated again, as in training) and keeps them in the job, which then trains on them."""
    k = ctx.spec.rollout.max_staleness
    if isinstance(job.general, Pending):
        job.general = collect(ctx, job.general, max_age=k).rollouts
    if isinstance(job.target, Pending):
        job.target = collect(ctx, job.target, max_age=k).rollouts
    out: dict = {"index": job.index}
    for name, examples, rollouts in (("general", job.general_examples, job.general), ("target", job.target_examples, job.target)):
        if rollouts is not None:
            out[name] = {"examples": [e.__dict__ for e in examples], "rollouts": [r.__dict__ for r in rollouts]}
    return out


def _loaded_job(saved: dict) -> Job:
    parts = {name: ([Example(**e) for e in saved[name]["examples"]], [Rollout(**r) for r in saved[name]["rollouts"]])
             for name in ("general", "target") if name in saved}
    target = parts.get("target", (None, None))
    return Job(saved["index"], *parts["general"], *target)


def evaluate(ctx: Context) -> dict:
    """Held-out target quality: token-mean loss (SFT) or greedy strict reward (RL)."""
    spec = ctx.spec
    if spec.mode == "sft":
        batch = tokenize_sft(ctx.tokenizer, ctx.splits.eval, spec.data.max_len)
        return {"eval/target_loss": ctx.learner.eval_sft(batch)}
    examples = ctx.splits.eval[: spec.eval_size]
    greedy = spec.rollout.sampling.model_copy(update={"n": 1, "temperature": 0.0, "seed": 0})
    out = {"eval/target_reward": _mean([g.rewards[0] for g in sample_groups(ctx, examples, "target", greedy, {})])}
    if spec.eval_samples:
        # The training temperature, a fixed seed: the same draw at every evaluation, only the policy moves.
        sampled = spec.rollout.sampling.model_copy(update={"n": spec.eval_samples, "seed": 1})
        groups = sample_groups(ctx, examples, "target", sampled, {})
        rewards = [x for g in groups for x in g.rewards]
        out["eval/target_reward_sampled"] = _mean(rewards)
        if all(x in (0.0, 1.0) for x in rewards):  # pass@k needs a right/wrong verdict
            for k in sorted({1, spec.eval_k}):
                out[f"eval/target_pass@{k}"] = _mean([pass_at_k(spec.eval_samples, int(sum(g.rewards)), k) for g in groups])
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(ctx: Context) -> Path:
    """One consistent checkpoint: written to a temp dir, then renamed into place; keeps `keep`."""
    root = ctx.out / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step_{ctx.step:07d}"
    tmp = root / f".tmp_step_{ctx.step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ctx.learner.save(str(tmp))
    state = {"step": ctx.step, "general": ctx.general.state_dict(), "target": ctx.target.state_dict(),
             "guard": ctx.guard.state_dict() if ctx.guard is not None else None,
             "weights_version": ctx.weights.version, "pipeline": [_saved_job(ctx, job) for job in ctx.pipeline]}
    (tmp / "trainer.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step_*"))[: -ctx.spec.checkpoint.keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "trainer.json").exists())
    return found[-1] if found else None


def restore(ctx: Context, path: Path) -> None:
    state = json.loads((path / "trainer.json").read_text())
    ctx.learner.load(str(path))
    ctx.step = state["step"]
    ctx.general.load_state_dict(state["general"])
    ctx.target.load_state_dict(state["target"])
    if ctx.guard is not None and state.get("guard") is not None:
        ctx.guard.load_state_dict(state["guard"])
    # The resume's first sync brings the workers to the checkpoint's version: the saved rollouts of
    # the asynchronous pipeline keep their age, and are trained before anything new is generated.
    ctx.weights.version = state.get("weights_version", 1) - 1
    ctx.pipeline = deque(_loaded_job(job) for job in state.get("pipeline", []))


# ----------------------------------------------------------------------------------------------
# the job


def shutdown(ctx: Context) -> None:
    """Release the job's actors and reward resources (a Ray session may run several jobs)."""
    if ctx.reward is not None:
        ctx.reward.close()
    for worker in ctx.workers:
        ray.kill(worker)
    ctx.learner.remove()


def warm_start(ctx: Context) -> float:
    """RL only: plain SFT on the (prompt, response) pairs of `warm_start_pool` before RL begins."""
    spec = ctx.spec
    pool = ctx.splits.target if spec.warm_start_pool == "target" else ctx.splits.general
    sampler = BatchSampler(pool, spec.warm_start_batch_size, spec.seed + 7)
    batches = [tokenize_sft(ctx.tokenizer, sampler.next(), spec.data.max_len) for _ in range(spec.warm_start_sft_steps)]
    return ctx.learner.warm_start(batches, spec.warm_start_lr)


def divergence_guard(spec: DivergenceSpec, vocab_size: int) -> DivergenceGuard:
    """The guard of `spec`; the entropy ceiling is a fraction of a uniform policy's entropy."""
    frac = spec.entropy_ceiling_frac
    return DivergenceGuard(spec.zero_variance_steps, spec.entropy_floor,
                           frac * math.log(vocab_size) if frac is not None else None)


def divergence(ctx: Context, m: dict) -> str | None:
    """Why this step's metrics say the run has collapsed, or None. A non-finite loss always counts;
    RL runs also ask the guard (no reward variance for K steps, entropy under the floor or over
    the ceiling)."""
    bad = [k for k in ("loss", "grad_norm") if k in m and not math.isfinite(m[k])]
    if bad:
        return f"non-finite {' and '.join(bad)}"
    if ctx.guard is None:
        return None
    return ctx.guard.update(m["reward/reward_std"], m.get("policy/entropy"))


def run_job(spec: JobSpec, on_metrics: MetricsCallback | None = None, address: str | None = None,
            on_alert: AlertCallback | None = None) -> JobResult:
    """Run a JobSpec to the end (resuming from the newest checkpoint when asked); returns a summary.

    A collapsed run never ends as a success: each step the divergence guard may raise an alert
    (`on_alert(step, message)`, also printed); a non-finite loss, or any alert with
    `divergence.stop_on_divergence`, raises `Diverged`. While the guard is alarmed (a streak of K
    zero-variance steps, or entropy under the floor) no checkpoint is written, so the newest one on
    disk is a state from before the alert. (A shorter streak is not suspect: a hard task's first
    steps often score every response 0.)
    """
    # Actors do not share the driver's working directory: every path they see must be absolute.
    spec = spec.model_copy(update={"output_dir": str(Path(spec.output_dir).resolve())})
    local_model = Path(spec.model.path).expanduser() if spec.model.path else None
    if local_model is not None and local_model.is_dir():
        spec.model = spec.model.model_copy(update={"path": str(local_model.resolve())})
    splits = preflight(spec)
    ctx = build(spec, splits, address)
    resume = latest_checkpoint(ctx.out) if spec.checkpoint.resume else None
    base = {}  # the held-out figures of the model as loaded, when a warm start will change it
    if resume is not None:
        restore(ctx, resume)
    elif spec.mode != "sft" and spec.warm_start_sft_steps:
        if spec.eval_before_warm_start:
            base = {f"eval_base/{k.removeprefix('eval/')}": v for k, v in evaluate(ctx).items()}
        print(f"warm start: {spec.warm_start_sft_steps} SFT steps, loss {warm_start(ctx):.3f}", flush=True)
    if spec.mode != "sft" and (resume is not None or spec.warm_start_sft_steps):
        sync(ctx)
    log = MetricLogger(ctx.out, spec.tensorboard, on_metrics, resume_step=ctx.step)
    bar = tqdm(total=spec.steps, initial=ctx.step, disable=not spec.progress, desc=f"{spec.mode}[{spec.regularizer.feasible_set}]")
    try:
        if ctx.step == 0:
            log.write({"step": 0, **base, **evaluate(ctx)})
        while ctx.step < spec.steps:
            m = step(ctx)
            if ctx.step % spec.eval_every == 0 or ctx.step == spec.steps:
                m.update(evaluate(ctx))
            log.write(m)
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in m.items() if k in log.headline and isinstance(v, float)})
            alert = divergence(ctx, m)
            if alert is not None:
                tqdm.write(f"ALERT step {ctx.step}: {alert}")
                if on_alert is not None:
                    on_alert(ctx.step, alert)
                if spec.divergence.stop_on_divergence or alert.startswith("non-finite"):
                    raise Diverged(ctx.step, alert)
            alarmed = ctx.guard is not None and ctx.guard.alarmed
            if spec.checkpoint.every and ctx.step % spec.checkpoint.every == 0 and ctx.step < spec.steps and not alarmed:
                save_checkpoint(ctx)
        ctx.learner.save_model(str(ctx.out / "model"))
    finally:
        bar.close()
        log.close()
        shutdown(ctx)
        log.plot(ctx.out / "curves.png", title=f"{spec.mode} {spec.regularizer.feasible_set}")
    return JobResult(ctx.out, ctx.step, log.history[-1] if log.history else {}, log.history)
