"""The one schema's input rules, as the CLI and the library meet them: YAML spellings, duplicate
keys, and a sweep's values checked one by one (the REST API's side: tests/control_plane)."""

from __future__ import annotations

import pytest

from drpt_ray.cli import main
from drpt_ray.config import JobSpec, SweepSpec, load_spec


def test_yaml_spellings_of_numbers_stay_valid(tmp_path):
    p = tmp_path / "job.yaml"
    # an int for a float, exponent floats PyYAML alone reads as strings, a list for the betas pair
    p.write_text("steps: 1_000\noptim: {lr: 1, weight_decay: 1e-2, betas: [0.9, 0.95]}\nwarm_start_lr: 5E-4\n")
    spec = load_spec(p, JobSpec)
    assert ((spec.steps, spec.optim.lr, spec.optim.weight_decay, spec.optim.betas, spec.warm_start_lr)
            == (1000, 1.0, 0.01, (0.9, 0.95), 5e-4))


@pytest.mark.parametrize("text,needle", [
    ("steps: \"30\"\n", "steps: Input should be a valid integer (got '30')"),
    ("steps: yes\n", "steps: Input should be a valid integer (got True)"),
    ("optim: {lr: .inf}\n", "optim.lr: Input should be a finite number"),
    ("seed: -1\n", "seed: Input should be greater than or equal to 0"),
    # asynchronous RL settings that cannot run
    ("mode: rlvr\nrollout: {max_staleness: 1}\n", "set algorithm.rollout_correction"),
    ("mode: rlvr\nrollout: {max_staleness: 1}\nalgorithm: {rollout_correction: {}, target_objective: reward}\n",
     "algorithm.target_objective 'reward' does not read the advantages"),
    ("mode: rlvr\nrollout: {partial_rollouts: true}\n", "rollout.partial_rollouts needs rollout.max_staleness > 0"),
    ("mode: rlvr\nrollout: {max_staleness: -1}\n", "rollout.max_staleness: Input should be greater than or equal to 0"),
    # a misspelled key gets the closest known one of its own section
    ("stpes: 10\n", "stpes: Extra inputs are not permitted (got 10); did you mean 'steps'?"),
    ("rollout: {sampling: {temprature: 0.5}}\n",
     "rollout.sampling.temprature: Extra inputs are not permitted (got 0.5); did you mean 'temperature'?"),
])
def test_bad_values_are_errors_naming_the_key(tmp_path, text, needle):
    """Values are not coerced, and settings that cannot run together are refused, naming the key."""
    p = tmp_path / "job.yaml"
    p.write_text(text)
    with pytest.raises(ValueError) as e:
        load_spec(p, JobSpec)
    assert needle in str(e.value)


def test_a_repeated_yaml_key_is_an_error_naming_it(tmp_path, capsys):
    p = tmp_path / "job.yaml"
    p.write_text(f"output_dir: {tmp_path / 'o'}\noptim:\n  lr: 0.1\n  warmup_frac: 0.0\n  lr: 0.2\n")
    assert main(["sft", str(p)]) == 2
    err = capsys.readouterr().err
    assert "found duplicate key 'lr'" in err and "line 5" in err and "Traceback" not in err


def test_every_searched_value_is_checked_not_only_the_first():
    with pytest.raises(ValueError,
                       match=r"regularizer\.tau=-2\.0 is not a valid value: Input should be greater than 0"):
        SweepSpec.model_validate({"space": {"regularizer.tau": {"values": [1.0, 0.5, -2.0]}}})
    with pytest.raises(ValueError, match=r"regularizer\.frac=1\.5 is not a valid value"):  # a range's upper end
        SweepSpec.model_validate({"scheduler": "random", "space": {"regularizer.frac": {"low": 0.1, "high": 1.5}}})
    with pytest.raises(ValueError,
                       match=r"space: batch_size: the range \[2\.2, 2\.8\] of an integer field holds no integer"):
        SweepSpec.model_validate({"scheduler": "random", "space": {"batch_size": {"low": 2.2, "high": 2.8}}})
    with pytest.raises(ValueError, match=r"'output_dir' is set for each trial"):
        SweepSpec.model_validate({"space": {"output_dir": {"values": ["a", "b"]}}})
    ok = SweepSpec.model_validate({"scheduler": "random", "space": {"batch_size": {"low": 1.5, "high": 8.0}}})
    assert ok.space["batch_size"].probes(ok.base.batch_size) == [2, 8]  # the integers Tune draws between


def test_asynchronous_rl_settings_that_can_run(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("mode: rlvr\nrollout: {max_staleness: 2, partial_rollouts: true}\n"
                 "algorithm: {rollout_correction: {}}\n")
    spec = load_spec(p, JobSpec)
    assert ((spec.rollout.max_staleness, spec.rollout.partial_rollouts, spec.rollout.partial_chunk_tokens)
            == (2, True, 32))


@pytest.mark.parametrize("mode", ["sft", "rlhf", "rlvr"])
def test_config_show_prints_every_key_as_a_spec_that_loads_back_to_the_defaults(tmp_path, capsys, mode):
    """`drpt-ray config show` is read from the schema: its output is a spec whose every key is
    written out (so loading it gives exactly the defaults), and each key carries its description."""
    from drpt_ray.spec_doc import MODE_MINIMUM

    assert main(["config", "show", "--mode", mode]) == 0
    shown = capsys.readouterr().out
    p = tmp_path / "shown.yaml"
    p.write_text(shown)
    assert load_spec(p, JobSpec) == JobSpec.model_validate({"mode": mode, **MODE_MINIMUM[mode]})
    assert "  feasible_set: \"layerwise_subset\"" in shown and "# full | global_subset" in shown
    assert "lora: null" in shown and "(a mapping of: r, alpha, dropout, target_modules)" in shown
    # nested sections are written out to their leaves
    assert "\n    dim: 64 " in shown and "\n  lora_adapter_sync: false " in shown and "\n    temperature: " in shown


def test_set_overrides_keys_of_the_file_as_yaml_values(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("mode: rlvr\nregularizer: {feasible_set: layerwise_subset, frac: 0.5}\n")
    spec = load_spec(p, JobSpec, ["regularizer.feasible_set=full", "optim.lr=1e-4", "rollout.sampling.n=2",
                                  "model.lora={r: 8}"])
    assert (spec.regularizer.feasible_set, spec.regularizer.frac, spec.optim.lr, spec.rollout.sampling.n,
            spec.model.lora.r) == ("full", 0.5, 1e-4, 2, 8)
    with pytest.raises(ValueError, match=r"regularizer\.frac\.x: regularizer\.frac is not a section"):
        load_spec(p, JobSpec, ["regularizer.frac.x=1"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        load_spec(p, JobSpec, ["steps"])


def test_checkpoint_resume_takes_its_words_a_path_and_the_former_booleans(tmp_path):
    p = tmp_path / "job.yaml"
    for text, resume in (("{}", "auto"), ("{resume: true}", "auto"), ("{resume: false}", "never"),
                         ("{resume: never}", "never"), ("{resume: runs/a}", "runs/a")):
        p.write_text(f"checkpoint: {text}\n")
        assert load_spec(p, JobSpec).checkpoint.resume == resume, text
    assert load_spec(p, JobSpec, ["checkpoint.resume=false"]).checkpoint.resume == "never"
    assert not JobSpec().checkpoint.resume_changed_spec
    with pytest.raises(ValueError, match="checkpoint.resume: String should have at least 1 character"):
        load_spec(p, JobSpec, ["checkpoint.resume=''"])
