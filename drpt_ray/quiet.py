"""Library log lines that repeat every step and tell a user nothing, silenced in every Ray worker.

`init_ray` names `quiet_workers` as Ray's `worker_process_setup_hook`, so it runs at the start of
each worker process the job creates (Ray Train's own actors included); a line a user must see
(an error, a warning about the run) still comes through.
"""

from __future__ import annotations

import logging

NOISY_LOGGERS = {
    # Polls the State API, which a local Ray without the dashboard does not serve: one warning per
    # poll ("Failed to query Ray Train Controller actor state"), interleaved with the progress bar.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
}


def quiet_workers() -> None:
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
