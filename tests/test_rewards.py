"""Rewards: verifiers, user functions in a child process, task verifiers, the arithmetic task, reward models."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray

from drpt_ray.config import DataSpec, RewardSpec
from drpt_ray.data import load_task, scarce_target_task, solve
from drpt_ray.data.synthetic import arithmetic_task
from drpt_ray.rewards import (
    Reward,
    RewardModelScorer,
    RewardResult,
    Split,
    check_reward,
    exact_match_score,
    make_reward,
    math_score,
    resolve_function,
    tiny_reward_model,
)

USER_MODULE = "drpt_test_reward_fns"
USER_SOURCE = '''
import os
import time

NOT_CALLABLE = 3


def length(prompt, response, reference):
    return float(len(response))


def dispatch(prompt, response, reference):
    """The behaviour a test asks for, named by the response; otherwise the response's length."""
    if response == "raise":
        raise RuntimeError("user bug")
    if response == "slow":
        time.sleep(10)
    if response == "str":
        return "1.0"
    if response == "nan":
        return float("nan")
    if response == "exit":
        os._exit(3)
    return len(response)


def answer_kw(prompt, response, reference, answer):
    return float(answer)


def every_kw(prompt, response, reference, **columns):
    return float(sum(columns.values()))


def kw_only(prompt, response, reference, *, bonus=0.0):
    return float(bonus)


def renamed(p, r, answer, **columns):
    """The reference fills `answer` by position, so a column named 'answer' is not passed again."""
    return float(len(columns))
'''


@pytest.fixture(scope="module")
def user_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A reward-function module on sys.path; "spawn" children receive the parent's sys.path."""
    root = tmp_path_factory.mktemp("user_rewards")
    (root / f"{USER_MODULE}.py").write_text(USER_SOURCE)
    (root / "drpt_test_broken_fns.py").write_text("raise ImportError('missing optional dependency')\n")
    sys.path.insert(0, str(root))
    yield USER_MODULE
    sys.path.remove(str(root))


def function_reward(path: str, timeout_s: float) -> Reward:
    """The reward of `reward.function: path`."""
    return make_reward(RewardSpec(kind="function", function=path, timeout_s=timeout_s), None, ".")


def score_one(
    reward: Reward, response: str, reference: str | None = "ref", split: Split = "general", prompt: str = "prompt"
) -> RewardResult:
    """Score a batch of one."""
    return reward([prompt], [response], [reference], split)


# --------------------------------------------------------------------------------------------
# exact_match and math


def test_exact_match_strips_and_compares_exactly(tmp_path: Path) -> None:
    reward = make_reward(RewardSpec(kind="exact_match"), None, tmp_path)
    result = reward(["p"] * 4, ["  42\n", "42.", "42.0", "41"], ["42", "42", "42", "42"], "target")
    assert result == RewardResult(scores=[1.0, 0.0, 0.0, 0.0], errors=0)
    assert exact_match_score("a b", " a b ") == 1.0


MATH_CASES = [
    ("19.0", "19", 1.0),
    ("19", "19.0", 1.0),
    ("0.5", "1/2", 1.0),
    ("\\frac{1}{2}", "0.5", 1.0),
    ("The answer is 12", "12", 1.0),
    ("-15", "-15", 1.0),
    ("13", "12", 0.0),
    ("-12", "12", 0.0),
    ("zz", "12", 0.0),  # no number to parse: 0.0, not an error
    ("", "12", 0.0),
    ("12", "no answer here", 0.0),
]


@pytest.mark.parametrize(("response", "reference", "expected"), MATH_CASES)
def test_math_equivalences_and_failures(response: str, reference: str, expected: float) -> None:
    assert math_score(response, reference) == expected


def test_math_outside_the_main_thread() -> None:
    """math-verify's signal timeouts would raise ValueError in a worker thread; math_score turns them off there."""

    def score_all() -> list[float]:
        assert threading.current_thread() is not threading.main_thread()
        return [math_score(resp, ref) for resp, ref, _ in MATH_CASES]

    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(score_all).result() == [expected for _, _, expected in MATH_CASES]


def test_math_reward_batch_and_missing_reference(tmp_path: Path) -> None:
    reward = make_reward(RewardSpec(kind="math"), None, tmp_path)
    assert reward(["a", "b"], ["0.5", "3"], ["1/2", "4"], "general") == RewardResult([1.0, 0.0], 0)
    with pytest.raises(ValueError, match="reward.kind 'math'.*reference"):
        reward(["a"], ["0.5"], [None], "general")


def test_batch_arguments_are_checked(tmp_path: Path) -> None:
    reward = make_reward(RewardSpec(kind="exact_match"), None, tmp_path)
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        reward(["a", "b"], ["x"], ["x", "y"], "general")
    with pytest.raises(ValueError, match="split must be one of"):
        reward(["a"], ["x"], ["x"], "eval")


# --------------------------------------------------------------------------------------------
# User functions


def test_resolve_function_errors_name_the_field(user_module: str) -> None:
    assert resolve_function(f"{user_module}:length")("p", "abc", None) == 3.0
    cases = {
        "drpt_no_such_module:f": "module 'drpt_no_such_module' not found",
        f"{user_module}:missing": "has no attribute 'missing'",
        f"{user_module}:NOT_CALLABLE": "'NOT_CALLABLE' is a int, not callable",
        "drpt_test_broken_fns:f": "importing module 'drpt_test_broken_fns' failed: ImportError",
        "no_colon": "must look like 'package.module:function'",
    }
    for path, why in cases.items():
        with pytest.raises(ValueError, match=re.escape(why)) as err:
            resolve_function(path)
        assert str(err.value).startswith("reward.function")


def test_function_reward_happy_path(user_module: str, tmp_path: Path) -> None:
    spec = RewardSpec(kind="function", function=f"{user_module}:length")
    with contextlib.closing(make_reward(spec, None, tmp_path)) as reward:
        result = reward(["p", "p", "q"], ["a", "abcd", ""], ["r", None, "r"], "target")
        assert result == RewardResult(scores=[1.0, 4.0, 0.0], errors=0)


def test_function_failures_score_zero_and_count(user_module: str) -> None:
    """An exception, a non-number and a NaN each give 0.0 and an error; the process keeps serving."""
    with contextlib.closing(function_reward(f"{user_module}:dispatch", 5.0)) as reward:
        responses = ["ok", "raise", "str", "nan", "four"]
        result = reward(["p"] * 5, responses, [None] * 5, "general")
        assert result == RewardResult(scores=[2.0, 0.0, 0.0, 0.0, 4.0], errors=3)


def test_a_step_whose_responses_mostly_fail_ends_the_job_with_the_traceback(user_module: str) -> None:
    """A broken reward function (here: it raises) stops the job at the first step where more than
    `reward.max_error_frac` of a split's responses failed, with the function's own traceback,
    instead of training on zero rewards to the end; at or below that share the step goes on and
    its failures are counted in reward/errors."""
    from types import SimpleNamespace

    from drpt_ray.data import Example
    from drpt_ray.rollout import Rollout
    from drpt_ray.rollout.pipeline import Sampled
    from drpt_ray.trainer import score

    def sampled(texts: list[str]) -> Sampled:
        rollouts = [Rollout(prompt_index=0, prompt_ids=[1], response_ids=[2], response_logprobs=[0.0], text=t,
                            finish_reason="stop", weights_version=0) for t in texts]
        return Sampled([Example("p", "r")], rollouts)

    with contextlib.closing(function_reward(f"{user_module}:dispatch", 5.0)) as reward:
        def ctx(max_error_frac: float) -> SimpleNamespace:
            return SimpleNamespace(reward=reward, step=0, spec=SimpleNamespace(
                reward=RewardSpec(kind="function", function=f"{user_module}:dispatch", max_error_frac=max_error_frac)))

        with pytest.raises(ValueError, match=r"failed on 3 of the 4 general responses of step 1 \(more than "
                                             r"reward.max_error_frac 0.5") as err:
            score(ctx(0.5), sampled(["raise", "ok", "raise", "raise"]), "general")
        # the user's own frame and exception, as a traceback
        assert "Traceback (most recent call last)" in str(err.value)
        assert 'raise RuntimeError("user bug")' in str(err.value) and "RuntimeError: user bug" in str(err.value)
        (group,) = score(ctx(0.5), sampled(["raise", "ok", "raise", "ok"]), "general")  # 2 of 4: not more
        assert group.rewards == [0.0, 2.0, 0.0, 2.0] and group.errors == 2
        (group,) = score(ctx(1.0), sampled(["raise"] * 3), "general")  # 1: never end
        assert group.errors == 3
        with pytest.raises(ValueError, match="failed on 1 of the 3 target responses"):
            score(ctx(0.0), sampled(["ok", "raise", "ok"]), "target")


def test_a_reward_module_next_to_the_spec_is_importable(tmp_path: Path, monkeypatch) -> None:
    """`drpt-ray run spec.yaml` makes the spec's directory importable, as `python train.py` does its
    own: the reward's child process imports a module lying beside the spec, and PYTHONPATH (what a
    local Ray's workers inherit) names the directory."""
    from drpt_ray.cli import importable_beside

    (tmp_path / "beside_spec_reward.py").write_text("def score(prompt, response, reference):\n    return 7.0\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    importable_beside(tmp_path / "spec.yaml")
    assert os.environ["PYTHONPATH"] == f"{tmp_path}{os.pathsep}/elsewhere"
    with contextlib.closing(function_reward("beside_spec_reward:score", 5.0)) as reward:
        assert score_one(reward, "anything") == RewardResult([7.0], 0)


def test_function_timeout_kills_and_recovers(user_module: str) -> None:
    with contextlib.closing(function_reward(f"{user_module}:dispatch", 0.5)) as reward:
        assert score_one(reward, "ok") == RewardResult([2.0], 0)  # start-up is not part of a call's time
        start = time.monotonic()
        assert score_one(reward, "slow") == RewardResult([0.0], 1)
        assert time.monotonic() - start < 3.0
        assert score_one(reward, "ok") == RewardResult([2.0], 0)  # a fresh process took over


def test_function_process_death_recovers(user_module: str) -> None:
    with contextlib.closing(function_reward(f"{user_module}:dispatch", 5.0)) as reward:
        assert score_one(reward, "exit") == RewardResult([0.0], 1)
        assert score_one(reward, "abc") == RewardResult([3.0], 0)


# --------------------------------------------------------------------------------------------
# Extra columns as keyword arguments, several weighted functions


def test_taken_columns_follow_the_signature(user_module: str) -> None:
    """What each signature is passed of the columns {answer, bonus, reference}: only what it takes."""
    from drpt_ray.rewards.user import taken_columns

    columns = ["answer", "bonus", "reference"]
    taken = {name: [c for c in columns if taken_columns(resolve_function(f"{user_module}:{name}"))(c)]
             for name in ("length", "answer_kw", "every_kw", "kw_only", "renamed")}
    # every_kw(prompt, response, reference, **columns) takes 'reference' by position already;
    # renamed(p, r, answer, **columns) takes 'answer' so
    assert taken == {"length": [], "answer_kw": ["answer"], "every_kw": ["answer", "bonus"], "kw_only": ["bonus"],
                     "renamed": ["bonus", "reference"]}
    assert not taken_columns(max)("answer")  # no signature to read: the three arguments only


def test_several_functions_weighted_with_the_rows_columns(user_module: str, tmp_path: Path) -> None:
    """One child process serves every function; each gets the columns its signature takes; the reward
    is the weighted sum (hand-computed below), each function's scores are in `parts`, and a response
    whose one function failed counts one error, named by its field."""
    names = [("answer_kw", 1.0, None), ("every_kw", 10.0, "all"), ("length", 0.5, None), ("renamed", 100.0, None),
             ("kw_only", -1.0, None), ("dispatch", 1000.0, None)]
    spec = RewardSpec(kind="function", functions=[{"function": f"{user_module}:{f}", "weight": w, "name": n}
                                                  for f, w, n in names])
    extras = [{"answer": 3, "bonus": 2}, {"answer": 1, "bonus": 0}, {"answer": 7, "bonus": 0}]
    with contextlib.closing(make_reward(spec, None, tmp_path)) as reward:
        result = reward(["p"] * 3, ["abcd", "ab", "raise"], ["ref"] * 3, "general", extras)
    assert result.parts == {"answer_kw": [3.0, 1.0, 7.0], "all": [5.0, 1.0, 7.0], "length": [4.0, 2.0, 5.0],
                            "renamed": [1.0, 1.0, 1.0], "kw_only": [2.0, 0.0, 0.0], "dispatch": [4.0, 2.0, 0.0]}
    # 3 + 10*5 + 0.5*4 + 100*1 - 1*2 + 1000*4, then the same for "ab" and "raise" (dispatch raised: 0)
    assert result.scores == [4153.0, 2112.0, 179.5]
    assert result.errors == 1 and result.first_error.startswith("reward.functions.5.function: Traceback")
    assert result.first_error.endswith("RuntimeError: user bug\n")


def test_the_columns_travel_from_the_example_to_the_reward_and_each_part_is_a_metric() -> None:
    """trainer.score looks each rollout's row up by its prompt index and passes the row's extras;
    general_groups logs each part's mean as reward/<name>/mean next to reward_mean."""
    from types import SimpleNamespace

    from drpt_ray.config import JobSpec
    from drpt_ray.data import Example
    from drpt_ray.metrics import PhaseTimer
    from drpt_ray.rollout import Rollout
    from drpt_ray.rollout.pipeline import Sampled
    from drpt_ray.trainer import general_groups, score

    class ColumnReward(Reward):
        """Scores each response with its row's 'answer' column, in two parts."""

        def __call__(self, prompts, responses, references, split, extras=None) -> RewardResult:
            a = [float(x["answer"]) for x in extras]
            return RewardResult(scores=[2 * x + 1 for x in a], errors=0, parts={"a": a, "one": [1.0] * len(a)})

    examples = [Example("p0", "r", extras={"answer": 1}), Example("p1", "r", extras={"answer": 5})]
    rollouts = [Rollout(prompt_index=i, prompt_ids=[1], response_ids=[2], response_logprobs=[0.0], text="t",
                        finish_reason="stop", weights_version=0) for i in (0, 0, 1, 1)]
    ctx = SimpleNamespace(reward=ColumnReward(), step=0, spec=JobSpec(mode="rlvr", batch_size=2))
    groups = score(ctx, Sampled(examples, rollouts), "general")
    assert [g.rewards for g in groups] == [[3.0, 3.0], [11.0, 11.0]]
    assert [g.parts for g in groups] == [{"a": [1.0, 1.0], "one": [1.0, 1.0]}, {"a": [5.0, 5.0], "one": [1.0, 1.0]}]
    _, m = general_groups(ctx, groups, ctx.spec.rollout.sampling, PhaseTimer())
    assert (m["reward/reward_mean"], m["reward/a/mean"], m["reward/one/mean"]) == (7.0, 3.0, 1.0)


@pytest.mark.parametrize("reward,why", [
    ({"kind": "function"}, "reward.function ('module:function') or reward.functions is required"),
    ({"kind": "function", "functions": []}, "reward.functions\n  List should have at least 1 item"),
    ({"kind": "function", "function": "m:f", "functions": [{"function": "m:g"}]}, "not both"),
    ({"kind": "function", "functions": [{"function": "a:score"}, {"function": "b:score"}]},
     "more than one function is named ['score']; give each a distinct `name`"),
    ({"kind": "function", "functions": [{"function": "a:f", "name": "x"}, {"function": "b:g", "name": "x"}]},
     "named ['x']"),
    ({"kind": "function", "functions": [{"function": "a:f", "weight": float("inf")}]},
     "reward.functions.0.weight\n  Input should be a finite number"),
    ({"kind": "function", "functions": [{"function": "a:f", "weight": "2"}]}, "reward.functions.0.weight"),
    ({"kind": "function", "functions": [{"function": "a:f"}, {"function": "no_colon"}]},
     "reward.functions.1.function\n  Value error, must look like 'package.module:function', got 'no_colon'"),
    ({"kind": "function", "functions": [{"function": "a:f", "name": "a/b"}]}, "reward.functions.0.name"),
    ({"kind": "function", "functions": [{"function": "a:f", "wieght": 2.0}]}, "reward.functions.0.wieght"),
])
def test_bad_reward_functions_name_the_key(reward: dict, why: str) -> None:
    from pydantic import ValidationError

    from drpt_ray.config import JobSpec

    with pytest.raises(ValidationError, match=re.escape(why)):
        JobSpec.model_validate({"mode": "rlvr", "reward": reward})


def test_every_function_is_user_code_and_resolved_at_preflight(user_module: str) -> None:
    from drpt_ray.config import JobSpec

    spec = JobSpec.model_validate({"mode": "rlvr", "reward": {"kind": "function", "functions": [
        {"function": f"{user_module}:length"}, {"function": "drpt_no_such_module:f", "name": "g"}]}})
    assert spec.user_code() == {("reward", "functions", 0, "function"): f"{user_module}:length",
                                ("reward", "functions", 1, "function"): "drpt_no_such_module:f"}
    with pytest.raises(ValueError, match=re.escape("reward.functions.1.function 'drpt_no_such_module:f': module "
                                                   "'drpt_no_such_module' not found")):
        check_reward(spec.reward, None)


# --------------------------------------------------------------------------------------------
# Built-in task verifiers

SCARCE_CASES = [  # prompt "map:k,q->": f(k) = l, g(q) = s
    ("l,s", 1.0, 1.0),
    (" l,s\n", 1.0, 1.0),
    ("l;s.", 1.0, 0.0),  # right letters in the conflicting format: the general proxy accepts it
    ("k,s", 0.5, 0.0),  # field A wrong
    ("k;t.", 0.0, 0.0),
    ("l;s", 0.0, 0.0),  # neither layout
    ("zz", 0.0, 0.0),
]


@pytest.mark.parametrize(("response", "general", "target"), SCARCE_CASES)
def test_scarce_target_lenient_general_strict_target(
    response: str, general: float, target: float, tmp_path: Path
) -> None:
    assert solve("map:k,q->") == "l,s"
    reward = make_reward(RewardSpec(kind="task"), "scarce_target", tmp_path)
    assert score_one(reward, response, None, "general", prompt="map:k,q->").scores == [general]
    assert score_one(reward, response, None, "target", prompt="map:k,q->").scores == [target]


def test_scarce_target_rewards_of_the_general_pool(tmp_path: Path) -> None:
    """Clean rows score 1/1, conflicting-format rows 1/0, wrong-field rows 0.5/0 (general/target)."""
    n, p_clean = 300, 0.3
    pool = scarce_target_task(n_general=n, n_target=4, n_eval=4, p_clean=p_clean, seed=1).general
    reward = make_reward(RewardSpec(kind="task"), "scarce_target", tmp_path)
    args = ([e.prompt for e in pool], [e.response for e in pool], [e.response for e in pool])
    general, target = reward(*args, "general").scores, reward(*args, "target").scores
    n_clean = round(p_clean * n)
    n_format = 2 * (n - n_clean) // 3
    assert sorted(zip(general, target)) == sorted(
        [(1.0, 1.0)] * n_clean + [(1.0, 0.0)] * n_format + [(0.5, 0.0)] * (n - n_clean - n_format)
    )


def test_arithmetic_verifier(tmp_path: Path) -> None:
    reward = make_reward(RewardSpec(kind="task"), "arithmetic", tmp_path)
    for split in ("general", "target"):
        result = reward(["7+5="] * 4, ["12", "12.0", "13", "twelve"], ["12"] * 4, split)
        assert result == RewardResult([1.0, 1.0, 0.0, 0.0], 0)


# --------------------------------------------------------------------------------------------
# The arithmetic task


def arithmetic_value(prompt: str) -> int:
    a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt).groups()
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def test_arithmetic_task_sizes_answers_and_determinism() -> None:
    splits = arithmetic_task(n_general=500, n_target=16, n_eval=64, seed=0)
    assert (len(splits.general), len(splits.target), len(splits.eval)) == (500, 16, 64)
    for e in splits.general + splits.target + splits.eval:
        assert e.response == str(arithmetic_value(e.prompt)), e
    assert arithmetic_task(500, 16, 64, seed=0) == splits
    assert arithmetic_task(500, 16, 64, seed=1) != splits
    assert load_task(DataSpec(task="arithmetic", n_general=500, n_target=16, n_eval=64, seed=0)) == splits


def test_arithmetic_target_differs_from_general() -> None:
    splits = arithmetic_task(n_general=500, n_target=16, n_eval=64, seed=0)
    held = splits.target + splits.eval
    assert len({e.prompt for e in held}) == len(held)  # distinct, so target and eval are disjoint
    for e in held:  # target distribution: two-digit subtraction with a non-negative result
        a, b = map(int, re.fullmatch(r"(\d+)-(\d+)=", e.prompt).groups())
        assert 10 <= b <= a <= 99
    general_ops = {e.prompt.rstrip("=").strip("0123456789") for e in splits.general}
    assert general_ops == {"+", "-"}
    assert any(int(e.response) < 0 for e in splits.general)
    with pytest.raises(ValueError, match="exceeds the 4095 distinct target problems"):
        arithmetic_task(n_general=1, n_target=4000, n_eval=96, seed=0)


# --------------------------------------------------------------------------------------------
# Reward models


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_reward_model(tmp_path_factory.mktemp("rm") / "tiny-reward-model", seed=0)


TEXTS = (["map:k,q->", "7+5=", "Hello", "Hello"], ["l,s", "12", " world, this is longer", "!"])


def test_tiny_reward_model_scores(reward_model_dir: Path) -> None:
    scores = RewardModelScorer(str(reward_model_dir)).score(*TEXTS)
    assert len(scores) == 4 and len(set(scores)) == 4  # different texts, different scores
    again = RewardModelScorer(str(reward_model_dir), batch_size=1).score(*TEXTS)
    # Same files, same scores, and padding in a batch of 4 does not change any of them.
    assert again == pytest.approx(scores, abs=1e-5)
    marker = reward_model_dir / "drpt_tiny_reward_model.json"
    mtime = marker.stat().st_mtime_ns
    assert tiny_reward_model(reward_model_dir, seed=0) == reward_model_dir
    assert marker.stat().st_mtime_ns == mtime  # reused, not rebuilt


@pytest.fixture
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_model_reward_through_a_ray_actor(local_ray, reward_model_dir: Path, tmp_path: Path) -> None:
    expected = RewardModelScorer(str(reward_model_dir)).score(*TEXTS)
    # An explicit model_path, and None: the same seed-0 tiny model, built under the work dir.
    for spec in (RewardSpec(kind="model", model_path=str(reward_model_dir)), RewardSpec(kind="model")):
        with contextlib.closing(make_reward(spec, None, tmp_path, num_cpus=0.5)) as reward:
            result = reward(*TEXTS, [None] * 4, "general")
            assert result.errors == 0 and result.scores == pytest.approx(expected, abs=1e-6)
    assert (tmp_path / "tiny-reward-model" / "config.json").is_file()


# --------------------------------------------------------------------------------------------
# Preflight


def test_check_reward_errors(user_module: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reward.kind 'task'.*data.task is None"):
        check_reward(RewardSpec(kind="task"), None)
    with pytest.raises(ValueError, match="reward.function 'drpt_no_such_module:f'.*not found"):
        check_reward(RewardSpec(kind="function", function="drpt_no_such_module:f"), None)
    with pytest.raises(ValueError, match="reward.model_path .* is not a directory"):
        check_reward(RewardSpec(kind="model", model_path=str(tmp_path / "absent")), None)
    for spec, task in [
        (RewardSpec(kind="task"), "arithmetic"),
        (RewardSpec(kind="math"), None),
        (RewardSpec(kind="function", function=f"{user_module}:length"), None),
        (RewardSpec(kind="model"), None),
        (RewardSpec(kind="model", model_path=str(tmp_path)), None),
    ]:
        check_reward(spec, task)


def test_target_kind_scores_the_target_split_with_its_verifier(tmp_path):
    from drpt_ray.config import RewardSpec
    from drpt_ray.rewards import SplitReward, make_reward

    reward = make_reward(RewardSpec(kind="exact_match", target_kind="task"), "scarce_target", tmp_path)
    assert isinstance(reward, SplitReward)
    prompts, answers = ["map:a,b->"] * 2, ["b,d", "b;d."]
    # general split: exact match against the reference "b;d."; target split: the strict task verifier
    assert reward(prompts, answers, ["b;d.", "b;d."], "general").scores == [0.0, 1.0]
    assert reward(prompts, answers, ["b;d.", "b;d."], "target").scores == [1.0, 0.0]
    reward.close()
    with pytest.raises(ValueError, match="target_kind 'task'"):
        make_reward(RewardSpec(kind="exact_match", target_kind="task"), None, tmp_path)


def test_summary_and_verdict_count_the_reward_errors() -> None:
    """A run whose reward failed on some responses says how many beside its result; a clean run
    says nothing about errors."""
    from drpt_ray.cli import summary, verdict

    history = [{"reward/reward_mean": 0.1, "reward/errors": 3.0, "target/errors": 0.0, "eval/target_reward": 0.2},
               {"reward/reward_mean": 0.4, "reward/errors": 1.0, "target/errors": 2.0},
               {"reward/reward_mean": 0.5, "reward/errors": 0.0, "target/errors": 0.0, "eval/target_reward": 0.6}]
    said = "reward errors: 6 responses scored 0 by a failing reward (4 general, 2 target)"
    assert said in summary(history)
    assert verdict(history) == ("verdict: learned: held-out target reward 0.200 at the start, 0.600 at the end "
                                f"({said})")
    clean = [{k: v for k, v in m.items() if not k.endswith("/errors")} for m in history]
    assert "error" not in summary(clean) and verdict(clean).endswith("0.600 at the end")
