"""User reward functions (reward.kind 'function'), run in a child process under a per-call timeout.

`reward.function` names `package.module:function` (or `reward.functions` several, each with a
weight); it is called as `fn(prompt, response, reference, **columns) -> float`, where `columns`
are the row's other columns (`Example.extras`) that its signature takes by keyword: all with a
`**kwargs`, else those naming one of its parameters, so `fn(prompt, response, reference)` gets none
(as TRL passes dataset columns to reward functions). The split is not passed: one function scores
both. With several functions a response's reward is the weighted sum of their scores.

Each call runs in one persistent child process, so a hung function is killed rather than hanging
the job. A call that raises, runs past `reward.timeout_s`, kills its process, or returns anything
but a finite real number (int, float, bool, numpy scalar) scores 0.0 and counts as an error (a
response counts once, however many of its functions failed).

The child is started with "spawn" (forking a process that holds Ray and torch threads can
deadlock) and reads the parent's `sys.path`, so a module importable here is importable there.
Starting it imports drpt_ray and the user's module, which takes seconds; that is bounded by
`STARTUP_TIMEOUT_S`, not by `timeout_s`, and it is paid again after every timeout. The child is
daemonic (it dies with the parent), so the user function may not start processes with
`multiprocessing` itself; `subprocess` works.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import multiprocessing as mp
import numbers
import traceback
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Callable

from drpt_ray.config import RewardFunctionSpec
from drpt_ray.rewards.verifiable import Reward, RewardResult, Split, check_batch

logger = logging.getLogger(__name__)

UserRewardFn = Callable[..., float]  # (prompt, response, reference, **columns) -> float

# Importing torch, Ray and the user's module on a loaded 2-core machine can take tens of seconds.
STARTUP_TIMEOUT_S = 120.0


def resolve_function(path: str, field: str = "reward.function") -> UserRewardFn:
    """Import the callable that `path` names.

    Args:
        path: "package.module:function".
        field: The spec field that names it, for the error messages.

    Returns:
        The callable.

    Raises:
        ValueError: Naming `field` and what failed: the path's shape, the module's import (not
            found or raising), a missing attribute, or an attribute that is not callable.
    """
    module_name, sep, attr = path.partition(":")
    if not (sep and module_name and attr):
        raise ValueError(f"{field} {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(
            f"{field} {path!r}: module {module_name!r} not found ({e}); install its package or add "
            "its directory to PYTHONPATH"
        ) from None
    except Exception as e:  # user code runs on import and may raise anything
        raise ValueError(f"{field} {path!r}: importing module {module_name!r} failed: {e!r}") from None
    if not hasattr(module, attr):
        raise ValueError(f"{field} {path!r}: module {module_name!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"{field} {path!r}: {attr!r} is a {type(fn).__name__}, not callable")
    return fn


def taken_columns(fn: Callable) -> Callable[[str], bool]:
    """Which of a row's extra columns `fn` is passed as keyword arguments: those naming a parameter it
    takes by keyword (any name, when it has `**kwargs`), except the parameters that the prompt,
    response and reference fill by position (a column named like one would be passed twice)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): call it with the three only
        return lambda name: False
    by_position = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    positional = set(by_position[:3])
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    any_name = any(p.kind is p.VAR_KEYWORD for p in params)
    return lambda name: name not in positional and (any_name or name in named)


def _as_reward(value: object) -> float:
    """`value` as a float reward.

    Raises:
        TypeError: `value` is not a real number.
        ValueError: `value` is NaN or infinite.
    """
    if not isinstance(value, numbers.Real):
        raise TypeError(f"returned a {type(value).__name__}, expected a float")
    reward = float(value)
    if not math.isfinite(reward):
        raise ValueError(f"returned {reward}, expected a finite float")
    return reward


def _serve(conn: Connection, paths: dict[str, str]) -> None:
    """Child process: resolve the functions (field -> path), report ready, then answer calls until
    the parent hangs up. A call is `(k, prompt, response, reference, extras)`: the k-th function on
    one response.

    Messages to the parent are `(status, payload)`: ("ready", None) or ("failed", message) once,
    then per call ("ok", reward) or ("error", message).
    """
    try:
        fns = [resolve_function(path, field) for field, path in paths.items()]
    except ValueError as e:
        conn.send(("failed", str(e)))
        return
    takes = [taken_columns(fn) for fn in fns]
    conn.send(("ready", None))
    while True:
        try:
            k, prompt, response, reference, extras = conn.recv()
        except EOFError:  # the parent closed its end or exited
            return
        columns = {name: value for name, value in extras.items() if takes[k](name)}
        try:
            conn.send(("ok", _as_reward(fns[k](prompt, response, reference, **columns))))
        except Exception:  # any failure of user code is a 0 reward, reported to the parent with its traceback
            conn.send(("error", traceback.format_exc()))


