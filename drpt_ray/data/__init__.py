"""Data: examples and their loaders, the built-in synthetic tasks, `load_task`, and SFT collation.

Imports go one way: examples <- synthetic <- tasks (`load_task`), and examples <- collate.
"""

from drpt_ray.data.collate import IGNORE_INDEX, supervised_token_counts, tokenize_sft
from drpt_ray.data.examples import Example, TaskSplits, load_examples
from drpt_ray.data.synthetic import scarce_target_task, solve
from drpt_ray.data.tasks import load_task

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "TaskSplits",
    "load_examples",
    "load_task",
    "scarce_target_task",
    "solve",
    "supervised_token_counts",
    "tokenize_sft",
]
