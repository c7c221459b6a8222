"""Errors a job run ends with that callers (the CLI, the job driver, Ray Tune) tell apart."""

from __future__ import annotations


class Diverged(RuntimeError):
    """The divergence guard ended the job (a non-finite loss, or `divergence.stop_on_divergence`)."""

    def __init__(self, step: int, message: str):
        super().__init__(f"diverged at step {step}: {message}")
        self.step, self.message = step, message


DIVERGED_EXIT = 3  # exit status of a diverged job (the CLI and the job driver); Ray then says FAILED