def last_line(failure: str) -> str:
    """A failure's one-line form for a log line: the last line of a traceback is the exception."""
    lines = failure.strip().splitlines()
    return lines[-1] if lines else failure


class FunctionReward(Reward):
    """User reward functions called in one persistent child process, restarted after a timeout or
    crash; the reward is their weighted sum."""

    def __init__(self, functions: dict[str, RewardFunctionSpec], timeout_s: float) -> None:
        """Args:
        functions: The functions by the spec field that names each (`RewardSpec.user_functions`,
            its locations dotted), at least one.
        timeout_s: Seconds one call may take before the child is killed and the call scores 0.0.
        """
        self.functions = functions
        self.timeout_s = timeout_s
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None

    def __call__(
        self, prompts: list[str], responses: list[str], references: list[str | None], split: Split,
        extras: list[dict] | None = None,
    ) -> RewardResult:
        """Call each user function once per example; see `Reward.__call__`. `parts` holds each
        function's scores by its name (`RewardFunctionSpec.label`).

        Raises:
            ValueError: Bad batch arguments (see `check_batch`).
            RuntimeError: The child process cannot start or cannot resolve a function.
        """
        check_batch(prompts, responses, references, split, extras)
        parts: dict[str, list[float]] = {f.label: [] for f in self.functions.values()}
        failures, short = [], []  # per failed response: every failure in full (tracebacks), and in one line
        for i, (prompt, response, reference) in enumerate(zip(prompts, responses, references)):
            failed = []
            for k, (field, f) in enumerate(self.functions.items()):
                score, failure = self._call_one(k, prompt, response, reference, extras[i] if extras else {})
                parts[f.label].append(score)
                if failure is not None:
                    failed.append((field, failure))
            if failed:  # one error per response, so the share of failed responses still means a broken reward
                failures.append("\n".join(f"{field}: {why}" for field, why in failed))
                short.append("; ".join(f"{field}: {last_line(why)}" for field, why in failed))
        if failures:
            logger.warning("the reward failed on %d of %d responses (a failed function scores 0.0); first: %s",
                           len(failures), len(responses), short[0])
        weights = [f.weight for f in self.functions.values()]
        scores = [math.fsum(w * x for w, x in zip(weights, row)) for row in zip(*parts.values())]
        return RewardResult(scores=scores, errors=len(failures), first_error=failures[0] if failures else None,
                            parts=parts)

    def close(self) -> None:
        """Stop the child process, if one is running."""
        if self._process is not None:
            self._process.kill()
            self._process.join()
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    def _call_one(self, k: int, prompt: str, response: str, reference: str | None,
                  extras: dict) -> tuple[float, str | None]:
        """One call of the k-th function: `(reward, None)` on success, `(0.0, why)` on failure (the
        child is stopped when it hung or died, so the next call starts a fresh one)."""
        conn = self._connection()
        try:
            conn.send((k, prompt, response, reference, extras))
            if not conn.poll(self.timeout_s):
                self.close()
                return 0.0, f"timed out after {self.timeout_s} s"
            status, payload = conn.recv()
        except (EOFError, OSError):  # the child died (e.g. os._exit or a crash in native code)
            self.close()
            return 0.0, "the reward process died"
        return (payload, None) if status == "ok" else (0.0, payload)

    def _connection(self) -> Connection:
        """The connection to a ready child, starting one if none is running.

        Raises:
            RuntimeError: The child does not become ready within `STARTUP_TIMEOUT_S` or cannot
                resolve a function.
        """
        if self._process is not None and self._process.is_alive():
            return self._conn
        self.close()
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        paths = {field: f.function for field, f in self.functions.items()}
        self._process = ctx.Process(target=_serve, args=(child_conn, paths), name="reward-function", daemon=True)
        self._process.start()
        child_conn.close()  # keep only the child's copy, so its death reads as EOF here
        try:
            ready = self._conn.poll(STARTUP_TIMEOUT_S)
            status, payload = self._conn.recv() if ready else ("failed", f"not ready after {STARTUP_TIMEOUT_S} s")
        except EOFError:
            status, payload = "failed", "the reward process exited while starting"
        if status != "ready":
            self.close()
            raise RuntimeError(f"reward functions {list(paths.values())}: cannot start the reward process: {payload}")
        return self._conn
