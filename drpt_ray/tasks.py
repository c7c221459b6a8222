"""The built-in tasks: one registry, each task's loader, verifier and chat default in one entry.

`data.task` names an entry; `load_task` builds its pools, `reward.kind: task` scores with its
verifier, and `data.chat_template: null` takes its chat default. A new task is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from drpt_ray.config import DataSpec
from drpt_ray.data import gsm8k, reasoning_gym
from drpt_ray.data.examples import TaskSplits
from drpt_ray.data.synthetic import arithmetic_task, scarce_target_task
from drpt_ray.rewards import tasks as verifiers
from drpt_ray.rewards.verifiable import ScoreFn


@dataclass(frozen=True)
class Task:
    """A built-in task.

    Attributes:
        load: DataSpec -> the general, target and eval pools.
        verifier: reward.kind 'task' (prompt, response, reference, split) -> reward.
        chat: whether prompts go through the model's chat template by default (real problems do).
    """

    load: Callable[[DataSpec], TaskSplits]
    verifier: ScoreFn
    chat: bool


TASKS: dict[str, Task] = {
    "scarce_target": Task(
        lambda d: scarce_target_task(n_general=d.n_general, n_target=d.n_target,
                                     n_eval=d.n_eval, p_clean=d.p_clean, seed=d.seed),
        verifiers.scarce_target_verifier, chat=False),
    "arithmetic": Task(
        lambda d: arithmetic_task(n_general=d.n_general, n_target=d.n_target, n_eval=d.n_eval, seed=d.seed),
        verifiers.arithmetic_verifier, chat=False),
    "gsm8k": Task(
        lambda d: gsm8k.load(n_target=d.n_target, n_eval=d.n_eval, n_general=d.n_general, seed=d.seed),
        verifiers.gsm8k_verifier, chat=True),
    "reasoning_gym": Task(reasoning_gym.load, verifiers.reasoning_gym_verifier, chat=True),
}


def get_task(name: str) -> Task:
    """The task registered as `name`.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown data.task {name!r}; valid: {sorted(TASKS)} or null (data files)") from None
