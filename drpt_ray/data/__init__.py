"""Data: examples and their loaders, the built-in synthetic task, and SFT collation."""

from drpt_ray.data.collate import IGNORE_INDEX, supervised_token_counts, tokenize_sft
from drpt_ray.data.examples import Example, TaskSplits, load_examples, load_task
from drpt_ray.data.synthetic import scarce_target_task, solve

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
