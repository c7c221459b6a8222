"""SFT examples: the record type, the general/target/eval splits of a task, and file loaders.

The bottom of the data package: `synthetic` builds its pools from these types and
`tasks.load_task` picks a synthetic task or files, so this module imports neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_SUFFIXES = (".jsonl", ".parquet")


# TRL's conversational language-modeling rows hold the whole conversation under this key.
MESSAGES_KEY = "messages"


@dataclass(frozen=True)
class Example:
    """One supervised example: the model is conditioned on `prompt` and trained to emit `response`.

    The text is concatenated as-is (no separator is inserted), so any space between the two
    belongs at the start of `response`. `reference` is what a verifier scores a generated reply
    against when that is not the response itself (a reasoning-gym entry, as JSON).

    A conversational row (TRL's `messages`, or a list of messages as the prompt) keeps its turns
    before the response in `messages`, and `prompt` is empty until `render_chat` renders them
    with the model's chat template. `extras` holds the row's other columns (JSON values), which
    user reward functions take as keyword arguments.
    """

    prompt: str
    response: str
    reference: str | None = None
    # Lists and dicts cannot be hashed; an Example hashes by its text.
    messages: list[dict] | None = field(default=None, hash=False)
    extras: dict = field(default_factory=dict, hash=False)

    @property
    def scored_against(self) -> str:
        """The verifier's reference: `reference`, else the response."""
        return self.response if self.reference is None else self.reference


@dataclass
class TaskSplits:
    """The three pools of a data-regularized SFT task.

    Attributes:
        general: Plentiful, related but partly misaligned examples; the regularizer curates them.
        target: The scarce pool whose gradient defines what "aligned" means.
        eval: Held-out target-distribution examples for the held-out target loss.
    """

    general: list[Example]
    target: list[Example]
    eval: list[Example]

    @property
    def conversational(self) -> bool:
        """Whether any example is a conversation, which only the chat template can render."""
        return any(e.messages is not None for pool in (self.general, self.target, self.eval) for e in pool)


def _checked_text(value: object, key: str, where: str) -> str:
    """Return `value` if it is a string, else raise a ValueError that names `where` and `key`."""
    if value is None:
        raise ValueError(f"{where}: missing key {key!r}")
    if not isinstance(value, str):
        raise ValueError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    return value


def _checked_messages(value: object, key: str, where: str) -> list[dict]:
    """Return `value` if it is a non-empty list of messages (objects with string `role` and
    `content`), else raise a ValueError that names `where` and `key`."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: key {key!r} must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: key {key!r}, message {i}: expected an object with string 'role' and "
                             f"'content', got {m!r:.80}")
    return value


def _assistant_text(messages: list[dict], key: str, where: str) -> str:
    """The content of `messages`' last message, which must be the assistant's (the response)."""
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: key {key!r} must end with an assistant message (the response), got role "
                         f"{messages[-1]['role']!r}")
    return messages[-1]["content"]


def _checked_json(value: object, key: str, where: str) -> object:
    """Return `value` if it is a JSON value (extras travel to the reward process and into checkpoints)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: column {key!r} holds a {type(value).__name__}, not a JSON value; the "
                         "extra columns of a row are passed to reward functions and must be JSON") from None
    return value


def _read_keys(present, prompt_key: str, response_key: str, where: str, what: str) -> tuple[str, ...]:
    """The keys a row is read from: `messages` alone (a TRL conversation) where the prompt key is
    absent and it is present, else the prompt and response keys, which must both be present."""
    if prompt_key not in present and MESSAGES_KEY in present:
        return (MESSAGES_KEY,)
    for key, setting in ((prompt_key, "data.prompt_key"), (response_key, "data.response_key")):
        if key not in present:
            raise ValueError(f"{where}: missing {what} {key!r} (there are {sorted(present)}; {setting} names the "
                             f"{what} to read instead, e.g. response_key: completion for TRL-style data, or give "
                             f"the conversation as {MESSAGES_KEY!r})")
    return (prompt_key, response_key)


def _example(row: dict, keys: tuple[str, ...], where: str) -> Example:
    """The example of one row read from `keys` (see `_read_keys`); every other column is an extra.

    A prompt is a string or a list of messages (a conversation, rendered later); a response is a
    string or TRL's completion, a list of one assistant message.
    """
    extras = {k: _checked_json(v, k, where) for k, v in row.items() if k not in keys}
    if keys == (MESSAGES_KEY,):
        messages = _checked_messages(row[MESSAGES_KEY], MESSAGES_KEY, where)
        response = _assistant_text(messages, MESSAGES_KEY, where)
        if len(messages) < 2:
            raise ValueError(f"{where}: key {MESSAGES_KEY!r} holds only the response; a prompt message must "
                             "come before it")
        return Example("", response, messages=messages[:-1], extras=extras)
    prompt_key, response_key = keys
    prompt, response = row[prompt_key], row[response_key]
    if isinstance(response, list):
        completion = _checked_messages(response, response_key, where)
        if len(completion) != 1:
            raise ValueError(f"{where}: key {response_key!r} must hold one assistant message, got {len(completion)}")
        response = _assistant_text(completion, response_key, where)
    response = _checked_text(response, response_key, where)
    if isinstance(prompt, list):
        return Example("", response, messages=_checked_messages(prompt, prompt_key, where), extras=extras)
    return Example(_checked_text(prompt, prompt_key, where), response, extras=extras)


def _load_jsonl(path: Path, prompt_key: str, response_key: str) -> list[Example]:
    """Parse one JSON object per non-blank line."""
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            examples.append(_example(row, _read_keys(row, prompt_key, response_key, where, "key"), where))
    return examples


def _load_parquet(path: Path, prompt_key: str, response_key: str) -> list[Example]:
    """Read a parquet file row by row; rows are numbered from 1 in error messages."""
    import pyarrow.parquet as pq  # deferred: pyarrow is heavy and only parquet inputs need it

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for unreadable files
        raise ValueError(f"{path}: not a readable parquet file: {e}") from None
    keys = _read_keys(table.column_names, prompt_key, response_key, str(path), "column")
    return [_example(row, keys, f"{path}: row {i}") for i, row in enumerate(table.to_pylist(), start=1)]


def load_examples(path: str | Path, prompt_key: str = "prompt", response_key: str = "response") -> list[Example]:
    """Load (prompt, response) examples from a `.jsonl` or `.parquet` file.

    Rows are read as TRL writes them: the prompt and response are strings, or a list of messages
    for the prompt and a list of one assistant message for the response (conversational
    prompt-completion); a row without the prompt key but with `messages` is a whole conversation
    whose last, assistant message is the response. Every other column is kept in `extras`.

    Args:
        path: The file. JSONL: one object per line, blank lines skipped. Parquet: one row per example.
        prompt_key: Field (JSONL) or column (parquet) holding the prompt.
        response_key: Field or column holding the response.

    Returns:
        The examples in file order.

    Raises:
        ValueError: The file is missing, has an unsupported extension, holds no examples, or a
            row is malformed (the message names the file, the line or row number and the key).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"{path}: unsupported extension {path.suffix!r}; expected one of {SUPPORTED_SUFFIXES}")
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    loader = _load_jsonl if suffix == ".jsonl" else _load_parquet
    examples = loader(path, prompt_key, response_key)
    if not examples:
        raise ValueError(f"{path}: file holds no examples")
    return examples
