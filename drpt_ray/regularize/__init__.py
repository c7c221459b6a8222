"""Dr. Post-Training gradient curation (method.md sections 1-3). Pure torch: no Ray, vLLM or FastAPI.

`drpt_ray.config` imports the feasible-set registry (`sets`) at its own import, and the torch
modules here import the config, so they are loaded on first access (PEP 562), not with the package.
"""

import importlib

from drpt_ray.regularize.sets import FeasibleSet, get_feasible_set, register_feasible_set, registered_feasible_sets

_LAZY = {"Block": "hooks", "Regularizer": "regularizer", "RegStats": "regularizer"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = [
    "Block",
    "FeasibleSet",
    "RegStats",
    "Regularizer",
    "get_feasible_set",
    "register_feasible_set",
    "registered_feasible_sets",
]
