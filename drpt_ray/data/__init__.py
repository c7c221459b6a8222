"""Data: examples and their loaders, the built-in tasks, `load_task`, chat rendering, SFT collation.

Imports go one way: examples <- synthetic, gsm8k <- tasks (`load_task`, `render_chat`), and
examples <- collate; sampler (batches over a pool) stands alone.
"""

from drpt_ray.data.collate import IGNORE_INDEX, supervised_token_counts, tokenize_sft
from drpt_ray.data.examples import Example, TaskSplits, load_examples
from drpt_ray.data.sampler import BatchSampler
from drpt_ray.data.synthetic import scarce_target_task, solve
from drpt_ray.data.tasks import load_task, render_chat

__all__ = [
    "BatchSampler",
    "IGNORE_INDEX",
    "Example",
    "TaskSplits",
    "load_examples",
    "load_task",
    "render_chat",
    "scarce_target_task",
    "solve",
    "supervised_token_counts",
    "tokenize_sft",
]
