"""The driver loop: one `step` for SFT, RLHF and RLVR (SFT skips the rollout phases).

One RL step (`rl_step`), each phase one call inside one named timer (metrics `time/<phase>`):
  1. gen       the rollout pipeline hands over the step's rollouts: `n` responses per general
               prompt (and per target prompt on refresh steps), sampled by vLLM rollout workers
  2. reward    verifiable function or reward model; general and target splits scored apart.
               With dynamic sampling (DAPO) 1-2 repeat on fresh prompts until the batch holds
               `batch_size` groups whose rewards differ, or `max_sampling_rounds` is spent
  3. logprob   learner recomputes behaviour log-probs (+ reference log-probs, + values)
  4. adv       advantages from the registry (GRPO group norm, ..., GAE with the critic)
  5. regularize  learner captures the target gradient g_T from the target rollouts
  6. update    learner: regularized backward of the policy loss -> clip -> AdamW
  7. sync      learner weights -> object store -> every rollout worker (in place)
then metrics (JSONL, TensorBoard, the callback the control plane streams) and checkpoints.

Synchronous and asynchronous RL are the same loop: `RolloutPipeline` (drpt_ray/rollout/pipeline.py)
keeps k steps of generation in flight (the staleness bound of the rollout spec), so at depth k > 0
the workers sample while the learner works and `gen` is only the wait; depth 0 samples each step
with the current weights. How old the rollouts are is data (`rollout/staleness_*`), not a mode:
stale target rollouts get the same capped importance weights as the training batch.

What the loop runs on (the learner, the pipeline, the reward), the checks before it starts and its
checkpoints are drpt_ray/job.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from drpt_ray.algorithms import (
    AdvantageInputs,
    between_prompt_variance_fraction,
    compute_advantages,
    correction_metrics,
    correction_weights,
    has_reward_variance,
    kl_penalty_tokens,
    log_ratios,
    mismatch_kl,
    pass_at_k,
    refill,
)
from drpt_ray.config import JobSpec, SamplingSpec
from drpt_ray.data import BatchSampler, Example, tokenize_sft
from drpt_ray.errors import Diverged
from drpt_ray.learner import RLBatch, build_batch
from drpt_ray.job import (Context, absolute_paths, build, preflight, restore, resume_point, save_checkpoint,
                          shutdown)
from drpt_ray.metrics import MetricLogger, PhaseTimer, progress_postfix
from drpt_ray.rollout import Rollout
from drpt_ray.rollout.pipeline import Sampled

MetricsCallback = Callable[[dict], None]
AlertCallback = Callable[[int, str], None]
SamplesCallback = Callable[[int, list[dict]], None]  # (step, rows of the samples table)


@dataclass
class JobResult:
    output_dir: Path
    steps: int
    final: dict
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# rollouts -> scored groups -> a learner batch


@dataclass
class Group:
    """One prompt's `n` rollouts and their rewards."""

    example: Example
    rollouts: list[Rollout]
    rewards: list[float]
    errors: int = 0
    advantages: list[float] | None = None  # per response: its tokens' mean advantage (set by `rollout_batch`)
    parts: dict[str, list[float]] = field(default_factory=dict)  # each user function's scores (RewardResult.parts)


def score(ctx: Context, sampled: Sampled, split: str) -> list[Group]:
    """The reward phase: every rollout scored, grouped by its prompt."""
    examples, rollouts = sampled.examples, sampled.rollouts
    n = len(rollouts) // len(examples)
    rows = [examples[r.prompt_index] for r in rollouts]
    scored = ctx.reward([e.prompt for e in rows], [r.text for r in rollouts], [e.scored_against for e in rows], split,
                        [e.extras for e in rows])
    if scored.errors > ctx.spec.reward.max_error_frac * len(rollouts):
        # Most responses could not be scored: a broken reward, not a run to train on zeros.
        raise ValueError(f"the reward failed on {scored.errors} of the {len(rollouts)} {split} responses of step "
                         f"{ctx.step + 1} (more than reward.max_error_frac {ctx.spec.reward.max_error_frac:g}; "
                         f"reward.timeout_s bounds each call); the first:\n{scored.first_error}")
    return [Group(e, rollouts[i * n : (i + 1) * n], scored.scores[i * n : (i + 1) * n], scored.errors if i == 0 else 0,
                  parts={name: xs[i * n : (i + 1) * n] for name, xs in scored.parts.items()})
            for i, e in enumerate(examples)]


