"""The pools a run trains on: a built-in task or general/target/eval example files; chat rendering."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from drpt_ray.config import DataSpec
from drpt_ray.data.examples import MESSAGES_KEY, Example, TaskSplits, load_examples


def load_task(spec: DataSpec) -> TaskSplits:
    """Build the general, target and eval pools that `spec` describes.

    With `spec.task` set, the registered task's loader builds them (`drpt_ray.tasks.TASKS`: the
    synthetic tasks from the `n_*` and `seed` fields, "gsm8k" from the cache of `drpt-ray data
    fetch gsm8k`, "reasoning_gym" from its generators) and the paths are ignored. With `spec.task is
    None` the pools are read from `general_path`, `target_path` and
    `eval_path`; when `eval_path` is None the target pool doubles as the eval pool, so the
    reported "held-out" loss is then a training-set loss on the target pool.

    Args:
        spec: The data section of a run config.

    Returns:
        The three pools.

    Raises:
        ValueError: A file cannot be loaded (see `load_examples`), holds conversations while
            `chat_template` is false, or the task's sizes or data are wrong (see its loader).
    """
    if spec.task is not None:
        from drpt_ray.tasks import get_task  # the registry imports this package's loaders

        return get_task(spec.task).load(spec)
    # DataSpec's validator guarantees both paths when task is None.
    general = _load_pool(spec.general_path, spec)
    target = _load_pool(spec.target_path, spec)
    eval_ = _load_pool(spec.eval_path, spec) if spec.eval_path else list(target)
    return TaskSplits(general=general, target=target, eval=eval_)


def _load_pool(path: str, spec: DataSpec) -> list[Example]:
    examples = load_examples(path, spec.prompt_key, spec.response_key)
    if spec.chat_template is False and any(e.messages is not None for e in examples):
        raise ValueError(f"{path}: holds conversations ({MESSAGES_KEY!r}, or a list of messages under "
                         f"{spec.prompt_key!r}), which only the model's chat template can render, but "
                         "data.chat_template is false; set it to true or null")
    return examples


def render_chat(splits: TaskSplits, tokenizer: Any) -> TaskSplits:
    """Render every prompt with the tokenizer's chat template, ready for the reply: a conversation
    (`Example.messages`) as it is, a plain prompt as one user turn.

    The rendered text is later tokenized with the tokenizer's special tokens (`tokenize_sft`, the
    rollout prompts), so a BOS that the template writes and the tokenizer would add again is
    dropped here: the prompt starts with exactly one.

    Args:
        splits: The pools, prompts as plain text.
        tokenizer: A Hugging Face tokenizer with a chat template.

    Returns:
        The same pools with `apply_chat_template(turns, add_generation_prompt=True)` prompts.

    Raises:
        ValueError: The tokenizer has no chat template (names data.chat_template).
    """
    if not tokenizer.chat_template:
        raise ValueError(
            "data.chat_template is on (the default for real-problem tasks and for conversational rows) but the "
            "model's tokenizer has no chat template; set data.chat_template: false to train on plain prompts"
        )
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]

    def render(e: Example) -> str:
        turns = e.messages if e.messages is not None else [{"role": "user", "content": e.prompt}]
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return text[len(bos):] if adds_bos and text.startswith(bos) else text

    def pool(examples: list[Example]) -> list[Example]:
        return [replace(e, prompt=render(e)) for e in examples]

    return TaskSplits(general=pool(splits.general), target=pool(splits.target), eval=pool(splits.eval))
