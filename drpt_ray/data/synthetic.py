"""Built-in synthetic tasks: scarce_target (letter maps; SFT and RL) and arithmetic (RL; below).

scarce_target: two independent letter maps, one scarce clean pool.

A prompt names two lowercase letters x and y and the answer names two letters, one per field:

    prompt   "map:k,q->"
    response "l,s"           field A = f(x) = x shifted by +1 (z -> a)
                             field B = g(y) = y shifted by +2 (y -> a, z -> b)

Every letter stands between punctuation marks, never after a space. A GPT-2-style byte-level
BPE splits letters from punctuation before merging, so each letter is a one-byte piece and
therefore exactly one token whatever merges the tokenizer learned (" k" with a space would be
one token only where the merge "Ġ"+"k" happens to exist, which the tiny tokenizer of
`drpt_ray.models` lacks for several letters). The same split puts a piece boundary between
the prompt's final "->" and the response's first letter, so tokenizing prompt and response
separately gives the tokens of their concatenation. A response is thus three tokens (A, ",",
B), and `tokenize_sft` appends the eos token that ends it. (Qwen/Llama-3 pre-tokenizers attach
one punctuation mark to a following letter run, so there ",s" may be a single token.)

The two fields are independent functions of one letter each, mirroring the paper's numpy
sanity experiment with two independent heads: each field can be right or wrong on its own.

Pools:

* target: `n_target` fully correct examples on distinct (x, y) pairs. 16 pairs cannot show all
  26 letters in either field, so training on the target pool alone memorizes it and cannot
  generalize to unseen letters (its held-out loss explodes: the overfitting end).
* eval: `n_eval` fully correct examples whose (x, y) pairs are disjoint from the target pool's,
  so the held-out loss measures generalization rather than memorization.
* general: `n_general` examples covering every letter in both fields (x and y are each
  balanced over the alphabet), so it carries the letter maps the target pool lacks. A
  `p_clean` fraction is fully correct. Of the rest, two thirds answer with the right letters in
  a *conflicting format* ("l;s." instead of "l,s": another separator and a trailing period) and
  one third has a *wrong field* (A = x copied, B right). With the default p_clean = 0.3 that is
  30% clean, ~47% conflicting format, ~23% wrong field A.

Why this shape. Full training fits the mixture: about half the time it expects the wrong
separator and a period, a bias the held-out target loss keeps. The format conflict lives on
tokens every example shares, so an example's gradient there is anti-aligned with the target's
whatever its letters: first-order scores can see it, and a curated subset drops those examples
while keeping the letter coverage. The wrong-field examples are the hard case: a letter map
is memorised per letter, so one target example says little about another letter's gradient,
and selection can only catch them weakly (a curated subset even enriches them once the format
conflicts are gone). The regularized methods should therefore beat both full training (bias)
and target-only training (variance); `bench/sft_quality.py` measures whether they do.

General pairs are drawn independently of the target and eval pairs: eval is held out from the
target pool, not from the general pool, which is the broad-coverage source by design.
Everything is a deterministic function of the arguments (`random.Random(seed)`).
"""

from __future__ import annotations

import random
import re
import string

from drpt_ray.data.examples import Example, TaskSplits

LETTERS = string.ascii_lowercase
SHIFT_A = 1  # field A: f(x) = x + 1
SHIFT_B = 2  # field B: g(y) = y + 2
_PROMPT_RE = re.compile(r"map:([a-z]),([a-z])->")


def shift(letter: str, k: int) -> str:
    """Return `letter` moved `k` places along the alphabet, wrapping around (z + 1 = a)."""
    return LETTERS[(LETTERS.index(letter) + k) % len(LETTERS)]


def format_prompt(x: str, y: str) -> str:
    """The prompt that asks for (f(x), g(y))."""
    return f"map:{x},{y}->"


def format_response(a: str, b: str) -> str:
    """The response text for field values `a` and `b` (the target format)."""
    return f"{a},{b}"


def conflicting_response(a: str, b: str) -> str:
    """The same fields in the general pool's conflicting format."""
    return f"{a};{b}."


def solve(prompt: str) -> str:
    """Return the correct response for a task prompt (usable as a verifier's reference answer).

    Args:
        prompt: A prompt made by `format_prompt`.

    Returns:
        `format_response(f(x), g(y))`.

    Raises:
        ValueError: `prompt` is not a task prompt.
    """
    m = _PROMPT_RE.fullmatch(prompt)
    if m is None:
        raise ValueError(f"not a scarce_target prompt: {prompt!r}")
    x, y = m.groups()
    return format_response(shift(x, SHIFT_A), shift(y, SHIFT_B))


def _correct(x: str, y: str) -> Example:
    return Example(format_prompt(x, y), format_response(shift(x, SHIFT_A), shift(y, SHIFT_B)))


def _balanced_letters(n: int, rng: random.Random) -> list[str]:
    """`n` letters in which every letter occurs floor(n/26) or ceil(n/26) times, shuffled."""
    letters = [LETTERS[i % len(LETTERS)] for i in range(n)]
    rng.shuffle(letters)
    return letters


