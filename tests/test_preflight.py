"""Bad specs fail before any actor starts, with a message naming the field."""

from __future__ import annotations

import pytest
import ray
from pydantic import ValidationError

from drpt_ray.config import JobSpec, RegularizerSpec
from drpt_ray.trainer import run_job

BASE = {"mode": "rlvr", "rollout": {"sampling": {"n": 4}}, "progress": False}


@pytest.mark.parametrize(
    "over,field",
    [
        ({"algorithm": {"advantage": "ppo2"}}, "algorithm.advantage"),
        ({"algorithm": {"policy_loss": "nope"}}, "algorithm.policy_loss"),
        ({"regularizer": {"feasible_set": "sometimes"}}, "regularizer.feasible_set"),
        ({"regularizer": {"frac": -0.1}}, "regularizer.frac"),
        ({"rollout": {"sampling": {"n": 1}}}, "rollout.sampling.n"),
        ({"mode": "rlhf"}, "reward.kind"),
        ({"reward": {"kind": "function"}}, "reward.function"),
        ({"learner": {}}, "learner"),
        # learner layouts the data-parallel / FSDP learner cannot run
        ({"resources": {"fsdp": True}}, "resources.learner_num_workers"),  # nothing to shard over
        ({"resources": {"fsdp": True, "learner_num_workers": 2}, "model": {"lora": {"r": 4}}}, "model.lora"),
        ({"resources": {"fsdp": True, "learner_num_workers": 2}, "regularizer": {"feasible_set": "global_subset"}},
         "regularizer.passes"),
        ({"resources": {"fsdp": True, "learner_num_workers": 2},
          "regularizer": {"feasible_set": "soft_subset", "soft_granularity": "global"}}, "regularizer.passes"),
        ({"mode": "sft", "resources": {"learner_num_workers": 2}, "regularizer": {"target_mode": "merged"}},
         "regularizer.target_mode"),
        ({"resources": {"learner_num_workers": 2}, "regularizer": {"target_mode": "merged"}},
         "regularizer.target_mode"),
        ({"rollout": {"lora_adapter_sync": True}}, "model.lora"),  # nothing but full weights to send
        ({"rollout": {"lora_adapter_sync": True}, "model": {"lora": {"r": 4}}}, "model.lora.r is 4"),
    ],
)
def test_schema_errors_name_the_field(over, field):
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({**BASE, **over})
    assert field in str(e.value) or field.split(".")[-1] in str(e.value)


# What each feasible set runs with (drpt_ray/feasible_sets.py), refused by the schema, not at start-up.
@pytest.mark.parametrize(
    "reg,field",
    [({"feasible_set": fs, "passes": "two_pass"}, "regularizer.passes")
     for fs in ("full", "target_only", "layerwise_subset", "soft_subset", "iif")]
    + [({"feasible_set": fs, "target_mode": "merged"}, "regularizer.target_mode") for fs in ("target_only", "iif")],
)
def test_feasible_set_combinations_are_schema_errors(reg, field):
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({"mode": "sft", "regularizer": reg})
    assert field in str(e.value) and repr(reg["feasible_set"]) in str(e.value)
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        RegularizerSpec.model_validate(reg)


def test_buffer_filtering_is_refused_in_sft():
    with pytest.raises(ValidationError, match="feasible_set 'iif' filters an RL rollout buffer"):
        JobSpec.model_validate({"mode": "sft", "regularizer": {"feasible_set": "iif"}})
    JobSpec.model_validate({**BASE, "regularizer": {"feasible_set": "iif"}})


def test_needs_groups_comes_from_the_estimator_registry():
    JobSpec.model_validate({**BASE, "algorithm": {"advantage": "reinforce_pp"}, "rollout": {"sampling": {"n": 1}}})
    with pytest.raises(ValidationError, match="rollout.sampling.n"):
        JobSpec.model_validate({**BASE, "algorithm": {"advantage": "rloo"}, "rollout": {"sampling": {"n": 1}}})


def test_fsdp_layouts_that_work_validate():
    for reg in ({"feasible_set": "layerwise_subset"}, {"feasible_set": "global_subset", "passes": "two_pass"},
                {"feasible_set": "soft_subset", "soft_granularity": "layer"}, {"feasible_set": "target_only"}):
        spec = JobSpec.model_validate({**BASE, "regularizer": reg,
                                       "resources": {"fsdp": True, "learner_num_workers": 2}})
        assert spec.resources.fsdp


@pytest.mark.parametrize(
    "over,field",
    [
        ({"model": {"path": "/no/such/model"}}, "model.path"),
        ({"reward": {"kind": "function", "function": "no_such_module_xyz:score"}}, "reward.function"),
        ({"reward": {"kind": "function", "function": "json:no_such_attr"}}, "reward.function"),
        ({"mode": "rlhf", "reward": {"kind": "model", "model_path": "/no/such/rm"}}, "reward.model_path"),
        ({"data": {"task": None, "general_path": "/no/g.jsonl", "target_path": "/no/t.jsonl"}}, "/no/g.jsonl"),
    ],
)
def test_preflight_errors_name_the_field_and_start_nothing(tmp_path, over, field):
    spec = JobSpec.model_validate({**BASE, "output_dir": str(tmp_path), **over})
    assert not ray.is_initialized()
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        run_job(spec)
    assert not ray.is_initialized(), "a bad spec must fail before Ray (or any actor) starts"
