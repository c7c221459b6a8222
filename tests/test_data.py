"""Data: the synthetic scarce-target task, jsonl/parquet loading, and SFT collation."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from drpt_ray.config import DataSpec
from drpt_ray.data import (
    IGNORE_INDEX,
    Example,
    TaskSplits,
    load_examples,
    load_task,
    scarce_target_task,
    solve,
    supervised_token_counts,
    tokenize_sft,
)
from drpt_ray.data.synthetic import LETTERS, shift

PROMPT = re.compile(r"map:([a-z]),([a-z])->")
RESPONSE = re.compile(r"([a-z])[,;]([a-z])\.?")


def fields(e: Example) -> tuple[str, str, str, str]:
    """(x, y, a, b) of a synthetic example, asserting the text format on the way."""
    pm, rm = PROMPT.fullmatch(e.prompt), RESPONSE.fullmatch(e.response)
    assert pm and rm, e
    return (*pm.groups(), *rm.groups())


def kind(e: Example) -> str:
    x, y, a, b = fields(e)
    ok_a, ok_b = a == shift(x, 1), b == shift(y, 2)
    if ok_a and ok_b and e.response == f"{a};{b}.":
        return "format"
    if ok_a and ok_b:
        return "clean"
    if a == x and ok_b:
        return "bad_a"
    return "other"


# ------------------------------------------------------------------------------------------
# Synthetic task


def test_shift_wraps_around_the_alphabet():
    assert shift("a", 1) == "b" and shift("z", 1) == "a" and shift("y", 2) == "a" and shift("z", 2) == "b"
    assert solve("map:k,q->") == "l,s"
    assert solve("map:z,y->") == "a,a"
    with pytest.raises(ValueError, match="not a scarce_target prompt"):
        solve("map:K,q->")


def test_sizes_and_short_prompts():
    t = scarce_target_task(n_general=1000, n_target=16, n_eval=100, p_clean=0.3, seed=0)
    assert (len(t.general), len(t.target), len(t.eval)) == (1000, 16, 100)
    assert all(len(e.prompt) < 16 for e in t.general + t.target + t.eval)


def test_deterministic_in_seed():
    a = scarce_target_task(500, 16, 64, 0.3, seed=3)
    b = scarce_target_task(500, 16, 64, 0.3, seed=3)
    c = scarce_target_task(500, 16, 64, 0.3, seed=4)
    assert a == b
    assert a.general != c.general and a.target != c.target


def test_target_and_eval_are_correct_and_disjoint():
    t = scarce_target_task(200, 16, 256, 0.3, seed=0)
    assert all(e.response == solve(e.prompt) for e in t.target + t.eval)
    target_pairs = {fields(e)[:2] for e in t.target}
    eval_pairs = {fields(e)[:2] for e in t.eval}
    assert len(target_pairs) == 16 and len(eval_pairs) == 256  # distinct pairs within each pool
    assert not target_pairs & eval_pairs
    # Scarcity: 16 pairs cannot show all 26 letters in a field.
    assert len({x for x, _ in target_pairs}) < 26 and len({y for _, y in target_pairs}) < 26


@pytest.mark.parametrize(
    ("n", "p_clean", "expected"),
    [
        (4000, 0.3, {"clean": 1200, "format": 1866, "bad_a": 934}),
        (1001, 0.3, {"clean": 300, "format": 467, "bad_a": 234}),  # the remainder goes to bad_a
        (100, 1.0, {"clean": 100}),
        (99, 0.0, {"clean": 0, "format": 66, "bad_a": 33}),
    ],
)
def test_general_pool_kinds_have_exact_counts(n, p_clean, expected):
    t = scarce_target_task(n, 16, 64, p_clean, seed=1)
    counts = Counter(kind(e) for e in t.general)
    assert counts["other"] == 0
    assert {k: counts[k] for k in expected} == expected


def test_general_pool_covers_every_letter_in_both_fields_evenly():
    t = scarce_target_task(1000, 16, 64, 0.3, seed=2)
    xs = Counter(fields(e)[0] for e in t.general)
    ys = Counter(fields(e)[1] for e in t.general)
    for c in (xs, ys):
        assert set(c) == set(LETTERS)
        assert max(c.values()) - min(c.values()) <= 1  # 1000 = 38*26 + 12


def test_general_pool_is_shuffled():
    kinds = [kind(e) for e in scarce_target_task(600, 16, 64, 0.3, seed=0).general]
    assert kinds[:180] != ["clean"] * 180


def test_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="676"):
        scarce_target_task(10, 500, 200, 0.3, seed=0)
    with pytest.raises(ValueError, match="p_clean"):
        scarce_target_task(10, 16, 16, 1.5, seed=0)


def test_load_task_builds_the_synthetic_task_from_spec():
    spec = DataSpec(n_general=300, n_target=8, n_eval=32, p_clean=0.5, seed=7)
    assert load_task(spec) == scarce_target_task(300, 8, 32, 0.5, seed=7)


# ------------------------------------------------------------------------------------------
# Files


ROWS = [Example("hello", " world"), Example("q: 2+2", " 4\nwith\ttabs and ünïcode")]


def write_jsonl(path, rows: list[dict], blank_lines: bool = False) -> None:
    lines = [json.dumps(r) for r in rows]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n")


def test_jsonl_round_trip_with_custom_keys(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"q": e.prompt, "a": e.response, "extra": 1} for e in ROWS], blank_lines=True)
    loaded = load_examples(p, prompt_key="q", response_key="a")
    assert loaded == [replace(e, extras={"extra": 1}) for e in ROWS]  # the other columns are kept


def test_parquet_round_trip(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": [e.prompt for e in ROWS], "response": [e.response for e in ROWS]}), p)
    assert load_examples(str(p)) == ROWS


def test_jsonl_missing_key_names_file_line_and_key(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"prompt": "a", "response": "b"}, {"prompt": "c", "completion": "d"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing key 'response' \(there are \['completion', 'prompt'\]; "
                                         r"data\.response_key names the key to read instead"):
        load_examples(p)


def test_jsonl_bad_rows_name_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        load_examples(p)
    p.write_text('["a", "b"]\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: expected a JSON object, got list"):
        load_examples(p)
    p.write_text('{"prompt": 3, "response": "b"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: key 'prompt' must be a string, got int"):
        load_examples(p)


def test_parquet_missing_column_and_null_cell(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "answer": ["b"]}), p)
    with pytest.raises(ValueError, match=r"d\.parquet: missing column 'response' \(there are \['answer', 'prompt'\]"):
        load_examples(p)
    pq.write_table(pa.table({"prompt": ["a", "c"], "response": ["b", None]}), p)
    with pytest.raises(ValueError, match=r"d\.parquet: row 2: missing key 'response'"):
        load_examples(p)


def test_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported extension '\.csv'"):
        load_examples(tmp_path / "d.csv")
    with pytest.raises(ValueError, match=r"nope\.jsonl: file not found"):
        load_examples(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: file holds no examples"):
        load_examples(empty)
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable parquet file"):
        load_examples(bad)


def test_load_task_from_files_uses_target_as_eval_when_no_eval_path(tmp_path):
    g, t, e = tmp_path / "g.jsonl", tmp_path / "t.jsonl", tmp_path / "e.parquet"
    write_jsonl(g, [{"prompt": "g", "response": " 1"}] * 3)
    write_jsonl(t, [{"prompt": "t", "response": " 2"}])
    pq.write_table(pa.table({"prompt": ["e"], "response": [" 3"]}), e)
    spec = DataSpec(task=None, general_path=str(g), target_path=str(t))
    splits = load_task(spec)
    assert (len(splits.general), splits.target, splits.eval) == (3, [Example("t", " 2")], [Example("t", " 2")])
    splits = load_task(spec.model_copy(update={"eval_path": str(e)}))
    assert splits.eval == [Example("e", " 3")]


# ------------------------------------------------------------------------------------------
# TRL conversational rows and extra columns

SYS, USER = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}
ANSWER = {"role": "assistant", "content": "4"}
# CHAT_TEMPLATE (drpt_ray.models) written out by hand: ChatML, then the assistant's turn opened
CHATML = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_trl_conversational_rows_load_with_their_extra_columns(tmp_path):
    """`messages` (the last, assistant message is the response) and TRL's prompt-completion with
    lists of messages; every other column is kept, JSONL and parquet alike."""
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"messages": [SYS, USER, ANSWER], "answer": 4, "meta": {"level": [1, 2]}},
                    {"prompt": [SYS, USER], "completion": [ANSWER], "difficulty": "easy"},
                    {"prompt": "plain", "completion": " text", "id": None}])
    want = [Example("", "4", messages=[SYS, USER], extras={"answer": 4, "meta": {"level": [1, 2]}}),
            Example("", "4", messages=[SYS, USER], extras={"difficulty": "easy"}),
            Example("plain", " text", extras={"id": None})]
    assert load_examples(p, response_key="completion") == want
    q = tmp_path / "d.parquet"
    pq.write_table(pa.table({"messages": [[SYS, USER, ANSWER]], "answer": [4]}), q)
    assert load_examples(q) == [Example("", "4", messages=[SYS, USER], extras={"answer": 4})]


def test_conversations_render_through_the_chat_template(tmp_path, tokenizer):
    from drpt_ray.data import render_chat

    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"messages": [SYS, USER, ANSWER]}, {"prompt": "Q", "response": "A"}])
    splits = render_chat(TaskSplits(general=load_examples(p), target=[], eval=[]), tokenizer)
    assert [e.prompt for e in splits.general] == [CHATML, "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"]
    assert splits.general[0].response == "4"
    # an earlier assistant turn stays in the prompt; only the last one is the response
    turns = [USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
             {"role": "assistant", "content": "6"}]
    write_jsonl(p, [{"messages": turns}])
    (e,) = render_chat(TaskSplits(general=load_examples(p), target=[], eval=[]), tokenizer).general
    assert (e.prompt, e.response) == ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
                                      "<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n", "6")


@pytest.mark.parametrize("row,why", [
    ({"messages": "hi"}, "d.jsonl:1: key 'messages' must be a non-empty list of {role, content} messages"),
    ({"messages": []}, "d.jsonl:1: key 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}, ANSWER]}, "d.jsonl:1: key 'messages', message 0: expected an object with "
                                               "string 'role' and 'content'"),
    ({"messages": [SYS, USER]}, "d.jsonl:1: key 'messages' must end with an assistant message (the response), "
                                "got role 'user'"),
    ({"messages": [ANSWER]}, "d.jsonl:1: key 'messages' holds only the response"),
    ({"prompt": [USER], "response": [ANSWER, ANSWER]}, "d.jsonl:1: key 'response' must hold one assistant message, "
                                                       "got 2"),
    ({"prompt": [USER], "response": [USER]}, "d.jsonl:1: key 'response' must end with an assistant message"),
    ({"prompt": [USER], "response": 4}, "d.jsonl:1: key 'response' must be a string, got int"),
    ({"question": "q", "response": "r"}, "d.jsonl:1: missing key 'prompt' (there are ['question', 'response']; "
                                         "data.prompt_key names the key to read instead"),
])
def test_bad_conversational_rows_name_the_line_and_key(tmp_path, row, why):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [row])
    with pytest.raises(ValueError, match=re.escape(why)):
        load_examples(p)


def test_an_extra_column_that_is_not_json_names_the_row_and_column(tmp_path):
    import datetime

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["x", "y"],
                             "when": [None, datetime.datetime(2020, 1, 1)]}), p)
    with pytest.raises(ValueError, match=r"d\.parquet: row 2: column 'when' holds a datetime, not a JSON value"):
        load_examples(p)


def test_conversations_with_the_chat_template_off_are_refused(tmp_path):
    g, t = tmp_path / "g.jsonl", tmp_path / "t.jsonl"
    write_jsonl(g, [{"prompt": "g", "response": "1"}])
    write_jsonl(t, [{"messages": [USER, ANSWER]}])
    spec = DataSpec(task=None, general_path=str(g), target_path=str(t))
    assert load_task(spec).conversational
    assert not load_task(spec.model_copy(update={"target_path": str(g)})).conversational
    with pytest.raises(ValueError, match=r"t\.jsonl: holds conversations .* data\.chat_template is false"):
        load_task(spec.model_copy(update={"chat_template": False}))


# ------------------------------------------------------------------------------------------
# Collation


@pytest.fixture(scope="module")
def tokenizer():
    from drpt_ray.models import build_tokenizer

    return build_tokenizer()


def ids(tok, text: str, special: bool) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def test_collate_masks_prompt_and_padding(tokenizer):
    rows = [Example("map:k,q->", "l,s"), Example("a much longer prompt than the other", " x")]
    batch = tokenize_sft(tokenizer, rows, max_len=64)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long for v in batch.values())
    width = max(len(ids(tokenizer, r.prompt, True)) + len(ids(tokenizer, r.response, False)) + 1 for r in rows)
    assert batch["input_ids"].shape == (2, width)
    for i, r in enumerate(rows):
        p, resp = ids(tokenizer, r.prompt, True), ids(tokenizer, r.response, False) + [eos]
        n = len(p) + len(resp)
        assert batch["input_ids"][i, :n].tolist() == p + resp
        assert batch["input_ids"][i, n:].tolist() == [pad] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][i].tolist() == [IGNORE_INDEX] * len(p) + resp + [IGNORE_INDEX] * (width - n)


def test_synthetic_format_tokenizes_one_token_per_letter(tokenizer):
    """Separate tokenization equals joint tokenization, and each letter is one token of its own."""
    letter_ids = {c: ids(tokenizer, c, False) for c in LETTERS}
    assert all(len(v) == 1 for v in letter_ids.values()) and len({v[0] for v in letter_ids.values()}) == 26
    for e in scarce_target_task(100, 16, 16, 0.3, seed=0).general:
        x, y, a, b = fields(e)
        prompt, response = ids(tokenizer, e.prompt, True), ids(tokenizer, e.response, False)
        assert prompt + response == ids(tokenizer, e.prompt + e.response, True)
        assert letter_ids[x][0] in prompt and letter_ids[y][0] in prompt
        layout = [",", ""] if kind(e) != "format" else [";", "."]
        tail = ids(tokenizer, layout[1], False) if layout[1] else []
        assert response == letter_ids[a] + ids(tokenizer, layout[0], False) + letter_ids[b] + tail


def test_supervised_token_counts_match_a_hand_count(tokenizer):
    rows = [Example("map:k,q->", "l,s"), Example("hi", " a b c d"), Example("x", "")]
    batch = tokenize_sft(tokenizer, rows, max_len=64)
    resp_lens = [len(ids(tokenizer, r.response, False)) + 1 for r in rows]  # + eos
    assert supervised_token_counts(batch["labels"]).tolist() == resp_lens
    # The shift: a label at position 0 is never predicted, so it is not counted.
    labels = torch.tensor([[5, 6, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 7]])
    assert supervised_token_counts(labels).tolist() == [1, 1]


def test_truncation_drops_prompt_tokens_from_the_left(tokenizer):
    row = Example("one two three four five six seven eight", " a b")
    p, resp = ids(tokenizer, row.prompt, True), ids(tokenizer, row.response, False) + [tokenizer.eos_token_id]
    max_len = len(resp) + 3
    assert len(p) > 3
    batch = tokenize_sft(tokenizer, [row], max_len=max_len)
    assert batch["input_ids"][0].tolist() == p[-3:] + resp
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 3 + resp
    # The response with eos plus one prompt token must fit.
    assert tokenize_sft(tokenizer, [row], max_len=len(resp) + 1)["input_ids"].shape == (1, len(resp) + 1)
    with pytest.raises(ValueError, match="no room for a prompt token"):
        tokenize_sft(tokenizer, [row], max_len=len(resp))


def test_collate_rejects_empty_batch(tokenizer):
    with pytest.raises(ValueError, match="at least one example"):
        tokenize_sft(tokenizer, [], max_len=8)
