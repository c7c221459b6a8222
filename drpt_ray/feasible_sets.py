"""The feasible-set registry: each named set and what it needs, read by the schema and the regularizer.

No torch and no config import: `drpt_ray.config` reads this module when it is imported (the
`feasible_set` choices and the combinations it refuses), and the regularizer reads the same entries
(regularize/feasible.py has the membership rules they name). Registered names only: a feasible set
is never user code named by import path.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Callable

from drpt_ray.registry import Registry


class Granularity(StrEnum):
    """What one regularized backward does with the per-row scores (the regularizer branches on it)."""

    NONE = "none"  # no scoring: the plain batch gradient
    LAYER = "layer"  # each weight matrix picks its own row weights from its own scores
    GLOBAL = "global"  # one choice for the whole model from the summed scores
    TARGET = "target"  # the update is g_T itself


@dataclass(frozen=True)
class FeasibleSet:
    """A named feasible set.

    Attributes:
        name: the `regularizer.feasible_set` value.
        granularity: of a RegularizerSpec (`Granularity`).
        soft: membership is the softmax rule (`tau`), not the hard subset rule (`selection`, `frac`).
        passes: the `regularizer.passes` it runs with (two_pass re-runs the backward on the kept rows).
        target_modes: the `regularizer.target_mode`s it runs with.
        filters_buffer: scores a whole RL rollout buffer once and trains plainly on the kept rows.
        uses_target: needs the target gradient g_T at all.
    """

    name: str
    granularity: Callable[[Any], Granularity]
    soft: bool = False
    passes: tuple[str, ...] = ("one_pass",)
    target_modes: tuple[str, ...] = ("separate", "merged")
    filters_buffer: bool = False
    uses_target: bool = True


FEASIBLE_SETS: Registry[FeasibleSet] = Registry("feasible set", paths=False)


def _add(fs: FeasibleSet) -> None:
    FEASIBLE_SETS.add(fs.name, fs)


_add(FeasibleSet("full", lambda spec: Granularity.NONE, uses_target=False))
# target_only writes the cached g_T; in merged mode nothing is cached.
_add(FeasibleSet("target_only", lambda spec: Granularity.TARGET, target_modes=("separate",)))
_add(FeasibleSet("global_subset", lambda spec: Granularity.GLOBAL, passes=("one_pass", "two_pass")))
_add(FeasibleSet("layerwise_subset", lambda spec: Granularity.LAYER))
_add(FeasibleSet("soft_subset", lambda spec: Granularity(spec.soft_granularity), soft=True))
# IIF scores a whole rollout buffer once (global scores) and keeps a subset; the training steps
# on the kept buffer are then ordinary ones (Regularizer.filter_buffer).
_add(FeasibleSet("iif", lambda spec: Granularity.NONE, target_modes=("separate",), filters_buffer=True))
