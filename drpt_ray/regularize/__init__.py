"""Dr. Post-Training gradient curation (method.md sections 1-3). Pure torch: no Ray, vLLM or FastAPI."""

from drpt_ray.config import RegularizerSpec, SketchSpec
from drpt_ray.regularize.feasible import FeasibleSet, get_feasible_set, register_feasible_set, registered_feasible_sets
from drpt_ray.regularize.hooks import Block
from drpt_ray.regularize.regularizer import Regularizer, RegStats

__all__ = [
    "Block",
    "FeasibleSet",
    "RegStats",
    "Regularizer",
    "RegularizerSpec",
    "SketchSpec",
    "get_feasible_set",
    "register_feasible_set",
    "registered_feasible_sets",
]
