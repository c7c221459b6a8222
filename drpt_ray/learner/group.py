"""The data-parallel learner: N `Learner` ranks as one Ray Train worker group, driven like one learner.

`LearnerGroup(spec)` starts a `TorchTrainer` (Ray Train V2) of `resources.learner_num_workers`
workers, `{"CPU": learner_num_cpus, "GPU": learner_num_gpus}` each, placed by
`resources.placement_strategy`; torch.distributed runs gloo on CPU and NCCL when the workers hold
GPUs. `fit()` runs in a background thread of the driver, and the constructor does not wait for the
ranks (they build their models while the trainer starts the rollout workers; the first call
waits, bounded by `start_timeout_s`). Each worker's train function builds a
`Learner` (which finds the process group and becomes rank r of N) and then serves commands from
the driver until told to stop. A command is a function and its arguments, run as
`fn(learner, *args)`: a `Learner` method (`Learner.rl_step`) or any function of a learner
(`execute`). The group implements the same `LearnerAPI` (drpt_ray/learner/api.py) as the
in-process `Learner`: each method shards its batch and sends the Learner method to every rank,
so the trainer calls either directly. RL jobs always use it: N = 1 is one Ray Train worker
running the same code (the collectives are identities in a world of one;
drpt_ray/learner/collective.py). SFT with one worker keeps the in-process `Learner` (no Ray at
all), which is the same rank code without the transport.

Transport. A driver-owned async mailbox actor (0 CPUs) holds one command queue and one reply
queue per rank. Arguments go through the object store (`ray.put` per rank's shard; the mailbox
only relays references), replies come back through the mailbox. Why not Ray Train's own
channels: a train function cannot be called into once `fit()` runs (report() only goes
worker -> driver), and the worker actors are private to the controller; a mailbox keeps the
learner in the process that owns the process group, which is what torch.distributed needs.

Sharding. Every batch is split into N contiguous row ranges in rank order (ranks 0..k-1 get one
row more when N does not divide n), keeping the full padded width, so concatenating the shards
in rank order gives the batch back. General batches (sft_step, rl_step, warm_start) need at
least N rows; target batches may be smaller: a rank without target rows gets a stand-in (SFT: one
row with every label -100, i.e. zero tokens; RL: `capture_target(None)`, one fully masked row)
so that it still joins the collectives with an exact zero contribution. RL advantages (GRPO group
normalisation included) are computed by the driver on the whole batch before sharding, so where a
prompt group is cut does not matter; the only batch statistic computed on the learner, the
`reward` target objective's standardisation, is taken over the gathered global target rewards.

Which statistics are global and which are local (method.md 1.3, 3.4, 8; oracle 12):
- global: the target loss's normaliser (token count, or units for `train_loss`; SUM all-reduced
  before capture), the reward standardisation of the `reward` objective (all-gathered), and the
  per-layer target cache g_T (SUM all-reduced after capture, so every rank holds the gradient of
  the global target batch); the optimizer step (gradients averaged, so every rank applies the
  same update and the weights, AdamW moments and schedule stay identical on every rank); the
  reported losses (share-weighted means), grad_norm (of the averaged gradient) and the cosines
  `reg/cos*` (of the averaged update against g_T).
- local: scores s_i = <G_i, g_T> and the selection (top-k / filter / soft weights, per layer or
  global) on each rank's own general shard, exactly as the paper's RLVR runs select per rank on
  local micro-batches against the synced g_T (method.md 8). Gathering the whole batch's
  per-example statistics to select globally would cost an all-gather per hooked layer inside the
  backward and tie every rank's backward to every other's; local selection costs nothing extra.
  So are the kept fractions `reg/kept_frac*` (rank 0's) and IIF's buffer filtering (per shard).

Normalisation of the update. Rank r's curated gradient is the normalised gradient of its own
selected subset, d_r = (1 / U_{S_r}) sum_{i in S_r} G_i (U: the loss's normaliser units, i.e.
supervised/response tokens for token means, 1 per row for sequence means; G_i the gradient of
example i's unnormalised loss), and the group's update is the share-weighted sum
    d = sum_r (U_r / U) d_r,     U_r = sum of rank r's units, U = sum_r U_r.
With `full` (S_r = the shard) this is (1/U) sum_i G_i: exactly the one-process gradient of the
concatenated batch, also when ranks hold different token counts (a plain mean of the per-rank
token means would not be). With equal shares it is the usual DDP mean. Unhooked parameters
(norms, value head) get the same weighting of their ordinary local gradients. Mechanically, rank
r backpropagates (U_r / U) times its loss (`Regularizer.backward(loss_scale=...)`, which divides
the scores by the same factor, so selection is unchanged) and the group SUMs the gradients.

Why no DDP reducer. The regularizer writes the curated `.grad` of hooked layers from inside their
custom backward, so autograd's AccumulateGrad hooks, which DDP's reducer counts on, never fire
for those weights: DDP would wait for buckets that never fill (or all-reduce the plain,
uncurated gradient). The target capture and GlobalSubset's scoring pass are backwards that must
not be averaged at all, the two-pass path runs two backwards per step, and the share weighting
is not a uniform mean. So the group reduces explicitly: after the regularized backward, one
flat SUM all-reduce per dtype of the share-scaled gradients (`Collective.sum_grads`), then
clipping and AdamW. It gives up DDP's overlap of communication with the backward; for a
curated gradient that overlap is not available anyway before each layer's selection is done.

Weights and checkpoints. `weights_ref()` comes from rank 0 alone (rank 0 puts its state dict in
the object store and only the reference travels; the rollout pipeline's `WeightSync` hands it to the
rollout workers, drpt_ray/rollout/sync.py). `save`
writes ONE checkpoint from rank 0 (weights, AdamW state, schedule, RNG, g_T cache: all identical
on every rank since every rank applies the same reduced update), with full tensors keyed by
name, so it loads into any number of workers, with or without FSDP; `load` reads it on every
rank. Every rank runs these methods (under FSDP gathering the full state is a collective); the
Learner writes on rank 0 only. The path must be visible to the learner workers (one node, or
shared storage), as it was for the single learner actor.

Failures: fail fast, resume from the last checkpoint. A worker that dies (or raises) fails the
Ray Train run (FailureConfig(max_failures=0)); the call in flight, and every later call, raises
`LearnerGroupError` naming the rank, the method and the cause, within seconds (Ray Train's
health check, or the peer's broken gloo connection), and the remaining workers, the mailbox and
the placement group are released. The trainer's job then ends; re-running it with
`checkpoint.resume: auto` continues from the newest checkpoint (tests/test_learner_group.py).
Restarting the group in place (Ray Train's max_failures > 0) is not used: the driver's loop
state (step, data cursors, rollout weights) would have to roll back with it.

FSDP (`resources.fsdp`): the same ranks, with the policy sharded by torch's fully_shard
(drpt_ray/learner/fsdp.py says how the regularizer's hooks see full weights inside the backward,
and what is not supported). The statistics above are the same; the SUM of the gradients happens
in FSDP's reduce-scatter instead of `sum_grads`. Every forward is a collective under FSDP, so a
rank without rows still runs one (`score_rollouts(None)`, `eval_sft` chunk counts matched).

Devices: NCCL is selected when `learner_num_gpus > 0`, and each rank computes on the CUDA device
Ray Train assigned it (`learner_device`); on CPU, gloo.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from typing import Any, Callable

import ray
import torch

from drpt_ray.config import JobSpec
from drpt_ray.data import supervised_token_counts
from drpt_ray.learner.batch import RLBatch, cat_rl
from drpt_ray.learner.learner import Learner

POLL_S = 0.2


class LearnerGroupError(RuntimeError):
    """The learner worker group failed (or could not start); it is unusable from here on."""


# ----------------------------------------------------------------------------------------------
# sharding


def row_ranges(n: int, world: int) -> list[tuple[int, int]]:
    """N contiguous [lo, hi) row ranges in rank order; the first n % N ranges get one row more."""
    base, extra = divmod(n, world)
    out, lo = [], 0
    for r in range(world):
        hi = lo + base + (r < extra)
        out.append((lo, hi))
        lo = hi
    return out


def shard_dict(batch: dict, world: int) -> list[dict | None]:
    """Row shards of a tokenized batch (None for a rank with no rows)."""
    n = batch["input_ids"].shape[0]
    return [{k: v[lo:hi] for k, v in batch.items()} if hi > lo else None for lo, hi in row_ranges(n, world)]


def shard_rl(batch: RLBatch, world: int) -> list[RLBatch | None]:
    return [batch.rows(torch.arange(lo, hi)) if hi > lo else None for lo, hi in row_ranges(batch.size, world)]


def _no_tokens_row(batch: dict) -> dict:
    """A one-row stand-in with no supervised token (a rank without target rows)."""
    row = {k: v[:1].clone() for k, v in batch.items()}
    row["labels"][:] = -100
    return row


def _need_rows(n: int, world: int, what: str) -> None:
    if n < world:
        raise ValueError(f"{what} has {n} rows but there are {world} learner workers (resources.learner_num_workers); "
                         "every worker needs at least one row")


# ----------------------------------------------------------------------------------------------
# the worker side


@ray.remote(num_cpus=0)
class _Mailbox:
    """Per-rank command and reply queues between the driver and the workers."""

    def __init__(self, world: int):
        self.commands = [asyncio.Queue() for _ in range(world)]
        self.replies = [asyncio.Queue() for _ in range(world)]

    async def put(self, rank: int, command) -> None:
        await self.commands[rank].put(command)

    async def next(self, rank: int):
        return await self.commands[rank].get()

    async def reply(self, rank: int, reply) -> None:
        await self.replies[rank].put(reply)

    async def result(self, rank: int):
        return await self.replies[rank].get()


def _serve(config: dict) -> None:
    """Ray Train's train function: build the rank's Learner, then serve commands until None."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    mailbox = config["mailbox"]
    try:
        learner = Learner(config["spec"])
    except BaseException:
        ray.get(mailbox.reply.remote(rank, ("error", traceback.format_exc())))
        raise
    me = {"pid": os.getpid(), "actor": ray.get_runtime_context().current_actor,
          "node": ray.get_runtime_context().get_node_id()}
    ray.get(mailbox.reply.remote(rank, ("ok", me)))
    try:
        while True:
            command = ray.get(mailbox.next.remote(rank))
            if command is None:
                return
            fn, (payload,) = command
            try:
                out = fn(learner, *ray.get(payload))
            except BaseException:
                ray.get(mailbox.reply.remote(rank, ("error", traceback.format_exc())))
                raise  # fail the whole group: the other ranks may be waiting in a collective
            ray.get(mailbox.reply.remote(rank, ("ok", out)))
    finally:
        learner.remove()