def part_means(groups: list[Group], prefix: str) -> dict:
    """`<prefix><name>/mean`: the mean score of each user reward function over the groups' rollouts."""
    return {f"{prefix}{name}/mean": _mean([x for g in groups for x in g.parts[name]]) for name in groups[0].parts}


def sample(ctx: Context, examples: list[Example], split: str,
           sampling: SamplingSpec, t: PhaseTimer) -> tuple[list[Group], float]:
    """gen + reward for `examples` with the current weights; returns the groups and the workers' busy seconds."""
    with t("gen"):
        rollouts, busy = ctx.rollouts.generate(examples, sampling)
    with t("reward"):
        return score(ctx, Sampled(examples, rollouts), split), busy


def general_groups(ctx: Context, first: list[Group], sampling: SamplingSpec, t: PhaseTimer) -> tuple[list[Group], dict]:
    """The step's general groups: `first` (the pipeline's), refilled with fresh draws when
    `filter_zero_variance_groups` asks (DAPO, `refill`); returns them and the reward metrics."""
    alg = ctx.spec.algorithm
    busy, calls = 0.0, 0

    def draw() -> list[Group]:
        nonlocal busy, calls
        calls += 1
        if calls == 1:
            return first
        groups, seconds = sample(ctx, ctx.general.next(), "general", sampling, t)
        busy += seconds
        return groups

    r = refill(draw, ctx.spec.batch_size, alg.max_sampling_rounds if alg.filter_zero_variance_groups else 1)
    # Every rollout generated this step is an unbiased sample of the policy: the reward to watch,
    # and the one whose variance tells the divergence guard whether anything is left to learn.
    every = torch.tensor([x for g in r.seen for x in g.rewards])
    m = {"reward/zero_variance_frac": sum(not has_reward_variance(g.rewards) for g in first) / len(first),
         "reward/reward_mean": float(every.mean()),
         "reward/reward_std": float(every.std()) if every.numel() > 1 else 0.0,
         "time/rollout_busy": busy} | part_means(r.seen, "reward/")
    if not alg.filter_zero_variance_groups:
        return first, m
    return r.kept, m | {"reward/sampling_rounds": float(r.rounds), "reward/kept_groups": float(len(r.kept))}


