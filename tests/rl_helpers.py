"""Shared by the end-to-end RL tests: the demo's spec in a test directory, a crashing rollout worker."""

from __future__ import annotations

import os
import signal

import psutil

from drpt_ray.config import JobSpec
from drpt_ray.demo import RLVR_DEMO


def rlvr(tmp_path, **over) -> JobSpec:
    """The README demo's spec writing to `tmp_path`, quiet, with `over` replacing top-level keys."""
    cfg = {**RLVR_DEMO, "output_dir": str(tmp_path), "progress": False, "tensorboard": False, **over}
    return JobSpec.model_validate(cfg)


def kill_rollout_worker() -> int:
    """SIGKILL the process hosting the RolloutEngine actor (a crash, not a polite shutdown)."""
    for p in psutil.process_iter(["cmdline"]):
        if any("RolloutEngine" in c for c in (p.info["cmdline"] or [])):
            os.kill(p.pid, signal.SIGKILL)
            return p.pid
    raise AssertionError("no RolloutEngine process found")
