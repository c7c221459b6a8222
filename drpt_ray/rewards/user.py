"""User reward functions (reward.kind 'function'), run in a child process under a per-call timeout.

`reward.function` names `package.module:function`; it is called as
`fn(prompt, response, reference) -> float` (the split is not passed: one function scores both).
Each call runs in one persistent child process, so a hung function is killed rather than hanging
the job. A call that raises, runs past `reward.timeout_s`, kills its process, or returns anything
but a finite real number (int, float, bool, numpy scalar) scores 0.0 and counts as an error.

The child is started with "spawn" (forking a process that holds Ray and torch threads can
deadlock) and reads the parent's `sys.path`, so a module importable here is importable there.
Starting it imports drpt_ray and the user's module, which takes seconds; that is bounded by
`STARTUP_TIMEOUT_S`, not by `timeout_s`, and it is paid again after every timeout. The child is
daemonic (it dies with the parent), so the user function may not start processes with
`multiprocessing` itself; `subprocess` works.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing as mp
import numbers
import traceback
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Callable

from drpt_ray.rewards.verifiable import Reward, RewardResult, Split, check_batch

logger = logging.getLogger(__name__)

UserRewardFn = Callable[[str, str, str | None], float]

# Importing torch, Ray and the user's module on a loaded 2-core machine can take tens of seconds.
STARTUP_TIMEOUT_S = 120.0


def resolve_function(path: str) -> UserRewardFn:
    """Import the callable that `path` names.

    Args:
        path: "package.module:function".

    Returns:
        The callable.

    Raises:
        ValueError: Naming `reward.function` and what failed: the path's shape, the module's
            import (not found or raising), a missing attribute, or an attribute that is not callable.
    """
    module_name, sep, attr = path.partition(":")
    if not (sep and module_name and attr):
        raise ValueError(f"reward.function {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(
            f"reward.function {path!r}: module {module_name!r} not found ({e}); install its package or add "
            "its directory to PYTHONPATH"
        ) from None
    except Exception as e:  # user code runs on import and may raise anything
        raise ValueError(f"reward.function {path!r}: importing module {module_name!r} failed: {e!r}") from None
    if not hasattr(module, attr):
        raise ValueError(f"reward.function {path!r}: module {module_name!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"reward.function {path!r}: {attr!r} is a {type(fn).__name__}, not callable")
    return fn


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


def _serve(conn: Connection, path: str) -> None:
    """Child process: resolve the function, report ready, then answer calls until the parent hangs up.

    Messages to the parent are `(status, payload)`: ("ready", None) or ("failed", message) once,
    then per call ("ok", reward) or ("error", message).
    """
    try:
        fn = resolve_function(path)
    except ValueError as e:
        conn.send(("failed", str(e)))
        return
    conn.send(("ready", None))
    while True:
        try:
            prompt, response, reference = conn.recv()
        except EOFError:  # the parent closed its end or exited
            return
        try:
            conn.send(("ok", _as_reward(fn(prompt, response, reference))))
        except Exception:  # any failure of user code is a 0 reward, reported to the parent with its traceback
            conn.send(("error", traceback.format_exc()))


def last_line(failure: str) -> str:
    """A failure's one-line form for a log line: the last line of a traceback is the exception."""
    lines = failure.strip().splitlines()
    return lines[-1] if lines else failure


class FunctionReward(Reward):
    """A user reward function called in one persistent child process, restarted after a timeout or crash."""

    def __init__(self, path: str, timeout_s: float) -> None:
        """Args:
        path: "package.module:function" (see `resolve_function`).
        timeout_s: Seconds one call may take before the child is killed and the call scores 0.0.
        """
        self.path = path
        self.timeout_s = timeout_s
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None

    def __call__(
        self, prompts: list[str], responses: list[str], references: list[str | None], split: Split
    ) -> RewardResult:
        """Call the user function once per example; see `Reward.__call__`.

        Raises:
            ValueError: Bad batch arguments (see `check_batch`).
            RuntimeError: The child process cannot start or cannot resolve the function.
        """
        check_batch(prompts, responses, references, split)
        scores, failures = [], []
        for prompt, response, reference in zip(prompts, responses, references):
            score, failure = self._call_one(prompt, response, reference)
            scores.append(score)
            if failure is not None:
                failures.append(failure)
        if failures:
            logger.warning(
                "reward.function %r failed on %d of %d responses (scored 0.0); first: %s",
                self.path, len(failures), len(responses), last_line(failures[0]),
            )
        return RewardResult(scores=scores, errors=len(failures), first_error=failures[0] if failures else None)

    def close(self) -> None:
        """Stop the child process, if one is running."""
        if self._process is not None:
            self._process.kill()
            self._process.join()
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    def _call_one(self, prompt: str, response: str, reference: str | None) -> tuple[float, str | None]:
        """One call: `(reward, None)` on success, `(0.0, why)` on failure (the child is stopped
        when it hung or died, so the next call starts a fresh one)."""
        conn = self._connection()
        try:
            conn.send((prompt, response, reference))
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
                resolve the function.
        """
        if self._process is not None and self._process.is_alive():
            return self._conn
        self.close()
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child_conn, self.path), name="reward-function", daemon=True)
        self._process.start()
        child_conn.close()  # keep only the child's copy, so its death reads as EOF here
        try:
            ready = self._conn.poll(STARTUP_TIMEOUT_S)
            status, payload = self._conn.recv() if ready else ("failed", f"not ready after {STARTUP_TIMEOUT_S} s")
        except EOFError:
            status, payload = "failed", "the reward process exited while starting"
        if status != "ready":
            self.close()
            raise RuntimeError(f"reward.function {self.path!r}: cannot start the reward process: {payload}")
        return self._conn
