"""The learner: policy, optimizer and the Dr. regularizer (in-process, or N ranks on Ray Train)."""

from drpt_ray.learner.api import LearnerAPI
from drpt_ray.learner.batch import RLBatch, build_batch
from drpt_ray.learner.group import LearnerGroup, LearnerGroupError
from drpt_ray.learner.learner import Learner, ReferencePolicy, hf_state_dict, learner_device
from drpt_ray.learner.optim import lr_factor, make_optimizer

__all__ = ["Learner", "LearnerAPI", "LearnerGroup", "LearnerGroupError", "RLBatch", "ReferencePolicy", "build_batch",
           "hf_state_dict", "learner_device", "lr_factor", "make_optimizer"]
