"""SFT examples: the record type, the general/target/eval splits of a task, and file loaders.

The bottom of the data package: `synthetic` builds its pools from these types and
`tasks.load_task` picks a synthetic task or files, so this module imports neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class Example:
    """One supervised example: the model is conditioned on `prompt` and trained to emit `response`.

    The text is concatenated as-is (no separator is inserted), so any space between the two
    belongs at the start of `response`. `reference` is what a verifier scores a generated reply
    against when that is not the response itself (a reasoning-gym entry, as JSON).
    """

    prompt: str
    response: str
    reference: str | None = None

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


def _checked_text(value: object, key: str, where: str) -> str:
    """Return `value` if it is a string, else raise a ValueError that names `where` and `key`."""
    if value is None:
        raise ValueError(f"{where}: missing key {key!r}")
    if not isinstance(value, str):
        raise ValueError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    return value


def _check_keys(present, prompt_key: str, response_key: str, where: str, what: str) -> None:
    """Both keys present, else an error naming the missing one, what there is, and the setting to change."""
    for key, field in ((prompt_key, "data.prompt_key"), (response_key, "data.response_key")):
        if key not in present:
            raise ValueError(f"{where}: missing {what} {key!r} (there are {sorted(present)}; {field} names the "
                             f"{what} to read instead, e.g. response_key: completion for TRL-style data)")


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
            _check_keys(row, prompt_key, response_key, where, "key")
            examples.append(
                Example(
                    prompt=_checked_text(row.get(prompt_key), prompt_key, where),
                    response=_checked_text(row.get(response_key), response_key, where),
                )
            )
    return examples


def _load_parquet(path: Path, prompt_key: str, response_key: str) -> list[Example]:
    """Read the two columns of a parquet file; rows are numbered from 1 in error messages."""
    import pyarrow.parquet as pq  # deferred: pyarrow is heavy and only parquet inputs need it

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for unreadable files
        raise ValueError(f"{path}: not a readable parquet file: {e}") from None
    _check_keys(table.column_names, prompt_key, response_key, str(path), "column")
    prompts = table.column(prompt_key).to_pylist()
    responses = table.column(response_key).to_pylist()
    return [
        Example(
            prompt=_checked_text(p, prompt_key, f"{path}: row {i}"),
            response=_checked_text(r, response_key, f"{path}: row {i}"),
        )
        for i, (p, r) in enumerate(zip(prompts, responses), start=1)
    ]


def load_examples(path: str | Path, prompt_key: str = "prompt", response_key: str = "response") -> list[Example]:
    """Load (prompt, response) examples from a `.jsonl` or `.parquet` file.

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
