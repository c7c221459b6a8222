"""Dr. Post-Training gradient curation (method.md sections 1-3). Pure torch: no Ray, vLLM or FastAPI.

The feasible sets it curates with are registered in drpt_ray/feasible_sets.py, below the config
(the schema reads their names); the membership rules are feasible.py's.
"""

from drpt_ray.regularize.hooks import Block
from drpt_ray.regularize.regularizer import Regularizer, RegStats

__all__ = ["Block", "RegStats", "Regularizer"]
