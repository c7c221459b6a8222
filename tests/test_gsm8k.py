"""The gsm8k task: the fetched cache, its independent answer check, the pools, the verifier, chat prompts.

They read the cache `scripts/setup.sh` fetched (default settings); every solution is re-checked
here with an arithmetic evaluator written in this file, not the module's.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import time
from fractions import Fraction
from pathlib import Path

import pytest
from tokenizers.processors import TemplateProcessing

from drpt_ray.cli import main
from drpt_ray.config import DataSpec, JobSpec, RewardSpec
from drpt_ray.data import Example, TaskSplits, load_task, render_chat, tokenize_sft
from drpt_ray.data import gsm8k
from drpt_ray.models import build_tokenizer
from drpt_ray.rewards import check_reward
from drpt_ray.rewards.tasks import gsm8k_verifier

N_TARGET, N_EVAL, N_GENERAL = 16, 32, 300


@pytest.fixture(scope="module")
def cache() -> Path:
    # The cache `scripts/setup.sh` fetched (`drpt-ray data fetch gsm8k`, default settings): tests
    # download nothing.
    root = gsm8k.default_root()
    if gsm8k.read_manifest(root) is None:
        pytest.fail(f"no gsm8k cache at {root}: run `.venv/bin/drpt-ray data fetch gsm8k` (scripts/setup.sh does)")
    return root


def _rows(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / name).read_text().splitlines()]


# An evaluator of calculator expressions independent of gsm8k.evaluate: exact Fractions built from
# the literal's source text.
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _calc(node: ast.AST, source: str) -> Fraction:
    if isinstance(node, ast.Constant):
        return Fraction(ast.get_source_segment(source, node))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_calc(node.operand, source)
    if isinstance(node, ast.BinOp):
        return Fraction(_OPS[type(node.op)](_calc(node.left, source), _calc(node.right, source)))
    raise AssertionError(f"not a calculator expression: {source!r}")


def _assert_solution_checks(solution: str) -> None:
    body, answer = solution.split("####")
    for annotation in re.findall(r"<<(.*?)>>", body):
        expr, value = (part.strip() for part in annotation.split("="))
        assert _calc(ast.parse(expr, mode="eval").body, expr) == Fraction(value), annotation
    last = re.findall(r"\d[\d,]*(?:\.\d+)?", re.sub(r"<<.*?>>", "", body))[-1]
    assert Fraction(last.replace(",", "")) == Fraction(answer.strip().replace(",", "")), solution


def test_fetch_counts_and_idempotence(cache):
    manifest = json.loads((cache / gsm8k.MANIFEST).read_text())
    counts = manifest["counts"]
    assert counts["originals"] == 100
    assert counts["originals_passing_check"] == 99  # the pinned data: one body ends on another number
    assert counts["variants_kept"] == len(_rows(cache, gsm8k.VARIANTS)) > 0
    assert counts["variants_generated"] == (
        counts["variants_kept"] + counts["variants_dropped_check"] + counts["variants_dropped_equal_to_original"]
        + counts["variants_dropped_duplicate"]
    )
    assert counts["templates_skipped_budget"] == len(counts["templates_skipped"]) == 0  # the slow ones are listed
    assert counts["templates_skipped_slow"] == sorted(gsm8k.SLOW_TEMPLATES)
    assert {r["template"] for r in _rows(cache, gsm8k.VARIANTS)}.isdisjoint(gsm8k.SLOW_TEMPLATES)
    start = time.perf_counter()
    assert gsm8k.fetch(cache) == cache
    assert time.perf_counter() - start < 1
    assert json.loads((cache / gsm8k.MANIFEST).read_text()) == manifest
    assert not list(cache.parent.glob(".gsm8k-*"))  # no temporary build directory is left behind


def test_every_original_answer_is_a_number(cache):
    originals = _rows(cache, gsm8k.ORIGINALS)
    assert len({r["template"] for r in originals}) == len({r["question"] for r in originals}) == 100
    for row in originals:
        assert row["solution"].rstrip().endswith(f"#### {row['answer']}")
        Fraction(row["answer"])


def test_every_kept_variant_checks_independently(cache):
    originals = {r["question"] for r in _rows(cache, gsm8k.ORIGINALS)}
    variants = _rows(cache, gsm8k.VARIANTS)
    assert len({r["question"] for r in variants}) == len(variants)
    for row in variants:
        assert row["question"] not in originals
        assert row["solution"].rstrip().endswith(f"#### {row['answer']}")
        _assert_solution_checks(row["solution"])


def test_check_rejects_wrong_arithmetic_and_wrong_final_answer():
    good = "She has 6*2 = <<6*2=12>>12 eggs.\n#### 12"
    assert gsm8k.check_solution(good)
    assert not gsm8k.check_solution(good.replace("=12>>", "=13>>"))
    assert not gsm8k.check_solution(good.replace("#### 12", "#### 13"))
    assert not gsm8k.check_solution("It costs <<abs(-3)=3>>3 dollars.\n#### 3")
    assert not gsm8k.check_solution("No final line, 12")


def test_load_splits_are_disjoint_and_sized(cache):
    splits = gsm8k.load(N_TARGET, N_EVAL, N_GENERAL, seed=3, root=cache)
    assert (len(splits.target), len(splits.eval), len(splits.general)) == (N_TARGET, N_EVAL, N_GENERAL)
    questions = {split: {e.prompt for e in getattr(splits, split)} for split in ("target", "eval", "general")}
    assert not questions["target"] & questions["eval"]
    assert not questions["general"] & (questions["target"] | questions["eval"])
    # No general variant comes from an eval template, i.e. an eval problem with other numbers.
    variants = {f"{r['question']}\n{gsm8k.INSTRUCTION}\n": r["template"] for r in _rows(cache, gsm8k.VARIANTS)}
    originals = {f"{r['question']}\n{gsm8k.INSTRUCTION}\n": r["template"] for r in _rows(cache, gsm8k.ORIGINALS)}
    eval_templates = {originals[e.prompt] for e in splits.eval}
    assert not {variants[e.prompt] for e in splits.general} & eval_templates
    for e in splits.target + splits.eval + splits.general:
        assert re.search(r"\n#### \d+(\.\d+)?$", e.response)
    assert gsm8k.load(N_TARGET, N_EVAL, N_GENERAL, seed=3, root=cache) == splits


def test_load_task_reads_the_default_root(cache, monkeypatch):
    monkeypatch.setenv("DRPT_DATA_DIR", str(cache.parent))
    spec = DataSpec(task="gsm8k", n_target=N_TARGET, n_eval=N_EVAL, n_general=N_GENERAL, seed=3)
    assert load_task(spec) == gsm8k.load(N_TARGET, N_EVAL, N_GENERAL, seed=3, root=cache)


def test_load_without_a_cache_says_how_to_fetch(tmp_path):
    with pytest.raises(ValueError, match=r"drpt-ray data fetch gsm8k") as e:
        gsm8k.load(4, 4, 10, seed=0, root=tmp_path / "nothing")
    assert str(tmp_path / "nothing") in str(e.value)


def test_too_many_held_out_problems_names_the_fields(tmp_path):
    with pytest.raises(ValueError, match=r"data\.n_target \+ data\.n_eval"):
        gsm8k.load(16, 85, 10, seed=0, root=tmp_path)


def test_verifier_scores_the_final_answer():
    reference = "He buys 3*4 = <<3*4=12>>12 apples.\n#### 12"
    assert gsm8k_verifier("", "3 bags of 4 make 12.\n#### 12", reference, "target") == 1.0
    assert gsm8k_verifier("", "3 bags of 4 make 12.\n#### 12.0", reference, "general") == 1.0
    assert gsm8k_verifier("", "3 bags of 4 make 12.\n#### 7", reference, "target") == 0.0
    assert gsm8k_verifier("", "#### 12 is wrong, the answer is\n#### 13", reference, "target") == 0.0


def test_chat_rendering_wraps_a_user_turn():
    splits = TaskSplits(general=[Example("Q?\nSolve.\n", "A")], target=[], eval=[Example("E", "B")])
    rendered = render_chat(splits, build_tokenizer())
    assert rendered.general == [Example("<|im_start|>user\nQ?\nSolve.\n<|im_end|>\n<|im_start|>assistant\n", "A")]
    assert rendered.eval == [Example("<|im_start|>user\nE<|im_end|>\n<|im_start|>assistant\n", "B")]


def test_chat_rendering_keeps_one_bos():
    # The tiny tokenizer made Llama-like: encoding adds a BOS, and the chat template writes one too.
    tok = build_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = [("<s>", tok.bos_token_id)]
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=bos)
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    rendered = render_chat(TaskSplits(general=[Example("Q", "A")], target=[], eval=[]), tok)
    assert rendered.general[0].prompt.startswith("<|im_start|>user\nQ")
    ids = tokenize_sft(tok, rendered.general, max_len=64)["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_chat_template_defaults_on_for_gsm8k_only():
    assert DataSpec(task="gsm8k").uses_chat_template
    assert not DataSpec(task="arithmetic").uses_chat_template
    assert not DataSpec(task="gsm8k", chat_template=False).uses_chat_template


def test_jobspec_and_reward_accept_gsm8k():
    spec = JobSpec.model_validate({"mode": "rlvr", "data": {"task": "gsm8k"}, "reward": {"kind": "task"}})
    assert spec.data.task == "gsm8k"
    check_reward(RewardSpec(kind="task"), "gsm8k")


def test_cli_fetch_prints_the_cache(cache, monkeypatch, capsys):
    # The fetch itself is tested above; here only the command's wiring and its summary, from the real manifest.
    calls = []
    monkeypatch.setattr(gsm8k, "fetch", lambda root: calls.append(root) or cache)
    assert main(["data", "fetch", "gsm8k", "--root", str(cache)]) == 0
    assert calls == [cache]
    out = capsys.readouterr().out
    assert str(cache) in out and "100 problems (99 pass the answer check)" in out
