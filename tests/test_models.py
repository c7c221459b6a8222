"""Tokenizer, tiny random models and the loading path (drpt_ray.models), including one real vLLM CPU engine."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

# Offline and small before anything imports huggingface_hub or vLLM (both read these once).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpt_ray import models
from drpt_ray.config import LoraSpec, ModelSpec, TinyModelSpec
from drpt_ray.models import build_tokenizer, load_model, model_dir, tiny_model

# --------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "12+7=19",
        "What is 3 times 4? 3*4=12",
        "Hello, World! (a-b) [x]; {y}: \"quoted\" 'single' 100% #1 @home & more_",
        "  leading spaces, tabs\tand\nnewlines  ",
        "unseen words: zyzzyva quixotic; non-ASCII: café, 日本",
    ],
)
def test_tokenizer_round_trips(text: str) -> None:
    tok = build_tokenizer()
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert all(0 <= i < len(tok) for i in ids)


def test_every_digit_and_letter_is_one_token() -> None:
    tok = build_tokenizer()
    for ch in "0123456789abcdefghijklmnopqrstuvwxyz":
        ids = tok(ch)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [ch], ch
    # Numbers are split into digits, so "2024" and "19" share the digit tokens.
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]


def test_special_tokens_and_chat_template() -> None:
    tok = build_tokenizer()
    assert len(tok) == models.VOCAB_SIZE
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 0)
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 3)
    assert tok.bos_token is None
    assert tok.padding_side == "right"
    for want_id, special in enumerate(models.SPECIAL_TOKENS):
        assert tok(special)["input_ids"] == [want_id]  # one token, never split into bytes
    assert len(tok("a b")["input_ids"]) == 2  # nothing (no bos/eos) is added around the text

    messages = [{"role": "user", "content": "2+2=?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n2+2=?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1


def test_tokenizer_is_deterministic_and_fresh_per_call() -> None:
    a, b = build_tokenizer(), build_tokenizer()
    assert a is not b
    a.padding_side = "left"
    assert b.padding_side == "right"  # callers do not share mutable state
    assert a.get_vocab() == b.get_vocab()

    # Retraining gives the same tokenizer, in this process and in another one (Ray workers are processes).
    json_here = models._tokenizer_json()
    assert models._tokenizer_json.__wrapped__() == json_here
    code = (
        "import hashlib; from drpt_ray.models import _tokenizer_json as t; "
        "print(hashlib.sha1(t().encode()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == hashlib.sha1(json_here.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Tiny model


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_directory_loads_with_transformers(tmp_path: Path, arch: str) -> None:
    spec = TinyModelSpec(arch=arch)
    rng_before = torch.random.get_rng_state()
    path = tiny_model(tmp_path / "m", spec)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched

    assert path == tmp_path / "m"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left

    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == arch
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (512, 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (2, 1, 512)
    assert cfg.hidden_size // cfg.num_attention_heads % 16 == 0  # vLLM CPU attention
    assert not cfg.tie_word_embeddings
    assert not torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 0, 3)
    assert model.dtype == torch.float32
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 200_000

    tok = AutoTokenizer.from_pretrained(path)
    text = "<|im_start|>user\n12+7=?<|im_end|>\n"
    assert tok(text)["input_ids"] == build_tokenizer()(text)["input_ids"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"

    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0  # random weights, not zeros


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_weights_follow_the_seed(tmp_path: Path, arch: str) -> None:
    a = _weights(tiny_model(tmp_path / "a", TinyModelSpec(arch=arch, seed=1)))
    b = _weights(tiny_model(tmp_path / "b", TinyModelSpec(arch=arch, seed=1)))
    c = _weights(tiny_model(tmp_path / "c", TinyModelSpec(arch=arch, seed=2)))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Every randomly initialised matrix differs (norm weights are ones for any seed).
    random_keys = [k for k in a if a[k].ndim == 2]
    assert random_keys and not any(torch.equal(a[k], c[k]) for k in random_keys)


def test_tiny_model_reuses_a_matching_directory_and_rebuilds_otherwise(tmp_path: Path) -> None:
    out = tmp_path / "m"
    tiny_model(out, TinyModelSpec(seed=0))
    weights = out / "model.safetensors"
    first = weights.stat().st_mtime_ns
    tiny_model(out, TinyModelSpec(seed=0))
    assert weights.stat().st_mtime_ns == first  # reused, not rewritten

    seed0 = _weights(out)
    tiny_model(out, TinyModelSpec(seed=5))
    assert not torch.equal(_weights(out)["lm_head.weight"], seed0["lm_head.weight"])
    fresh = _weights(tiny_model(tmp_path / "fresh", TinyModelSpec(seed=5)))
    assert all(torch.equal(_weights(out)[k], fresh[k]) for k in fresh)

    tiny_model(out, TinyModelSpec(seed=5), dtype=torch.bfloat16)
    assert _weights(out)["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(_weights(out)["lm_head.weight"], fresh["lm_head.weight"].to(torch.bfloat16))


# --------------------------------------------------------------------------------------------
# load_model / model_dir


def test_load_model_tiny_full_finetune(tmp_path: Path) -> None:
    model, tok = load_model(ModelSpec(dtype="float64"), tmp_path)
    assert model_dir(ModelSpec(), tmp_path) == tmp_path / "tiny-model"
    assert model.dtype == torch.float64
    assert model.config._attn_implementation == "eager"
    assert all(p.requires_grad for p in model.parameters())
    assert (tok.pad_token_id, tok.padding_side) == (3, "right")

    batch = tok(["1+1=2", "12+7=19 and more"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, -1] == 0  # right padding: the short row ends in pad
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.dtype == torch.float64 and torch.isfinite(out.loss)


def _lora_params(r: int, linears: list[torch.nn.Linear]) -> int:
    return sum(r * (m.in_features + m.out_features) for m in linears)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_load_model_lora_trains_only_adapters(tmp_path: Path, targets: str | list[str]) -> None:
    spec = ModelSpec(lora=LoraSpec(r=4, alpha=8, target_modules=targets))
    model, _ = load_model(spec, tmp_path)
    assert isinstance(model, PeftModel)

    base, _ = load_model(ModelSpec(), tmp_path)
    wanted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if targets != "all-linear":
        wanted = tuple(targets)
    linears = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(wanted)]
    assert len(linears) == 2 * len(wanted)  # 2 layers; lm_head never gets an adapter

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == _lora_params(4, linears)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert sum(p.numel() for p in frozen) == sum(p.numel() for p in base.parameters())
    assert not any(p.requires_grad for p in frozen)

    # LoRA B starts at zero, so the adapted model computes exactly the base model.
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("path", ["./no/such/model", "/definitely/not/here", "~/missing-model-dir"])
def test_missing_local_path_is_a_value_error(tmp_path: Path, path: str) -> None:
    with pytest.raises(ValueError, match=r"model\.path"):
        load_model(ModelSpec(path=path), tmp_path)


def test_hub_name_resolves_through_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tiny_model(tmp_path / "snapshot")
    calls: list[str] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append(repo_id)
        return str(local)

    monkeypatch.setattr(models, "snapshot_download", fake_snapshot_download)
    assert model_dir(ModelSpec(path="some-org/some-model"), tmp_path) == local
    model, _ = load_model(ModelSpec(path="some-org/some-model"), tmp_path)
    assert calls == ["some-org/some-model"] * 2 and model.config.model_type == "llama"

    def offline(repo_id: str, **kwargs: object) -> str:
        raise OSError("offline and not in the cache")

    monkeypatch.setattr(models, "snapshot_download", offline)
    with pytest.raises(ValueError, match=r"model\.path.*some-org/other.*offline and not in the cache"):
        model_dir(ModelSpec(path="some-org/other"), tmp_path)


# --------------------------------------------------------------------------------------------
# vLLM


@pytest.mark.slow
def test_vllm_greedy_matches_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_model(tmp_path / "tiny-llama", TinyModelSpec(arch="llama"))
    tok = build_tokenizer()
    prompt = "What is 3 times 4? 3*4="
    prompt_ids = tok(prompt)["input_ids"]

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False)
    hf_ids = hf_out[0, len(prompt_ids) :].tolist()

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes most of the RAM
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: seconds, not tens
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VLLM_DIST_IDENT", "")  # the in-process engine sets it; restored afterwards
    # Engine leftovers (sockets, compiled kernels) go to a temporary directory of this test.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    # The CPU worker replaces torch.set_num_threads process-wide with a no-op; put it back after the test.
    monkeypatch.setattr(torch, "set_num_threads", torch.set_num_threads)

    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = LLM(model=str(path), dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=8)
        from_ids = llm.generate([{"prompt_token_ids": prompt_ids}], params)[0]
        from_text = llm.generate([prompt], params)[0]
    finally:
        del llm
        cleanup_dist_env_and_memory()

    assert from_text.prompt_token_ids == prompt_ids  # vLLM tokenizes with the saved tokenizer
    assert len(hf_ids) == 8  # no early eos, so all 8 greedy steps are compared
    assert list(from_ids.outputs[0].token_ids) == hf_ids
    assert list(from_text.outputs[0].token_ids) == hf_ids
    # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence (random bytes here).
    text = from_text.outputs[0].text
    assert text and tok.decode(hf_ids, skip_special_tokens=True).startswith(text)