def rollout_batch(ctx: Context, groups: list[Group], split: str, stale: bool, t: PhaseTimer) -> tuple[RLBatch, dict]:
    """logprob + adv for scored groups: the learner-ready batch and its metrics (`reward/*` for the
    general split, `target/*` for the target's). The general batch is the one the policy loss sees:
    TIS and truncation masking apply to it; `stale`: some rollouts were sampled by older weights (a
    deeper pipeline), so the target batch is corrected too."""
    alg = ctx.spec.algorithm
    train = split == "general"
    prefix = "reward/" if train else "target/"
    rollouts = [r for g in groups for r in g.rollouts]
    batch = build_batch(
        [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], [x for g in groups for x in g.rewards],
        [i for i, g in enumerate(groups) for _ in g.rollouts], ctx.tokenizer.pad_token_id,
        rollout_logprobs=[r.response_logprobs for r in rollouts],
        truncated=[r.finish_reason == "length" for r in rollouts],
    )
    m: dict = {}
    with t("logprob"):
        batch = ctx.learner.score_rollouts(batch)
    with t("adv"):
        token_rewards = None
        if batch.ref_logprobs is not None and alg.kl_in_reward:
            token_rewards = kl_penalty_tokens(batch.old_logprobs, batch.ref_logprobs, alg.kl_estimator, alg.kl_coef)
        inputs = AdvantageInputs(
            rewards=batch.rewards, group_ids=batch.group_ids, response_mask=batch.response_mask,
            values=batch.values, token_rewards=token_rewards, gamma=alg.gamma, lam=alg.lam,
        )
        batch.advantages, batch.returns = compute_advantages(alg.advantage, inputs)  # returns: None without a critic
        mask = batch.response_mask
        row_adv = ((batch.advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
        for i, g in enumerate(groups):  # the advantage as estimated, before any correction weight
            g.advantages = row_adv[i * len(g.rollouts) : (i + 1) * len(g.rollouts)]
        if train:
            m["rollout/mismatch_kl"] = mismatch_kl(batch.old_logprobs, batch.rollout_logprobs, mask)
        fix = alg.rollout_correction
        if fix is not None and (train or stale):
            # The learner's old log-probs (current weights) define the PPO ratio; vLLM's are what
            # actually sampled, possibly with weights some versions older: one bounded weight
            # corrects both the engine's mismatch and the staleness.
            log_ratio = log_ratios(batch.old_logprobs, batch.rollout_logprobs, mask, fix.level)
            weights = correction_weights(log_ratio, mask, fix.mode, fix.upper, fix.lower)
            batch.advantages = batch.advantages * weights
            name = "rollout/" + ("" if train else "target_")
            m |= {name + k: v for k, v in correction_metrics(log_ratio, weights, mask, fix.mode, fix.upper).items()}
        if train and alg.mask_truncated_completions:
            batch = batch.without_truncated()
    if not train:  # the general split's part means are over every draw of the step, as its reward is (general_groups)
        m[f"{prefix}between_prompt_var_frac"] = between_prompt_variance_fraction(batch.rewards, batch.group_ids)
        m |= part_means(groups, prefix)
    return batch, m | {
        f"{prefix}reward_mean": float(batch.rewards.mean()),
        f"{prefix}reward_std": float(batch.rewards.std()) if batch.size > 1 else 0.0,
        f"{prefix}response_len": sum(len(r.response_ids) for r in rollouts) / len(rollouts),
        f"{prefix}truncated_frac": float(batch.truncated.float().mean()),
        f"{prefix}errors": float(sum(g.errors for g in groups)),
    }


# ----------------------------------------------------------------------------------------------
# the step


def step(ctx: Context) -> dict:
    """One training step of any mode; returns its metrics."""
    t = PhaseTimer()
    m = {"step": ctx.step + 1, **(sft_step(ctx, t) if ctx.spec.mode == "sft" else rl_step(ctx, t))}
    m.update(t.metrics())
    if ctx.spec.mode != "sft":
        # The learner waits while rollouts are generated (all of `gen` at depth 0, only what the
        # overlap did not hide deeper); the workers idle the rest of the step. A batch generated
        # during the previous step counts in the step that trains on it.
        m["throughput/learner_idle_frac"] = m["time/gen"] / m["time/step"]
        m["throughput/rollout_idle_frac"] = max(
            0.0, 1 - m["time/rollout_busy"] / (len(ctx.rollouts.workers) * m["time/step"]))
        m["throughput/steps_per_s"] = 1 / m["time/step"]
    ctx.step += 1
    return m


def sft_step(ctx: Context, t: PhaseTimer) -> dict:
    """A batch of general (and, when the regularizer asks, target) examples through the learner."""
    spec = ctx.spec
    with t("sample"):
        general = tokenize_sft(ctx.tokenizer, ctx.general.next(), spec.data.max_len)
        target = (tokenize_sft(ctx.tokenizer, ctx.target.next(), spec.data.max_len)
                  if ctx.learner.needs_target(ctx.step) else None)
    return ctx.learner.sft_step(general, target)  # times its own capture and update (one merged call)


def rl_step(ctx: Context, t: PhaseTimer) -> dict:
    """Phases 1-7 of the module docstring."""
    with t("gen"):  # the wait: what generation the learner's previous update did not hide
        taken = ctx.rollouts.take(ctx.step)
    m = dict(taken.stats)
    sampling = ctx.rollouts.sampling(taken.index)
    with t("reward"):
        first = score(ctx, taken.general, "general")
        target = score(ctx, taken.target, "target") if taken.target is not None else None
    groups, drawn = general_groups(ctx, first, sampling, t)
    m["time/rollout_busy"] += drawn.pop("time/rollout_busy")
    if target is None and ctx.learner.needs_target(ctx.step):  # not foreseen when submitted (a resume's first capture)
        target, busy = sample(ctx, ctx.target.next(), "target", sampling, t)
        m["time/rollout_busy"] += busy
    stale = m["rollout/staleness_max"] > 0
    batch, batch_m = rollout_batch(ctx, groups, "general", stale, t)
    m |= batch_m | drawn  # the reward over every draw of the step, not only the kept groups
    if target is not None:
        target_batch, target_m = rollout_batch(ctx, target, "target", stale, t)
        m |= target_m
        with t("regularize"):
            m |= ctx.learner.capture_target(target_batch)
    every = ctx.spec.samples.every
    if every and (ctx.step + 1) % every == 0:
        ctx.samples += sample_rows(groups, "general", ctx.spec.samples.groups)
        ctx.samples += sample_rows(target or [], "target", ctx.spec.samples.groups)
    with t("update"):
        m |= ctx.learner.rl_step(batch)
    with t("sync"):
        ctx.rollouts.publish(ctx.learner.weights_ref())
    return m


def sample_rows(groups: list[Group], split: str, n_groups: int) -> list[dict]:
    """The first `n_groups` prompts' responses as rows of the samples table (`parts`: each user reward
    function's own score, `reward.functions`)."""
    return [{"split": split, "group": i, "prompt": g.example.prompt, "response": r.text, "reward": reward,
             "advantage": None if g.advantages is None else g.advantages[j],
             "parts": {name: xs[j] for name, xs in g.parts.items()}}
            for i, g in enumerate(groups[:n_groups]) for j, (r, reward) in enumerate(zip(g.rollouts, g.rewards))]


def evaluate(ctx: Context) -> dict:
    """Held-out target quality: token-mean loss (SFT) or greedy strict reward (RL)."""
    spec = ctx.spec
    if spec.mode == "sft":
        batch = tokenize_sft(ctx.tokenizer, ctx.splits.eval, spec.data.max_len)
        return {"eval/target_loss": ctx.learner.eval_sft(batch)} | (generated(ctx) if spec.eval_generate else {})
    examples = ctx.splits.eval[: spec.eval_size]
    greedy = spec.rollout.sampling.model_copy(update={"n": 1, "temperature": 0.0, "seed": 0})
    t = PhaseTimer()  # evaluation is not a phase of the step's timings
    answers = sample(ctx, examples, "target", greedy, t)[0]
    out = {"eval/target_reward": _mean([g.rewards[0] for g in answers])}
    if spec.samples.every:
        ctx.samples += sample_rows(answers, "eval", spec.samples.groups)
    if spec.eval_samples:
        # The training temperature, a fixed seed: the same draw at every evaluation, only the policy moves.
        sampled = spec.rollout.sampling.model_copy(update={"n": spec.eval_samples, "seed": 1})
        groups = sample(ctx, examples, "target", sampled, t)[0]
        rewards = [x for g in groups for x in g.rewards]
        out["eval/target_reward_sampled"] = _mean(rewards)
        if all(x in (0.0, 1.0) for x in rewards):  # pass@k needs a right/wrong verdict
            for k in sorted({1, spec.eval_k}):
                out[f"eval/target_pass@{k}"] = _mean([pass_at_k(spec.eval_samples, int(sum(g.rewards)), k)
                                                      for g in groups])
    return out


def generated(ctx: Context) -> dict:
    """SFT: greedy answers to the first `eval_generate` held-out prompts, scored against the data's
    responses (a lower loss need not mean the wanted answers); the first three go to the log."""
    examples = ctx.splits.eval[: ctx.spec.eval_generate]
    longest = max(len(ctx.tokenizer(e.response, add_special_tokens=False).input_ids) for e in examples)
    answers = ctx.learner.generate([e.prompt for e in examples], longest + 4)
    for e, a in list(zip(examples, answers))[:3]:
        tqdm.write(f"eval sample: {e.prompt!r} -> {a!r} (data: {e.response!r})")
    return {"eval/target_exact": _mean([float(a.strip() == e.response.strip()) for e, a in zip(examples, answers)])}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------------------------
# the job


def warm_start(ctx: Context) -> float:
    """RL only: plain SFT on the (prompt, response) pairs of `warm_start_pool` before RL begins."""
    spec = ctx.spec
    pool = ctx.splits.target if spec.warm_start_pool == "target" else ctx.splits.general
    sampler = BatchSampler(pool, spec.warm_start_batch_size, spec.seed + 7)
    batches = [tokenize_sft(ctx.tokenizer, sampler.next(), spec.data.max_len) for _ in range(spec.warm_start_sft_steps)]
    return ctx.learner.warm_start(batches, spec.warm_start_lr)


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
            on_alert: AlertCallback | None = None, on_samples: SamplesCallback | None = None) -> JobResult:
    """Run a JobSpec to the end (from the checkpoint `checkpoint.resume` names, if any); returns a summary.

    `on_samples(step, rows)` gets each samples table (`spec.samples`) as it is written.
    A collapsed run never ends as a success: each step the divergence guard may raise an alert
    (`on_alert(step, message)`, also printed); a non-finite loss, or any alert with
    `divergence.stop_on_divergence`, raises `Diverged`. While the guard is alarmed (a streak of K
    zero-variance steps, or entropy under the floor) no checkpoint is written, so the newest one on
    disk is a state from before the alert. (A shorter streak is not suspect: a hard task's first
    steps often score every response 0.)
    """
    spec = absolute_paths(spec)  # actors do not share the driver's working directory
    splits = preflight(spec)
    resume = resume_point(spec)  # before any actor starts: a refused resume costs nothing
    ctx = build(spec, splits, address)
    base = {}  # the held-out figures of the model as loaded, when a warm start will change it
    if resume is not None:
        restore(ctx, resume)
    elif spec.mode != "sft" and spec.warm_start_sft_steps:
        if spec.eval_before_warm_start:
            base = {f"eval_base/{k.removeprefix('eval/')}": v for k, v in evaluate(ctx).items()}
        print(f"warm start: {spec.warm_start_sft_steps} SFT steps, loss {warm_start(ctx):.3f}", flush=True)
    if ctx.rollouts is not None and (resume is not None or spec.warm_start_sft_steps):
        ctx.rollouts.publish(ctx.learner.weights_ref())
    log = MetricLogger(ctx.out, spec.tensorboard, on_metrics, resume_step=ctx.step, on_samples=on_samples)
    bar = tqdm(total=spec.steps, initial=ctx.step, disable=not spec.progress,
               desc=f"{spec.mode}[{spec.regularizer.feasible_set}]")
    try:
        if ctx.step == 0:
            log.write({"step": 0, **base, **evaluate(ctx)})
            log.write_samples(0, ctx.samples)
            ctx.samples = []
        while ctx.step < spec.steps:
            m = step(ctx)
            if ctx.step % spec.eval_every == 0 or ctx.step == spec.steps:
                m.update(evaluate(ctx))
            log.write(m)
            log.write_samples(ctx.step, ctx.samples)
            ctx.samples = []
            bar.update(1)
            bar.set_postfix(progress_postfix(m))
            alert = divergence(ctx, m)
            if alert is not None:
                tqdm.write(f"ALERT step {ctx.step}: {alert}")
                if on_alert is not None:
                    on_alert(ctx.step, alert)
                if spec.divergence.stop_on_divergence or alert.startswith("non-finite"):
                    raise Diverged(ctx.step, alert)
            alarmed = ctx.guard is not None and ctx.guard.alarmed
            if (spec.checkpoint.every and (ctx.step % spec.checkpoint.every == 0 or ctx.step == spec.steps)
                    and not alarmed):  # the last step too: a finished run can be extended (more `steps`)
                save_checkpoint(ctx)
        ctx.learner.save_model(str(ctx.out / "model"))
    finally:
        bar.close()
        log.close()
        shutdown(ctx)
        log.plot(ctx.out / "curves.png", title=f"{spec.mode} {spec.regularizer.feasible_set}")
    return JobResult(ctx.out, ctx.step, log.history[-1] if log.history else {}, log.history)
