"""A job's parts and their lifecycle, around the loop of drpt_ray/trainer.py: the checks a spec can
fail before anything starts (`preflight`), the topology it builds (`build` -> `Context`), its
checkpoints, and `shutdown`.

Topology (from `drpt_ray.topology.plan`): in RL modes the learner is a `LearnerGroup`, N
data-parallel ranks on Ray Train (`resources.learner_num_workers`; N = 1 is one rank); in SFT with
one worker it is a `Learner` in the driver process. The loop calls either through `LearnerAPI`;
rollouts come from a `RolloutPipeline` over the vLLM rollout workers, which also owns the one
`WeightSync` door back to them.

A checkpoint is one directory per step, written to a temporary name and renamed into place, so a
process killed mid-save leaves the previous checkpoint as the newest: the learner's state, and
`trainer.json` with the step, the data cursors, the divergence guard and the rollout pipeline (its
weights version and the rollouts in flight, which a resumed run trains first).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from drpt_ray.algorithms import DivergenceGuard
from drpt_ray.config import PATH_FIELDS, DivergenceSpec, JobSpec, names_path
from drpt_ray.data import BatchSampler, Example, TaskSplits, load_task, render_chat
from drpt_ray.learner import Learner, LearnerAPI, LearnerGroup
from drpt_ray.models import model_dir
from drpt_ray.rollout import make_rollout_workers
from drpt_ray.rollout.pipeline import RolloutPipeline
from drpt_ray.topology import driver_env, plan


def absolute_paths(spec: JobSpec) -> JobSpec:
    """A copy of the spec with output_dir, and relative local paths that exist, made absolute.

    Ray actors on a cluster started elsewhere do not share the driver's working directory, so a
    relative path (the default `output_dir` included) would point somewhere else inside them. The
    directory meant is the same; a hub name such as `org/model` is left alone (it does not exist
    locally)."""
    spec = spec.model_copy(deep=True)
    spec.output_dir = str(Path(spec.output_dir).resolve())
    for section, key in PATH_FIELDS:
        sub = getattr(spec, section)
        value = getattr(sub, key)
        if value and names_path((section, key), value) and Path(value).expanduser().exists():
            setattr(sub, key, str(Path(value).expanduser().resolve()))
    return spec


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
    rollouts: RolloutPipeline | None = None  # RL only, as are the two below
    reward: Any = None
    guard: DivergenceGuard | None = None
    step: int = 0
    samples: list[dict] = field(default_factory=list)  # rows for the step's samples table (`JobSpec.samples`)


def preflight(spec: JobSpec) -> TaskSplits:
    """Every check a user's spec can fail, before any actor starts; errors name the field."""
    if spec.mode != "sft":
        from drpt_ray.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES, TARGET_OBJECTIVES

        # User code named by import path: the spec's own validation imports nothing (Registry.check),
        # so this is where such a path first resolves, and where a user entry's metadata is read.
        alg = spec.algorithm
        for key, registry in (("policy_loss", POLICY_LOSSES), ("kl_estimator", KL_ESTIMATORS),
                              ("advantage", ADVANTAGE_ESTIMATORS), ("target_objective", TARGET_OBJECTIVES)):
            try:
                registry.get(getattr(alg, key))
            except ValueError as e:
                raise ValueError(f"algorithm.{key}: {e}") from None
        spec.check_algorithm(ADVANTAGE_ESTIMATORS.meta(alg.advantage), TARGET_OBJECTIVES.meta(alg.target_objective))
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
        print(f"Ray: joined the cluster at {address}", flush=True)
        return
    # address="local": a new Ray even when `ray start` (e.g. `drpt-ray serve`) left one on this machine,
    # which a bare ray.init() would join and then refuse num_cpus for.
    num_cpus = max(math.ceil(cpus_needed), os.cpu_count() or 1)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
    print(f"Ray: started a local Ray for this run ({num_cpus} CPUs; it ends with the run; --address joins a "
          "running cluster instead)", flush=True)


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
    if spec.data.uses_chat_template or splits.conversational:  # (load_task refused conversations with it off)
        splits = render_chat(splits, tokenizer)  # ctx.splits is all the driver tokenizes prompts from
    ctx = Context(
        spec=spec, out=out, splits=splits, tokenizer=tokenizer, learner=learner,
        general=BatchSampler(splits.general, spec.batch_size, spec.seed),
        target=BatchSampler(splits.target, spec.target_batch_size, spec.seed + 1),
        guard=divergence_guard(spec.divergence, len(tokenizer)) if spec.mode != "sft" else None,
    )
    if spec.mode != "sft":
        from drpt_ray.rewards import make_reward

        def draw(index: int) -> tuple[list[Example], list[Example] | None]:
            return ctx.general.next(), ctx.target.next() if learner.needs_target(index) else None

        lora_rank = spec.model.lora.r if spec.rollout.lora_adapter_sync else None
        workers = make_rollout_workers(str(path), spec.rollout, spec.seed, lora_rank)
        ctx.rollouts = RolloutPipeline(workers, spec.rollout, spec.seed, spec.steps,
                                       lambda p: tokenizer(p)["input_ids"], draw)
        ctx.reward = make_reward(spec.reward, spec.data.task, out)
    return ctx


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def divergence_guard(spec: DivergenceSpec, vocab_size: int) -> DivergenceGuard:
    """The guard of `spec`; the entropy ceiling is a fraction of a uniform policy's entropy."""
    frac = spec.entropy_ceiling_frac
    return DivergenceGuard(spec.zero_variance_steps, spec.entropy_floor,
                           frac * math.log(vocab_size) if frac is not None else None)


