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
from drpt_ray.config import DivergenceSpec, JobSpec
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


# ----------------------------------------------------------------------------------------------
# preflight and topology


def preflight(spec: JobSpec) -> TaskSplits:
    """Every check a user's spec can fail, before any actor starts; errors name the field."""
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


def generate(ctx: Context, prompt_ids: list[list[int]], sampling) -> list[Rollout]:
    """Split prompts over the workers; re-issue a dead or stale worker's share after re-syncing it."""
    shares = [prompt_ids[i :: len(ctx.workers)] for i in range(len(ctx.workers))]
    refs = [w.generate.remote(s, sampling) if s else None for w, s in zip(ctx.workers, shares)]
    by_worker = []
    for w, share, ref in zip(ctx.workers, shares, refs):
        if ref is None:
            by_worker.append([])
            continue
        try:
            out = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
            out = None
        if out is None or any(r.weights_version != ctx.weights.version for r in out):
            out = _reissue(ctx, w, share, sampling)
        by_worker.append(out)
    # restore the caller's prompt order: worker k served prompts k, k+W, k+2W, ...
    n = sampling.n
    ordered: list[Rollout] = []
    for i in range(len(prompt_ids)):
        k, j = i % len(ctx.workers), i // len(ctx.workers)
        group = by_worker[k][j * n : (j + 1) * n]
        ordered += [Rollout(**{**r.__dict__, "prompt_index": i}) for r in group]
    return ordered


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
    """Learner weights -> object store -> every worker (the reference only passes through the driver)."""
    ctx.weights.push(ctx.learner.weights_ref())


def _prompt_ids(ctx: Context, examples: list[Example]) -> list[list[int]]:
    return [ctx.tokenizer(e.prompt)["input_ids"] for e in examples]


@dataclass
class Group:
    """One prompt's `n` rollouts and their rewards."""

    example: Example
    rollouts: list[Rollout]
    rewards: list[float]
    errors: int = 0


def sample_groups(ctx: Context, examples: list[Example], split: str, sampling, metrics: dict) -> list[Group]:
    """gen + reward for one set of prompts, grouped by prompt."""
    with timer(metrics, "gen"):
        rollouts = generate(ctx, _prompt_ids(ctx, examples), sampling)
    with timer(metrics, "reward"):
        scored = ctx.reward([examples[r.prompt_index].prompt for r in rollouts], [r.text for r in rollouts],
                            [examples[r.prompt_index].response for r in rollouts], split)
    n = sampling.n
    return [Group(e, rollouts[i * n : (i + 1) * n], scored.scores[i * n : (i + 1) * n], scored.errors if i == 0 else 0)
            for i, e in enumerate(examples)]


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


def general_groups(ctx: Context, sampling, metrics: dict) -> list[Group]:
    """The step's general groups (with `filter_zero_variance_groups`, refilled by `refill`)."""
    alg = ctx.spec.algorithm
    draws: list[list[Group]] = []

    def draw() -> list[Group]:
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
        if train:
            mask = batch.response_mask
            metrics["rollout/mismatch_kl"] = mismatch_kl(batch.old_logprobs, batch.rollout_logprobs, mask)
            if alg.tis_cap is not None:
                # The learner's old log-probs define the PPO ratio; vLLM's are what actually sampled.
                batch.advantages = batch.advantages * tis_weights(batch.old_logprobs, batch.rollout_logprobs, mask, alg.tis_cap)
            if alg.mask_truncated_completions:
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
        sampling = spec.rollout.sampling.model_copy(update={"seed": spec.seed * 1_000_003 + ctx.step})
        groups = general_groups(ctx, sampling, m)
        target = sample_groups(ctx, ctx.target.next(), "target", sampling, m) if wants_target else None
        batch = rollout_batch(ctx, groups, m, "reward/", train=True)
        if target is not None:
            m.update(ctx.learner.capture_target(rollout_batch(ctx, target, m, "target/", train=False)))
        m.update(ctx.learner.rl_step(batch))
        with timer(m, "sync"):
            sync(ctx)
    m["time/step"] = time.perf_counter() - t0
    ctx.step += 1
    return m


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
             "guard": ctx.guard.state_dict() if ctx.guard is not None else None}
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
    """RL only: plain SFT on the general pool's (prompt, response) pairs before RL begins."""
    spec = ctx.spec
    sampler = BatchSampler(ctx.splits.general, spec.warm_start_batch_size, spec.seed + 7)
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
