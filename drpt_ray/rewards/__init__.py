"""Rewards: one `Reward` interface, one door (`make_reward`), one preflight (`check_reward`).

A `Reward` is called on a batch, `reward(prompts, responses, references, split, extras) -> RewardResult`
(one score per response plus an error count), whatever `reward.kind` is:

| reward.kind | scores                                         | runs where                        |
|-------------|------------------------------------------------|-----------------------------------|
| task        | the built-in task's verifier (tasks.py)        | in the caller                     |
| exact_match | stripped response == stripped reference        | in the caller                     |
| math        | math-verify equality with the reference        | in the caller                     |
| function    | user `module:function`s, weighted, timed out   | a child process of the caller     |
| model       | a reward model's logit (RLHF)                  | one `RewardModelWorker` Ray actor |

With `reward.target_kind` the target split is scored by that verifier instead (`SplitReward`).

Build a reward in the process that calls it (a function reward owns a child process) and `close`
it when done.
"""

from __future__ import annotations

from pathlib import Path

from drpt_ray.config import RewardFunctionSpec, RewardSpec
from drpt_ray.rewards.model import ModelReward, RewardModelScorer, RewardModelWorker, tiny_reward_model
from drpt_ray.rewards.user import FunctionReward, resolve_function
from drpt_ray.rewards.verifiable import (
    Reward,
    RewardResult,
    Split,
    VerifierReward,
    exact_match_score,
    exact_match_verifier,
    math_score,
    math_verifier,
)
from drpt_ray.topology import REWARD_MODEL_CPUS

__all__ = [
    "FunctionReward",
    "ModelReward",
    "Reward",
    "RewardModelScorer",
    "RewardModelWorker",
    "RewardResult",
    "Split",
    "SplitReward",
    "VerifierReward",
    "check_reward",
    "exact_match_score",
    "make_reward",
    "math_score",
    "resolve_function",
    "tiny_reward_model",
]


def check_reward(spec: RewardSpec, task: str | None) -> None:
    """Preflight: refuse a reward that cannot be built, before any actor starts.

    Args:
        spec: The reward section of a job.
        task: The job's `data.task` (None when the data comes from files).

    Raises:
        ValueError: kind 'task' without a built-in task (names `reward.kind`); kind 'function'
            with a function that cannot be resolved (names its field: `reward.function` or
            `reward.functions.<i>.function`); kind 'model' whose `reward.model_path` is not a directory.
    """
    from drpt_ray.tasks import TASKS  # the task registry imports this package

    if spec.target_kind == "task" and task not in TASKS:
        raise ValueError(f"reward.target_kind 'task' scores with a built-in task's verifier, but data.task is {task!r}")
    if spec.kind == "task" and task not in TASKS:
        raise ValueError(
            f"reward.kind 'task' scores with a built-in task's verifier, but data.task is {task!r}; "
            f"set data.task to one of {sorted(TASKS)} or choose reward.kind "
            "'exact_match', 'math', 'function' or 'model'"
        )
    if spec.kind == "function":
        for field, f in _functions(spec).items():
            resolve_function(f.function, field)
    if spec.kind == "model" and spec.model_path is not None and not Path(spec.model_path).expanduser().is_dir():
        raise ValueError(
            f"reward.model_path {spec.model_path!r} is not a directory; give the local directory of a "
            "sequence-classification model, or null for a tiny random one"
        )


def make_reward(spec: RewardSpec, task: str | None, work_dir: Path | str,
                num_cpus: float = REWARD_MODEL_CPUS) -> Reward:
    """Build the reward that `spec` describes (after `check_reward`).

    Args:
        spec: The reward section of a job.
        task: The job's `data.task`; kind 'task' uses its verifier.
        work_dir: Run directory; kind 'model' with `model_path` None builds a tiny reward model
            under `work_dir / "tiny-reward-model"`.
        num_cpus: Ray CPUs reserved by the reward-model actor (kind 'model' only).

    Returns:
        The reward; kind 'model' has started its `RewardModelWorker` actor (Ray is initialised
        if it is not yet).

    Raises:
        ValueError: See `check_reward`.
    """
    check_reward(spec, task)
    if spec.target_kind is not None:
        general = make_reward(spec.model_copy(update={"target_kind": None}), task, work_dir, num_cpus)
        return SplitReward(general, _verifier(spec.target_kind, task))
    if spec.kind in ("task", "exact_match", "math"):
        return _verifier(spec.kind, task)
    if spec.kind == "function":
        return FunctionReward(_functions(spec), spec.timeout_s)
    model_path = spec.model_path or tiny_reward_model(Path(work_dir) / "tiny-reward-model")
    worker = RewardModelWorker.options(num_cpus=num_cpus).remote(str(Path(model_path).expanduser()))
    return ModelReward(worker)


def _functions(spec: RewardSpec) -> dict[str, RewardFunctionSpec]:
    """The user functions of `spec` by their dotted field, as errors name them."""
    return {".".join(map(str, loc)): f for loc, f in spec.user_functions().items()}


def _verifier(kind: str, task: str | None) -> VerifierReward:
    if kind == "task":
        from drpt_ray.tasks import get_task

        return VerifierReward(get_task(task).verifier)
    return VerifierReward({"exact_match": exact_match_verifier, "math": math_verifier}[kind])


class SplitReward(Reward):
    """The general split scored by one reward, the target split by another (`reward.target_kind`)."""

    def __init__(self, general: Reward, target: Reward) -> None:
        self.general, self.target = general, target

    def __call__(self, prompts: list[str], responses: list[str], references: list[str | None], split: Split,
                 extras: list[dict] | None = None) -> RewardResult:
        return (self.target if split == "target" else self.general)(prompts, responses, references, split, extras)

    def close(self) -> None:
        self.general.close()
        self.target.close()