def save_checkpoint(ctx: Context) -> Path:
    """One consistent checkpoint: written to a temp dir, then renamed into place; keeps `keep`."""
    root = ctx.out / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step_{ctx.step:07d}"
    tmp = root / f".tmp_step_{ctx.step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ctx.learner.save(str(tmp))
    spec = {k: v for k, v in ctx.spec.model_dump(mode="json").items() if k not in RESUMABLE_CHANGES}
    state = {"step": ctx.step, "spec": spec,
             "general": ctx.general.state_dict(), "target": ctx.target.state_dict(),
             "guard": ctx.guard.state_dict() if ctx.guard is not None else None,
             **(ctx.rollouts.state_dict() if ctx.rollouts is not None else {})}
    (tmp / "trainer.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step_*"))[: -ctx.spec.checkpoint.keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "trainer.json").exists())
    return found[-1] if found else None


# What may change between a run and its resume without changing what it trains: its length, when and
# how it evaluates (evaluation reads the policy with fixed seeds and moves no data cursor), checkpoints,
# the divergence alerts, logging and naming.
RESUMABLE_CHANGES = ("steps", "eval_every", "eval_size", "eval_samples", "eval_k", "eval_generate",
                     "eval_before_warm_start", "checkpoint", "divergence", "progress", "tensorboard", "name",
                     "output_dir")


@dataclass
class Resume:
    """The checkpoint a run continues from: its directory, its trainer.json, the training keys changed since."""

    path: Path
    state: dict
    changed: list[str]


def resume_point(spec: JobSpec) -> Resume | None:
    """The checkpoint `checkpoint.resume` names for `spec`, or None to start fresh; checked before
    anything starts, so a refused resume has written nothing.

    Raises:
        ValueError: a path that holds no checkpoint, or a checkpoint written with other training keys
            (`spec_changes`) without `checkpoint.resume_changed_spec`; each names the field and the path.
    """
    mode = spec.checkpoint.resume
    own = latest_checkpoint(Path(spec.output_dir))
    if mode == "never":
        _refuse_writing_beside(spec, own)
        return None
    if mode == "auto":
        path = own
        if path is None:
            return None
    else:
        given = Path(mode).expanduser().resolve()
        path = given if (given / "trainer.json").is_file() else latest_checkpoint(given)
        if path is None:
            raise ValueError(f"checkpoint.resume: {given} is not a checkpoint: it holds no trainer.json, nor "
                             "checkpoints/step_*/trainer.json (name a checkpoints/step_N directory or a run's "
                             "output_dir)")
        if own is not None and path.resolve().parent != own.resolve().parent:
            _refuse_writing_beside(spec, own)
    state = json.loads((path / "trainer.json").read_text())
    changed = spec_changes(state.get("spec"), spec.model_dump(mode="json"))
    if changed and not spec.checkpoint.resume_changed_spec:
        raise ValueError(f"checkpoint.resume: {path} (step {state['step']}) was written by a run with other values "
                         f"of keys that change what is trained: {', '.join(changed)}. Set "
                         "checkpoint.resume_changed_spec: true to continue it with the new values anyway, or "
                         "checkpoint.resume: never (or another output_dir) to start fresh")
    return Resume(path, state, changed)


def _refuse_writing_beside(spec: JobSpec, old: Path | None) -> None:
    """A run that does not continue its output_dir's checkpoints must not write its own beside them:
    `checkpoint.keep` deletes by step number (the old run's higher steps would outlive the new ones)
    and a later `resume: auto` would continue the old run."""
    if old is not None and spec.checkpoint.every:
        raise ValueError(f"checkpoint.resume: output_dir {spec.output_dir} holds another run's checkpoints "
                         f"(newest {old.name}) and this run would write its own beside them; use another "
                         f"output_dir, delete {old.parent}, or continue that run (checkpoint.resume: auto)")


def restore(ctx: Context, resume: Resume) -> None:
    """Continue from `resume`'s checkpoint, saying from which run and step, where to, and what of the
    spec changed since."""
    path, state = resume.path, resume.state
    # save_checkpoint writes <output_dir>/checkpoints/step_N; a step directory copied elsewhere names no run
    source = f"run {path.parent.parent} ({path})" if path.parent.name == "checkpoints" else str(path)
    print(f"resumed from step {state['step']} of {source}; training to step {ctx.spec.steps} in {ctx.out}"
          + (f"; the spec changed since it was written: {', '.join(resume.changed)}" if resume.changed else ""),
          flush=True)
    ctx.learner.load(str(path))
    ctx.step = state["step"]
    ctx.general.load_state_dict(state["general"])
    ctx.target.load_state_dict(state["target"])
    if ctx.guard is not None and state.get("guard") is not None:
        ctx.guard.load_state_dict(state["guard"])
    if ctx.rollouts is not None:  # the saved rollouts in flight train first, at their saved age
        ctx.rollouts.load_state_dict(state)



def spec_changes(saved: dict | None, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose value differs between a checkpoint's spec (saved without RESUMABLE_CHANGES)
    and the current one, with both values (a checkpoint without a spec: nothing to compare)."""
    if saved is None:
        return []
    out = []
    for key in sorted(set(saved) | set(now)):
        if not prefix and key in RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def shutdown(ctx: Context) -> None:
    """Release the job's actors and reward resources (a Ray session may run several jobs)."""
    if ctx.reward is not None:
        ctx.reward.close()
    for worker in ctx.rollouts.workers if ctx.rollouts is not None else []:
        ray.kill(worker)
    ctx.learner.remove()