# ----------------------------------------------------------------------------------------------
# the driver side


def _trainer_class(torch_trainer: type) -> type:
    """TorchTrainer without Ray Train's PlacementGroupCleaner. The cleaner, a detached actor, asks the
    State API every second whether the controller is alive and removes the run's placement group
    when the answer is no; on a loaded machine the query comes back without the (live) controller,
    and the cleaner removed a running learner's placement group, killing it mid-step (seen twice here
    on 2026-12-07: its actor exited 10 ms after the removal, the controller alive). Without it the
    group's placement group is still removed by the controller, or with the job's driver."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(torch_trainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


class LearnerGroup:
    """N data-parallel Learner ranks on Ray Train, with the Learner's methods (see the module docstring)."""

    def __init__(self, spec: JobSpec, start_timeout_s: float = 600.0, call_timeout_s: float = 3600.0,
                 collective_timeout_s: float = 1800.0):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from drpt_ray.models import model_dir

        res = spec.resources
        self.spec, self.num_workers, self.call_timeout_s = spec, res.learner_num_workers, call_timeout_s
        self.start_timeout_s = start_timeout_s
        self.failed: str | None = None
        self.closed = False
        self._pids: list[int] = []
        self._actors: list = []
        self._ready = False
        self._fit_error: BaseException | None = None
        model_dir(spec.model, spec.output_dir)  # build the tiny model once, before N ranks read it
        self._storage = tempfile.mkdtemp(prefix="drpt-learner-group-")
        self._mailbox = _Mailbox.remote(self.num_workers)
        use_gpu = res.learner_num_gpus > 0
        per_worker = {"CPU": res.learner_num_cpus, **({"GPU": res.learner_num_gpus} if use_gpu else {})}
        trainer = _trainer_class(TorchTrainer)(
            _serve,
            train_loop_config={"spec": spec, "mailbox": self._mailbox},
            scaling_config=ScalingConfig(num_workers=self.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker,
                                         placement_strategy=res.placement_strategy),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(collective_timeout_s)),
            run_config=RunConfig(name=f"learner-{uuid.uuid4().hex[:8]}", storage_path=self._storage,
                                 failure_config=FailureConfig(max_failures=0, controller_failure_limit=0,
                                                              max_preemption_failures=0)),
        )
        self._thread = threading.Thread(target=self._fit, args=(trainer,), name="learner-group-fit", daemon=True)
        self._thread.start()
        # Not waited for here: the ranks build their models while the trainer starts the rollout
        # workers; the first call (or `pids`) waits for them, bounded by start_timeout_s.

    @property
    def pids(self) -> list[int]:
        """The ranks' process ids (waits for the group to be up)."""
        self._wait_ready()
        return self._pids

    def __repr__(self) -> str:
        state = "failed" if self.failed else "closed" if self.closed else "running" if self._ready else "starting"
        return f"LearnerGroup(num_workers={self.num_workers}, {state}, pids={self._pids})"

    # ------------------------------------------------------------------------------------------
    # the Learner's methods

    def sft_step(self, general: dict, target: dict | None) -> dict:
        _need_rows(general["input_ids"].shape[0], self.num_workers, "the general batch (batch_size)")
        gs = shard_dict(general, self.num_workers)
        ts = [None] * self.num_workers
        if target is not None:
            ts = [t if t is not None else _no_tokens_row(target) for t in shard_dict(target, self.num_workers)]
        return self._call(Learner.sft_step, list(zip(gs, ts)))[0]

    def eval_sft(self, batch: dict) -> float:
        shards = shard_dict(batch, self.num_workers)
        losses = self._call(Learner.eval_sft, [(s,) for s in shards])
        total = tokens = 0.0
        for s, loss in zip(shards, losses):
            if s is not None:
                count = float(supervised_token_counts(s["labels"]).sum())
                total, tokens = total + loss * count, tokens + count
        return total / max(tokens, 1.0)

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return self.execute(Learner.generate, prompts, max_new_tokens)[0]  # every rank: FSDP's forwards are collective

    def score_rollouts(self, batch: RLBatch) -> RLBatch:
        parts = self._call(Learner.score_rollouts, [(s,) for s in shard_rl(batch, self.num_workers)])
        return cat_rl([p for p in parts if p is not None])

    def capture_target(self, batch: RLBatch) -> dict:
        return self._call(Learner.capture_target, [(s,) for s in shard_rl(batch, self.num_workers)])[0]

    def rl_step(self, batch: RLBatch) -> dict:
        _need_rows(batch.size, self.num_workers, "the rollout batch (batch_size x rollout.sampling.n)")
        return self._call(Learner.rl_step, [(s,) for s in shard_rl(batch, self.num_workers)])[0]

    def warm_start(self, batches: list[dict], lr: float) -> float:
        for b in batches:
            _need_rows(b["input_ids"].shape[0], self.num_workers, "a warm-start batch")
        per_rank = (list(zip(*[shard_dict(b, self.num_workers) for b in batches]))
                    if batches else [()] * self.num_workers)
        return self._call(Learner.warm_start, [(list(p), lr) for p in per_rank])[0]

    def needs_target(self, step: int) -> bool:
        return self.execute(Learner.needs_target, step)[0]

    def weights_ref(self) -> ray.ObjectRef:
        """Rank 0's full HF-named weights, put in the object store by rank 0 (never copied to the driver)."""
        return self.execute(Learner.weights_ref)[0]

    def save(self, path: str) -> None:
        self.execute(Learner.save, path)

    def load(self, path: str) -> None:
        self.execute(Learner.load, path)

    def save_model(self, path: str) -> str:
        return self.execute(Learner.save_model, path)[0]

    def execute(self, fn: Callable, *args) -> list:
        """fn(learner, *args) on every rank (in lockstep, so fn may use collectives); per-rank results."""
        return self._call(fn, [args] * self.num_workers)

    def remove(self) -> None:
        """Stop the workers and release the group (idempotent; bounded even when a worker hangs)."""
        if self.closed:
            return
        self.closed = True
        if self.failed is None and self._thread.is_alive():
            for r in range(self.num_workers):
                self._mailbox.put.remote(r, None)  # a rank still starting reads it once it is up
            self._thread.join(timeout=60)
        if self._thread.is_alive():  # a rank hangs: kill it (and the mailbox, which ends any waiting rank)
            self._kill_workers()
        _kill(self._mailbox)
        self._thread.join(timeout=60)
        shutil.rmtree(self._storage, ignore_errors=True)

    # ------------------------------------------------------------------------------------------
    # plumbing

    def _fit(self, trainer) -> None:
        try:
            trainer.fit()
        except BaseException as e:  # reported by the next (or current) call
            self._fit_error = e

    def _wait_ready(self) -> None:
        if self._ready:
            return
        if self.failed is not None or self.closed:
            raise LearnerGroupError(f"the learner group never started: {self.failed or 'removed'}")
        ready = self._collect("start", self.start_timeout_s)
        self._pids = [r["pid"] for r in ready]
        self._actors = [r["actor"] for r in ready]
        self._ready = True

    def _call(self, fn: Callable, per_rank: list[tuple]) -> list:
        """fn(learner, *per_rank[r]) on every rank r; the ranks' results in rank order."""
        what = getattr(fn, "__qualname__", repr(fn))
        if self.failed is not None:
            raise LearnerGroupError(f"the learner group failed earlier and cannot run {what}: {self.failed}")
        if self.closed:
            raise LearnerGroupError(f"the learner group was removed; cannot run {what}")
        self._wait_ready()
        for r, args in enumerate(per_rank):
            self._mailbox.put.remote(r, (fn, [ray.put(args)]))
        return self._collect(what, self.call_timeout_s)

    def _collect(self, method: str, timeout_s: float) -> list:
        """Every rank's reply to the last command, or LearnerGroupError (bounded by timeout_s)."""
        refs = {self._mailbox.result.remote(r): r for r in range(self.num_workers)}
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            for ref in ready:
                status, value = ray.get(ref)
                if status == "error":
                    self._fail(f"learner rank {refs[ref]} raised in {method}:\n{value}")
                replies[refs[ref]] = value
            if not pending:
                break
            if not self._thread.is_alive():
                self._fail(f"the learner worker group stopped during {method} "
                           f"(ranks {sorted(set(range(self.num_workers)) - set(replies))} never answered): "
                           f"{self._fit_error!r}")
            if time.monotonic() > deadline:
                self._fail(f"no answer to {method} from learner ranks "
                           f"{sorted(set(range(self.num_workers)) - set(replies))} within {timeout_s:.0f} s")
        return [replies[r] for r in range(self.num_workers)]

    def _fail(self, reason: str):
        """Mark the group failed, release it, raise LearnerGroupError(reason)."""
        self.failed = reason
        self.closed = True
        self._kill_workers()
        _kill(self._mailbox)
        self._thread.join(timeout=60)
        shutil.rmtree(self._storage, ignore_errors=True)
        raise LearnerGroupError(reason)

    def _kill_workers(self) -> None:
        for actor in self._actors:
            _kill(actor)


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass
