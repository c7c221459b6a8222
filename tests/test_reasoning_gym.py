"""data.task 'reasoning_gym': pools from reasoning-gym's generators, scored by its own `score_answer`.

The oracle is reasoning-gym itself: each test builds the dataset afresh from the example's recorded
name and config and calls its `score_answer` on the answer text the test picks out of the reply by
hand, so a wrong extraction, a swapped verifier or a re-implemented comparison breaks them.
"""

from __future__ import annotations

import json

import pytest
import reasoning_gym
import yaml
from pathlib import Path

from drpt_ray.cli import main
from drpt_ray.config import DataSpec, JobSpec
from drpt_ray.data import load_task
from drpt_ray.demo import REAL_DEMO
from drpt_ray.tasks import TASKS, get_task

# Four families with 1-digit-ish difficulty; each answer is a number, the replies below are built from it.
DATASETS = [
    {"name": "chain_sum", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}},
    {"name": "basic_arithmetic", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}},
    {"name": "leg_counting", "config": {"min_animals": 1, "max_animals": 2}},
    {"name": "letter_counting", "config": {"min_words": 3, "max_words": 6}},
]


def _spec(general_verifier="lenient", answer_format="answer_tag", general=None, **sizes) -> DataSpec:
    rg = {"target": DATASETS, "general_verifier": general_verifier, "answer_format": answer_format}
    if general is not None:
        rg["general"] = general
    return DataSpec(task="reasoning_gym", reasoning_gym=rg, **({"n_target": 8, "n_eval": 40, "n_general": 80} | sizes))


def _oracle(example, answer_text: str | None) -> float:
    ref = json.loads(example.reference)
    ds = reasoning_gym.create_dataset(ref["dataset"], size=1, seed=0, **ref["config"])
    return ds.score_answer(answer_text, ref["entry"])


def _score(example, reply: str, split: str) -> float:
    return get_task("reasoning_gym").verifier(example.prompt, reply, example.scored_against, split)


def test_strict_verifier_is_score_answer_on_the_tagged_answer():
    splits = load_task(_spec())
    assert {json.loads(e.reference)["dataset"] for e in splits.target + splits.eval} == {d["name"] for d in DATASETS}
    for e in splits.target + splits.eval[:16]:
        answer = json.loads(e.reference)["entry"]["answer"]
        wrong = str(int(answer) + 1)
        assert _oracle(e, answer) == 1.0 and _oracle(e, wrong) < 1.0
        assert _score(e, f"Let me see. <answer>{answer}</answer>", "target") == 1.0
        assert _score(e, f"<answer>{wrong}</answer> no, <answer>{answer}</answer>", "target") == 1.0  # the last tag
        assert _score(e, f"<answer>{answer}</answer> no, <answer>{wrong}</answer>", "target") == 0.0
        assert _score(e, f"The answer is {answer}.", "target") == 0.0  # right, but not in the demanded format
        assert (_score(e, f"<answer>{answer} legs</answer>", "target")
                == float(_oracle(e, f"{answer} legs") == 1.0) == 0.0)
        assert e.response == f"<answer>{answer}</answer>"  # what a warm start on the target teaches


def test_lenient_verifier_finds_the_right_answer_anywhere():
    splits = load_task(_spec())
    tagged = 0
    for e in splits.general[:24]:
        answer = json.loads(e.reference)["entry"]["answer"]
        wrong = str(int(answer) + 1)
        assert json.loads(e.reference)["verifier"] == "lenient"
        assert _score(e, f"The answer is {answer}.", "general") == _oracle(e, answer) == 1.0
        assert _score(e, f"<answer>{answer}</answer>", "general") == 1.0
        assert _score(e, f"I think {wrong}.", "general") == 0.0 == _oracle(e, wrong)
        # partial credit of score_answer itself: the whole reply contains the answer among other text
        reply = f"{answer} or so"
        assert _score(e, reply, "general") == max(_oracle(e, c) for c in (answer, reply, reply.strip()))
        assert e.response in (f"The answer is {answer}.", f"<answer>{answer}</answer>")
        tagged += e.response.startswith("<answer>")
    assert 4 <= tagged <= 20  # general_format_frac 0.5 of the SFT responses in the demanded format


def test_last_line_format_and_a_strict_general_pool():
    splits = load_task(_spec(general_verifier="strict", answer_format="last_line"))
    e = splits.general[0]
    answer = json.loads(e.reference)["entry"]["answer"]
    assert _score(e, f"Working it out\n{answer}\n", "general") == 1.0
    assert _score(e, f"{answer}\nthat is all", "general") == 0.0  # the last line is not the answer
    assert "last line" in e.prompt and e.response == answer


def test_pools_are_disjoint_and_sized():
    spec = _spec()
    splits = load_task(spec)
    qs = {name: [json.loads(e.reference)["entry"]["question"] for e in getattr(splits, name)]
          for name in ("target", "eval", "general")}
    assert [len(qs[n]) for n in ("target", "eval", "general")] == [8, 40, 80]
    assert all(len(set(v)) == len(v) for v in qs.values())
    assert not set(qs["target"]) & set(qs["eval"]) and not set(qs["general"]) & (set(qs["target"]) | set(qs["eval"]))
    assert load_task(spec) == splits  # deterministic
    assert load_task(spec.model_copy(update={"seed": 1})).target != splits.target


def test_task_mix_general_pool_uses_other_datasets():
    other = [{"name": "basic_arithmetic", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}]
    splits = load_task(_spec(general=other))
    assert {json.loads(e.reference)["dataset"] for e in splits.general} == {"basic_arithmetic"}


def test_too_small_a_question_space_is_an_error_naming_the_sizes():
    tiny = [{"name": "chain_sum", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}]
    with pytest.raises(ValueError, match="n_general"):
        load_task(DataSpec(task="reasoning_gym", reasoning_gym={"target": tiny},
                           n_target=16, n_eval=100, n_general=5000))


@pytest.mark.parametrize("data,needle", [
    ({"task": "reasoning_gym", "reasoning_gym": {"target": [{"name": "no_such_task"}]}}, "'chain_sum'"),
    ({"task": "reasoning_gym", "reasoning_gym": {"target": [{"name": "chain_sum", "config": {"max_termz": 3}}]}},
     "'max_terms'"),
    ({"task": "reasoning_gym",
      "reasoning_gym": {"target": [{"name": "chain_sum", "config": {"min_terms": 5, "max_terms": 2}}]}},
     "refuses config"),
    ({"task": "reasoning_gym", "reasoning_gym": {"answer_format": "json"}}, "answer_format"),
    ({"task": "gsm8k", "reasoning_gym": {}}, "but data.task is 'gsm8k'"),
    ({"task": "nope"}, "'reasoning_gym'"),
])
def test_bad_task_settings_are_cli_errors_naming_the_key(tmp_path, capsys, data, needle):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump({"mode": "rlvr", "data": data, "output_dir": str(tmp_path / "o")}))
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "data." in err and "Traceback" not in err


def test_one_registry_holds_loader_verifier_and_chat_default():
    assert sorted(TASKS) == ["arithmetic", "gsm8k", "reasoning_gym", "scarce_target"]
    assert DataSpec(task="reasoning_gym").uses_chat_template and DataSpec(task="gsm8k").uses_chat_template
    assert (not DataSpec(task="scarce_target").uses_chat_template
            and not DataSpec(task=None, general_path="g", target_path="t").uses_chat_template)


def test_the_real_example_is_the_demo_spec():
    """examples/reasoning_gym_smollm2.yaml is what `drpt-ray demo --real` runs (one spec, two doors)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "reasoning_gym_smollm2.yaml"
    assert JobSpec.model_validate(yaml.safe_load(path.read_text())) == JobSpec.model_validate(REAL_DEMO)
