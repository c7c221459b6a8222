"""Verifiers of the built-in tasks (reward.kind 'task'); `drpt_ray.tasks.TASKS` pairs each with its task.

The general and target splits are scored differently on purpose. For `scarce_target` the general
reward is a lenient proxy (right letters in either layout, partial credit per field) while the
target reward is strict (exactly the target format): the imperfectly aligned general signal and
the scarce high-fidelity target signal of the paper. Eval prompts are scored as "target".

| task          | general split                                  | target split                           |
|---------------|------------------------------------------------|----------------------------------------|
| scarce_target | 0.5 per right field, "a,b" or "a;b." layout    | 1.0 iff exactly `solve(prompt)`        |
| arithmetic    | math-verify against the reference              | math-verify against the reference      |
| gsm8k         | math-verify: answer after the last '####' vs N | the same (N: the reference's '#### N') |
| reasoning_gym | reasoning-gym's `score_answer`, by the verifier each example names (lenient or strict; drpt_ray/data/reasoning_gym.py) | strict |
"""  # noqa: E501 (Markdown table rows cannot be wrapped)

from __future__ import annotations

import re

from drpt_ray.data import reasoning_gym
from drpt_ray.data.gsm8k import final_answer
from drpt_ray.data.synthetic import solve
from drpt_ray.rewards.verifiable import Split, math_score, required_reference

# The two layouts the lenient scarce_target reward accepts: the target "a,b" and the general
# pool's conflicting "a;b.".
_LAYOUTS = (re.compile(r"([a-z]),([a-z])"), re.compile(r"([a-z]);([a-z])\."))


def _fields(text: str) -> tuple[str, str] | None:
    """The two letters of a scarce_target answer in either layout, or None if it is in neither."""
    for layout in _LAYOUTS:
        m = layout.fullmatch(text.strip())
        if m is not None:
            return m.group(1), m.group(2)
    return None


def scarce_target_verifier(prompt: str, response: str, reference: str | None, split: Split) -> float:
    """Score a scarce_target response: lenient on the general split, strict on the target split.

    The reference is not read: the answer follows from the prompt (`drpt_ray.data.synthetic.solve`).

    Args:
        prompt: A task prompt, "map:x,y->".
        response: The generated answer.
        reference: Unused.
        split: "general": 0.5 per correct field when the response is in the target layout "a,b"
            or the conflicting layout "a;b.", 0.0 in any other layout; "target": 1.0 iff the
            stripped response is exactly the target-format answer, else 0.0.

    Returns:
        The reward: 0.0, 0.5 or 1.0.

    Raises:
        ValueError: `prompt` is not a scarce_target prompt.
    """
    answer = solve(prompt)
    if split == "target":
        return float(response.strip() == answer)
    got = _fields(response)
    if got is None:
        return 0.0
    return 0.5 * sum(g == w for g, w in zip(got, _fields(answer)))


def arithmetic_verifier(prompt: str, response: str, reference: str | None, split: Split) -> float:
    """Score an arithmetic response with math-verify against the reference answer, on both splits.

    Raises:
        ValueError: `reference` is None.
    """
    return math_score(response, required_reference(reference, "task"))


def gsm8k_verifier(prompt: str, response: str, reference: str | None, split: Split) -> float:
    """Score a gsm8k response: its final answer against the reference solution's, on both splits.

    Args:
        prompt: Unused.
        response: The generated solution; its answer is the text after its last '####', or the
            whole response if it has none.
        reference: The worked solution of the pool (ends in '#### N').
        split: Unused.

    Returns:
        1.0 iff math-verify finds the answer equal to N, else 0.0.

    Raises:
        ValueError: `reference` is None.
    """
    return math_score(final_answer(response), final_answer(required_reference(reference, "task")))


def reasoning_gym_verifier(prompt: str, response: str, reference: str | None, split: Split) -> float:
    """Score a reasoning_gym response with its dataset's own `score_answer`, strictly or leniently as
    the example's reference says (target and eval examples say strict; `data.reasoning_gym.general_verifier`
    decides the general pool's).

    Raises:
        ValueError: `reference` is None or not a reasoning_gym example's.
    """
    return reasoning_gym.score(response, required_reference(reference, "task"))
