"""The reward interface and the reference-based verifiers: exact match and math-verify.

Every reward kind is a `Reward`: called on a batch of (prompt, response, reference) triples, a
split name and optionally each row's extra columns, it returns one score per response plus a count
of scoring errors. Built-in verifiers
are pure per-example functions wrapped by `VerifierReward`; they never fail on a bad response
(an unparseable answer scores 0.0), so their `errors` is always 0.

math-verify bounds each parse and comparison with `signal.alarm`, which only works in the main
thread (elsewhere it raises ValueError). `math_score` therefore passes `parsing_timeout=None` /
`timeout_seconds=None` when it runs outside the main thread: a thread pool, or a Ray actor with
`max_concurrency > 1` or async methods. Those calls have no time bound, and a pathological answer
such as "9^9^9^9" can hang sympy there. A default Ray actor runs its methods in the main thread,
as the driver does, so there the bound (`MATH_TIMEOUT_S` per operation) is on.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Literal, get_args

from math_verify import parse, verify

Split = Literal["general", "target"]
SPLITS: tuple[str, ...] = get_args(Split)

# Legitimate comparisons take milliseconds; the bound only stops a pathological answer, and it
# is paid per comparison, so a short one keeps a bad batch from stalling a step.
MATH_TIMEOUT_S = 3

ScoreFn = Callable[[str, str, str | None, Split], float]


@dataclass(frozen=True)
class RewardResult:
    """Scores of one batch.

    Attributes:
        scores: One reward per response, in input order; a failed scoring counts as 0.0.
        errors: How many scorings failed (user-function exceptions, timeouts, bad return values).
        first_error: What the first failure said (not part of equality).
        parts: The unweighted scores of each user function (`reward.function(s)`), by its name,
            in input order; `scores` is their weighted sum. Empty for the other kinds. Not part of
            equality: a result is its scores.
    """

    scores: list[float]
    errors: int
    first_error: str | None = field(default=None, compare=False)
    parts: dict[str, list[float]] = field(default_factory=dict, compare=False)


class Reward(ABC):
    """A reward of any kind. Build one with `drpt_ray.rewards.make_reward`, in the process that
    calls it (a `FunctionReward` owns a child process and cannot be pickled)."""

    @abstractmethod
    def __call__(
        self, prompts: list[str], responses: list[str], references: list[str | None], split: Split,
        extras: list[dict] | None = None,
    ) -> RewardResult:
        """Score a batch.

        Args:
            prompts: Prompt texts, one per response (repeated for the n responses of a group).
            responses: Generated response texts.
            references: Reference answers (the pool's response field), None where there is none.
            split: "general" or "target" (eval prompts are scored as "target"); only task
                verifiers distinguish them.
            extras: One dict per response: its row's other columns (`Example.extras`), which user
                functions take as keyword arguments; None: no columns. Other kinds ignore them.

        Returns:
            One score per response and the error count.

        Raises:
            ValueError: The lists differ in length, `split` is unknown, or this kind needs a
                reference that is missing.
        """

    def close(self) -> None:
        """Release what the reward holds (a child process, a Ray actor); the default holds nothing."""


def check_batch(prompts: list[str], responses: list[str], references: list[str | None], split: str,
                extras: list[dict] | None = None) -> None:
    """Validate the arguments of `Reward.__call__`.

    Raises:
        ValueError: The lists differ in length or `split` is not a known split.
    """
    if not len(prompts) == len(responses) == len(references) == len(responses if extras is None else extras):
        raise ValueError(
            f"reward batch: {len(prompts)} prompts, {len(responses)} responses, {len(references)} references"
            + ("" if extras is None else f" and {len(extras)} extras") + "; pass one prompt, one reference (or "
            "None) and, if any, one dict of extras per response"
        )
    if split not in SPLITS:
        raise ValueError(f"reward split must be one of {SPLITS}, got {split!r}")


def required_reference(reference: str | None, kind: str) -> str:
    """Return `reference`, refusing None: `kind` compares the response against it.

    Raises:
        ValueError: `reference` is None.
    """
    if reference is None:
        raise ValueError(
            f"reward.kind {kind!r} compares each response with a reference answer, but a prompt has none; "
            "give every prompt a response in the data, or use reward.kind 'function' or 'model'"
        )
    return reference


def exact_match_score(response: str, reference: str) -> float:
    """1.0 if the response equals the reference after stripping surrounding whitespace, else 0.0."""
    return float(response.strip() == reference.strip())


def math_score(response: str, reference: str) -> float:
    """1.0 if math-verify finds the response's answer equal to the reference's, else 0.0.

    Equal means mathematically equal ("19" and "19.0", "1/2" and "0.5" and "\\frac{1}{2}"). A
    response or reference with no parseable answer scores 0.0. Timeouts: see the module docstring.

    Args:
        response: Generated text; math-verify extracts its final answer (LaTeX or plain expression).
        reference: The gold answer.

    Returns:
        1.0 or 0.0.
    """
    timeout = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = parse(reference, parsing_timeout=timeout)
    answer = parse(response, parsing_timeout=timeout)
    if not gold or not answer:
        return 0.0
    return float(verify(gold, answer, timeout_seconds=timeout))


class VerifierReward(Reward):
    """A reward computed example by example by a pure scoring function that never fails."""

    def __init__(self, score: ScoreFn) -> None:
        """Args: score: `score(prompt, response, reference, split) -> float`."""
        self.score = score

    def __call__(
        self, prompts: list[str], responses: list[str], references: list[str | None], split: Split,
        extras: list[dict] | None = None,
    ) -> RewardResult:
        """Score each example with `self.score` (extras unused); see `Reward.__call__`."""
        check_batch(prompts, responses, references, split, extras)
        scores = [self.score(p, r, ref, split) for p, r, ref in zip(prompts, responses, references)]
        return RewardResult(scores=scores, errors=0)


def exact_match_verifier(prompt: str, response: str, reference: str | None, split: Split) -> float:
    """`exact_match_score` as a `ScoreFn` (prompt and split unused)."""
    return exact_match_score(response, required_reference(reference, "exact_match"))


def math_verifier(prompt: str, response: str, reference: str | None, split: Split) -> float:
    """`math_score` as a `ScoreFn` (prompt and split unused)."""
    return math_score(response, required_reference(reference, "math"))
