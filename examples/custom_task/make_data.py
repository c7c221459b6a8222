"""Writes the example's data: a task of your own, as JSONL files with `prompt` and `response` keys.

The task: reverse three letters. The target format is the reversed letters and a full stop
("rev abc = cba."). The scarce target pool has 40 examples and the held-out pool 30 (disjoint
words); the plentiful general pool has 400, half of them answered in another, conflicting format
("c-b-a"): related data that a plain fine-tune would also learn the wrong format from.

    .venv/bin/python examples/custom_task/make_data.py
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def example(word: str, conflicting: bool = False) -> dict:
    answer = "-".join(reversed(word)) if conflicting else "".join(reversed(word)) + "."
    return {"prompt": f"rev {word} =", "response": f" {answer}"}


def main() -> None:
    rng = random.Random(0)
    words = ["".join(w) for w in itertools.product("abcdefgh", repeat=3)]
    rng.shuffle(words)
    target, held_out, general = words[:40], words[40:70], words[70:470]
    pools = {"target": [example(w) for w in target], "eval": [example(w) for w in held_out],
             "general": [example(w, conflicting=i % 2 == 1) for i, w in enumerate(general)]}
    for name, rows in pools.items():
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{HERE / f'{name}.jsonl'}: {len(rows)} examples")


if __name__ == "__main__":
    main()