def _general_pool(n: int, p_clean: float, rng: random.Random) -> list[Example]:
    """The general pool: round(p_clean*n) clean rows; of the rest, floor(2/3) conflicting-format
    rows (right letters, "a;b." layout) and the remainder wrong-field-A rows (A = x copied)."""
    n_clean = round(p_clean * n)
    n_format = (2 * (n - n_clean)) // 3
    n_bad_a = n - n_clean - n_format
    kinds = ["clean"] * n_clean + ["format"] * n_format + ["bad_a"] * n_bad_a
    rng.shuffle(kinds)
    xs, ys = _balanced_letters(n, rng), _balanced_letters(n, rng)
    pool = []
    for kind, x, y in zip(kinds, xs, ys):
        a = x if kind == "bad_a" else shift(x, SHIFT_A)
        b = shift(y, SHIFT_B)
        text = conflicting_response(a, b) if kind == "format" else format_response(a, b)
        pool.append(Example(format_prompt(x, y), text))
    return pool


def scarce_target_task(n_general: int, n_target: int, n_eval: int, p_clean: float, seed: int) -> TaskSplits:
    """Generate the scarce-target task described in the module docstring.

    Args:
        n_general: Size of the general pool.
        n_target: Size of the target pool (distinct (x, y) pairs).
        n_eval: Size of the eval pool (distinct pairs, none in the target pool).
        p_clean: Fraction of the general pool that is fully correct.
        seed: Seed of every random choice.

    Returns:
        The general, target and eval pools; the general pool is shuffled.

    Raises:
        ValueError: A size is not positive, `p_clean` is outside [0, 1], or `n_target + n_eval`
            exceeds the 676 distinct (x, y) pairs.
    """
    for name, n in (("n_general", n_general), ("n_target", n_target), ("n_eval", n_eval)):
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    if not 0.0 <= p_clean <= 1.0:
        raise ValueError(f"p_clean must be in [0, 1], got {p_clean}")
    pairs = [(x, y) for x in LETTERS for y in LETTERS]
    if n_target + n_eval > len(pairs):
        raise ValueError(f"n_target + n_eval = {n_target + n_eval} exceeds the {len(pairs)} distinct (x, y) pairs")
    rng = random.Random(seed)
    # One sample without replacement, split in two, makes the target and eval pairs disjoint.
    held = rng.sample(pairs, n_target + n_eval)
    target = [_correct(x, y) for x, y in held[:n_target]]
    eval_ = [_correct(x, y) for x, y in held[n_target:]]
    return TaskSplits(general=_general_pool(n_general, p_clean, rng), target=target, eval=eval_)


# --------------------------------------------------------------------------------------------
# arithmetic: the RLVR task (answers checked with math-verify)
#
# A prompt is a sum or difference of two operands and the response is its value:
#
#     prompt "7+5="    response "12"
#     prompt "42-57="  response "-15"
#
# general: `n_general` problems with operands in 0..99 and + or - drawn uniformly (so about half
#   the differences are negative): broad coverage of both operations.
# target: `n_target` distinct two-digit subtractions a-b with 10 <= b <= a <= 99 (results >= 0):
#   a narrower distribution than the general pool's, of which it is a small corner.
# eval: `n_eval` further distinct target-distribution problems, disjoint from the target pool.
#
# As in scarce_target, general problems are drawn independently of the target and eval ones.

MAX_OPERAND = 99
MIN_TARGET_OPERAND = 10


def _arithmetic_example(a: int, op: str, b: int) -> Example:
    return Example(f"{a}{op}{b}=", str(a + b if op == "+" else a - b))


def arithmetic_task(n_general: int, n_target: int, n_eval: int, seed: int) -> TaskSplits:
    """Generate the arithmetic task described above.

    Args:
        n_general: Size of the general pool (mixed + and -).
        n_target: Size of the target pool (distinct non-negative two-digit subtractions).
        n_eval: Size of the eval pool (distinct target-distribution problems, none in the target pool).
        seed: Seed of every random choice.

    Returns:
        The general, target and eval pools.

    Raises:
        ValueError: A size is not positive, or `n_target + n_eval` exceeds the number of distinct
            target-distribution problems (4095).
    """
    for name, n in (("n_general", n_general), ("n_target", n_target), ("n_eval", n_eval)):
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    problems = [(a, b) for a in range(MIN_TARGET_OPERAND, MAX_OPERAND + 1) for b in range(MIN_TARGET_OPERAND, a + 1)]
    if n_target + n_eval > len(problems):
        raise ValueError(
            f"n_target + n_eval = {n_target + n_eval} exceeds the {len(problems)} distinct target problems"
        )
    rng = random.Random(seed)
    # One sample without replacement, split in two, makes the target and eval problems disjoint.
    held = rng.sample(problems, n_target + n_eval)
    target = [_arithmetic_example(a, "-", b) for a, b in held[:n_target]]
    eval_ = [_arithmetic_example(a, "-", b) for a, b in held[n_target:]]
    general = [
        _arithmetic_example(rng.randint(0, MAX_OPERAND), rng.choice("+-"), rng.randint(0, MAX_OPERAND))
        for _ in range(n_general)
    ]
    return TaskSplits(general=general, target=target, eval=eval_)
