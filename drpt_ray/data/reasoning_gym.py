"""data.task 'reasoning_gym': pools from the procedural tasks of the `reasoning-gym` package, scored
by its own verifiers.

Every example carries what its verifier needs (`Example.reference`, JSON): the dataset's name and
config, the reasoning-gym entry, and which verifier judges a reply to it. The scoring itself is
always the dataset's own `score_answer(answer, entry)`; this module only decides *which text* of a
reply is the answer:

| verifier | the answer                                                        | reward                          |
|----------|-------------------------------------------------------------------|---------------------------------|
| strict   | the demanded format: the last `<answer>...</answer>` (answer_tag), | 1.0 iff `score_answer` is 1.0,  |
|          | or the last non-empty line (last_line); no tag: no answer          | else 0.0 (pass@k needs 0/1)     |
| lenient  | the best of: the strict answer, the last line, the last number,   | the highest `score_answer`      |
|          | the whole reply (the right answer anywhere counts)                 | (its partial credit kept)       |

Target and eval examples are judged strictly; general ones by `general_verifier`: the scarce-target
structure of the paper with a format the general signal does not demand (the 'format' setting),
or other tasks altogether (the 'task mix' setting). SFT responses (SFT jobs, warm starts) are in the
demanded format for strict pools; lenient general examples use it with probability
`general_format_frac` and otherwise answer in a plain sentence: general data of mixed provenance,
from which a warm start makes the strict format reachable without touching the scarce target.

Target, general and eval pools come from disjoint generator seeds, and a question never appears in
two pools (eval drops the target's questions, general drops both): a held-out prompt is never
trained on. reasoning-gym is imported only when this task is used (the `real` extra installs it).
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import fields
from typing import Any

from drpt_ray.data.examples import Example, TaskSplits

# What the strict verifier demands, how it is asked for, and how a warm-start SFT response shows it.
INSTRUCTIONS = {
    "answer_tag": "Give only the final answer, inside <answer></answer> tags, like <answer>42</answer>.",
    "last_line": "Put only the final answer on the last line.",
}
_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# Oversampling of each generator before duplicates and other pools' questions are dropped.
_DRAW_FACTOR, _DRAW_EXTRA = 3, 64


def _rg():
    try:
        import reasoning_gym
    except ImportError:  # pragma: no cover - the `real` extra installs it
        raise ValueError("data.task 'reasoning_gym' needs the reasoning-gym package: "
                         "pip install 'drpt-ray[real]'") from None
    return reasoning_gym


def dataset_names() -> list[str]:
    """The procedural datasets reasoning-gym registers, sorted."""
    from reasoning_gym.factory import DATASETS

    _rg()
    return sorted(DATASETS)


def check_dataset(name: str, config: dict[str, Any]) -> None:
    """Refuse an unknown dataset or config key (naming the valid ones) or a config its generator rejects.

    Raises:
        ValueError: the message names `name` or the key and lists the valid choices.
    """
    _rg()
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise ValueError(f"unknown reasoning-gym dataset {name!r}; valid: {dataset_names()}")
    keys = sorted(f.name for f in fields(DATASETS[name][1]) if f.name not in ("seed", "size"))
    bad = sorted(set(config) - set(keys))
    if bad:
        raise ValueError(f"reasoning-gym dataset {name!r} has no config key {bad[0]!r}; valid: {keys}")
    try:
        _dataset(name, json.dumps(config, sort_keys=True))
    except Exception as e:  # the generator's own checks (assertions, type errors) on the values
        raise ValueError(f"reasoning-gym dataset {name!r} refuses config {config}: {e or type(e).__name__}") from None


@functools.lru_cache(maxsize=64)
def _dataset(name: str, config_json: str):
    """A dataset object to call `score_answer` on (its config may matter to scoring); cached per config."""
    return _rg().create_dataset(name, size=1, seed=0, **json.loads(config_json))


def strict_answer(reply: str, answer_format: str) -> str | None:
    """The answer in the demanded format, or None when the reply does not use it."""
    if answer_format == "answer_tag":
        found = _TAG.findall(reply)
        return found[-1].strip() if found else None
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    return lines[-1] if lines else None


def lenient_candidates(reply: str, answer_format: str) -> list[str]:
    """Every text the lenient verifier tries as the answer: strict answer, last line, last number, whole reply."""
    out = [strict_answer(reply, answer_format), strict_answer(reply, "last_line")]
    numbers = _NUMBER.findall(reply)
    out += [numbers[-1] if numbers else None, reply.strip()]
    return [c for c in out if c]


def score(reply: str, reference: str) -> float:
    """Score a reply against an example's reference (its JSON), with the verifier the reference names.

    Raises:
        ValueError: the reference is not a reasoning_gym example's.
    """
    try:
        ref = json.loads(reference)
        ds = _dataset(ref["dataset"], json.dumps(ref["config"], sort_keys=True))
        entry, verifier, fmt = ref["entry"], ref["verifier"], ref["answer_format"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("data.task 'reasoning_gym' scores against the reference its own pools carry; got a "
                         f"reference that is not one: {reference[:80]!r}") from None
    if verifier == "strict":
        answer = strict_answer(reply, fmt)
        return float(answer is not None and ds.score_answer(answer, entry) == 1.0)
    return max((float(ds.score_answer(c, entry)) for c in lenient_candidates(reply, fmt)), default=0.0)


def sft_response(answer: str, answer_format: str, demanded: bool) -> str:
    """The response an SFT step trains on: the demanded format, or a plain sentence (right, but not in
    the target's format: the general data's misalignment)."""
    if not demanded:
        return f"The answer is {answer}."
    return f"<answer>{answer}</answer>" if answer_format == "answer_tag" else answer


def _pool(datasets: list, n: int, seed: int, verifier: str, spec, exclude: set[str]) -> list[Example]:
    """`n` examples drawn round-robin from `datasets` with generator seed `seed`, skipping repeated and
    excluded questions."""
    rg = _rg()
    instruction = spec.instruction if spec.instruction is not None else INSTRUCTIONS[spec.answer_format]
    per = -(-n // len(datasets))
    # Indexed, not iterated: a reasoning-gym dataset's __iter__ restarts at entry 0.
    streams = [(d, rg.create_dataset(d.name, size=per * _DRAW_FACTOR + _DRAW_EXTRA, seed=seed * 1009 + i,
                                     **d.config), [0])
               for i, d in enumerate(datasets)]
    out, seen = [], set(exclude)
    formats = random.Random(seed)  # which lenient examples' responses use the demanded format
    while len(out) < n and streams:
        for stream in list(streams):
            d, ds, pos = stream
            while pos[0] < len(ds) and ds[pos[0]]["question"] in seen:
                pos[0] += 1
            if pos[0] == len(ds):
                streams.remove(stream)
                continue
            entry = ds[pos[0]]
            pos[0] += 1
            seen.add(entry["question"])
            ref = {"dataset": d.name, "config": d.config, "entry": entry, "verifier": verifier,
                   "answer_format": spec.answer_format}
            out.append(Example(prompt=f"{entry['question']}\n{instruction}",
                               response=sft_response(str(entry["answer"]), spec.answer_format, verifier == "strict"
                                                     or formats.random() < spec.general_format_frac),
                               reference=json.dumps(ref, sort_keys=True, default=str)))
            if len(out) == n:
                break
    if len(out) < n:
        names = [d.name for d in datasets]
        raise ValueError(f"reasoning-gym datasets {names} hold only {len(out)} distinct questions for this pool "
                         f"(wanted {n}, after dropping other pools' questions); lower data.n_target / n_eval / "
                         "n_general or raise the datasets' difficulty")
    return out


def question(example: Example) -> str:
    """The reasoning-gym question an example was made from."""
    return json.loads(example.reference)["entry"]["question"]


def load(data) -> TaskSplits:
    """The three pools of a `DataSpec` with task 'reasoning_gym' (generator seeds 3s, 3s+1, 3s+2).

    Raises:
        ValueError: a generator holds too few distinct questions for a pool (names the sizes).
    """
    from drpt_ray.config import ReasoningGymSpec

    spec = data.reasoning_gym or ReasoningGymSpec()
    s = data.seed
    target = _pool(spec.target, data.n_target, 3 * s, "strict", spec, set())
    eval_ = _pool(spec.target, data.n_eval, 3 * s + 2, "strict", spec, {question(e) for e in target})
    general = _pool(spec.general or spec.target, data.n_general, 3 * s + 1, spec.general_verifier, spec,
                    {question(e) for e in target + eval_})
    return TaskSplits(general=general, target=target, eval=eval_)
