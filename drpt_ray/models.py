"""Models and tokenizers: a tiny random causal LM built in code, and the one loading path.

Everything here works offline. `tiny_model` writes an ordinary Hugging Face directory (safetensors weights,
`config.json`, `tokenizer.json`) so that the trainer (transformers) and the rollout workers (vLLM) load the very
same files. `load_model` is the trainer's entry point; `model_dir` is the rollout workers'.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from drpt_ray.config import ModelSpec, TinyModelSpec

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<pad>"
# Order fixes the ids: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2, <pad>=3.
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END, PAD_TOKEN)

VOCAB_SIZE = 512
MAX_POSITIONS = 512

# ChatML, as used by Qwen2: each turn is "<|im_start|>{role}\n{content}<|im_end|>\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_MARKER = "drpt_tiny_model.json"
# What a local model directory must hold for the learner and vLLM to load it.
_REQUIRED_FILES = {
    "config (config.json)": ("config.json",),
    "tokenizer (tokenizer.json, tokenizer_config.json or tokenizer.model)": (
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model"),
}
# A hub repo id: "org/name" with no leading "." or "/" (those are local paths).
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Formats the trainer and vLLM never read; skipping them keeps hub downloads to the PyTorch files.
_HUB_IGNORE = ["*.gguf", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.ot", "*.tflite", "original/*"]


# --------------------------------------------------------------------------------------------
# Tokenizer


def _corpus() -> list[str]:
    """A deterministic training corpus: English prose, letters, punctuation and small-number arithmetic.

    It only has to yield useful merges; byte-level BPE can encode any text whatever the corpus.
    """
    prose = [
        "The quick brown fox jumps over the lazy dog.",
        "A model learns from data, and the data shapes the model.",
        "Question: what is the answer? Answer: the answer is below.",
        "Please think step by step, then write the final answer.",
        "We train the policy with rewards from a verifier.",
        "She said: \"Hello, world!\" and he replied: 'Hi there.'",
        "Lists use commas, semicolons; colons: and dashes - like this.",
        "Is it true? Yes! No... maybe (or perhaps [not]) {at all}.",
        "The user asks a question and the assistant gives an answer.",
        "Good answers are short, correct and easy to check.",
        "Once upon a time, there was a little girl who loved to read.",
        "Every morning she walked to school with her brother and their dog.",
        "The weather was cold, so they wore warm coats and hats.",
        "In the afternoon the children played games in the park.",
        "At night the family ate dinner together and talked about the day.",
        "Numbers can be added, subtracted, multiplied and divided.",
        "This is a test of the system; it should work without errors.",
        "If you are not sure, you can always ask for more information.",
        "The sun rises in the east and sets in the west.",
        "Water boils at one hundred degrees and freezes at zero.",
    ]
    subjects = ["the cat", "a dog", "the teacher", "my friend", "the student", "a robot", "the model", "our team"]
    verbs = ["reads", "writes", "finds", "counts", "checks", "likes", "solves", "learns"]
    adjectives = ["small", "large", "simple", "difficult", "happy", "green", "new", "important"]
    nouns = ["book", "number", "answer", "word", "problem", "letter", "question", "story"]
    # 64 subject-verb pairs x 8 nouns = 512 short sentences (adjectives rotate): the repeated words give
    # the frequent pairs that BPE merges.
    prose += [
        f"{s.capitalize()} {v} a {adjectives[(i + j) % len(adjectives)]} {n}."
        for i, (s, v) in enumerate(itertools.product(subjects, verbs))
        for j, n in enumerate(nouns)
    ]
    letters = "abcdefghijklmnopqrstuvwxyz"
    symbols = [letters, letters.upper(), " ".join(letters), "0 1 2 3 4 5 6 7 8 9", ".,;:!?'\"()[]{}-+*/=<>%$#@&_"]
    arithmetic = [f"{a}+{b}={a + b}" for a in range(20) for b in range(20)]
    arithmetic += [f"What is {a} times {b}? {a}*{b}={a * b}" for a in range(1, 13) for b in range(1, 13)]
    return prose + symbols + arithmetic


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the BPE once per process and keep its serialized form (an immutable string)."""
    tok = Tokenizer(models.BPE())
    # Digits are split one per token (as Llama and Qwen do) so arithmetic answers compare digit by digit;
    # ByteLevel then maps every byte to a symbol, which makes any UTF-8 text encodable.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer of the tiny models, trained in code on a fixed corpus.

    Training runs once per process (cached); each call returns a new tokenizer object, so a caller may change
    settings such as `padding_side` without affecting anyone else. Ids are the same on every call and in
    every process: `<|endoftext|>` (eos) = 0, `<|im_start|>` = 1, `<|im_end|>` = 2, `<pad>` (pad) = 3.
    No bos token is added when encoding. `apply_chat_template` renders ChatML.

    Returns:
        A `PreTrainedTokenizerFast` with `VOCAB_SIZE` (512) tokens and right padding.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
    )


# --------------------------------------------------------------------------------------------
# Tiny random model


def _tiny_config(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.arch]
    return config_cls(
        # A multiple of 64 keeps the embedding and lm_head shapes friendly to vectorised kernels.
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        # Separate input and output embeddings: each is an ordinary weight matrix the regularizer can hook.
        tie_word_embeddings=False,
        # The tokenizer has no bos token; like Qwen2, <|endoftext|> doubles as bos.
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_model(
    out_dir: Path | str, spec: TinyModelSpec | None = None, dtype: torch.dtype = torch.float32
) -> Path:
    """Build a small random Llama or Qwen2 with the tokenizer of `build_tokenizer` and save both to `out_dir`.

    The weights depend only on `spec` (seeded by `spec.seed`; the caller's RNG state is left untouched).
    The directory loads with `AutoModelForCausalLM.from_pretrained` and with vLLM
    (`LLM(model=out_dir, dtype="float32", enforce_eager=True)`; vLLM's CPU attention also needs
    `hidden_size / num_heads` to be a multiple of 16). A marker file records the spec and dtype: a directory
    already built from the same ones is reused as is. Files are written to a temporary directory and moved in
    one by one, marker last, so a concurrent reader (another Ray worker) never sees a half-written file.

    Args:
        out_dir: Directory to write; created if needed.
        spec: Architecture, sizes and seed; `TinyModelSpec()` when None.
        dtype: Dtype of the saved weights.

    Returns:
        `out_dir` as a `Path`.
    """
    spec = spec or TinyModelSpec()
    out_dir = Path(out_dir)
    marker = {"spec": spec.model_dump(), "dtype": str(dtype).removeprefix("torch.")}
    if read_marker(out_dir, _MARKER) == marker:
        return out_dir

    tokenizer = build_tokenizer()
    config = _tiny_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Initialise in float32 and cast after, so every dtype rounds the same random weights.
    model.to(dtype)

    return save_model_dir(out_dir, _MARKER, marker, model, tokenizer)


def read_marker(out_dir: Path, name: str) -> object:
    """The marker `save_model_dir` wrote under `name`, or None when absent or unreadable."""
    try:
        return json.loads((Path(out_dir) / name).read_text())
    except (OSError, ValueError):
        return None


def save_model_dir(
    out_dir: Path, marker_name: str, marker: dict, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> Path:
    """Write `model` and `tokenizer` to `out_dir` as a Hugging Face directory, marker file last.

    Files are written to a temporary directory and moved in one by one, marker last, so a
    concurrent reader (another Ray worker) never sees a half-written file and a killed writer
    leaves no marker: the next call with the same marker rebuilds instead of trusting the files.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # A sibling temporary directory is on the same filesystem, so each os.replace is an atomic rename.
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / marker_name).write_text(json.dumps(marker, indent=2))
        (out_dir / marker_name).unlink(missing_ok=True)  # the directory is not valid while files are swapped
        for f in sorted(Path(tmp).iterdir(), key=lambda p: p.name == marker_name):
            os.replace(f, out_dir / f.name)
    return out_dir


# --------------------------------------------------------------------------------------------
# Loading


def model_dir(spec: ModelSpec, work_dir: Path | str) -> Path:
    """The local directory holding the model of `spec`: what the trainer and vLLM both load.

    Args:
        spec: `spec.path` is a local directory or a hub repo id (`org/name`); None means the tiny model of
            `spec.tiny`, built (once) under `work_dir / "tiny-model"`.
        work_dir: Run directory; only used for the tiny model.

    Returns:
        The model directory. A hub id resolves to its snapshot in the Hugging Face cache, downloaded if
        missing (or read from the cache only, with `HF_HUB_OFFLINE=1`).

    Raises:
        ValueError: `spec.path` is neither an existing directory nor a hub id that can be fetched.
    """
    if spec.path is None:
        return tiny_model(Path(work_dir) / "tiny-model", spec.tiny)
    local = Path(spec.path).expanduser()
    if local.is_dir():
        missing = [what for what, names in _REQUIRED_FILES.items() if not any((local / n).exists() for n in names)]
        if missing:
            raise ValueError(f"model.path: {local} has no {' and no '.join(missing)}: not a Hugging Face "
                             "model directory")
        return local
    if not _HUB_NAME.match(spec.path):
        raise ValueError(f"model.path: {spec.path!r} is neither an existing directory nor a hub name 'org/name'")
    try:
        return Path(snapshot_download(spec.path, ignore_patterns=_HUB_IGNORE))
    except Exception as e:  # offline, unknown repo, gated repo, network: all mean "cannot load this path"
        raise ValueError(
            f"model.path: {spec.path!r} is not a local directory and could not be fetched from the hub: {e}"
        ) from e


def load_model(
    spec: ModelSpec, work_dir: Path | str, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """Load the model and tokenizer of `spec` for training.

    Attention is "eager": the math path gives exact per-example gradients under `torch.func` and runs in
    float64, which fused kernels do not. The tokenizer pads on the right (the training layout) and falls back
    to eos as pad token when it has none.

    Args:
        spec: Model path (or tiny model), dtype and optional LoRA settings.
        work_dir: Run directory; the tiny model is built under it when `spec.path` is None.
        device: Where the model goes.

    Returns:
        `(model, tokenizer)`. With `spec.lora` the model is a `PeftModel` whose only trainable parameters are
        the adapters; otherwise every parameter is trainable. The model is in eval mode, as
        `from_pretrained` leaves it.

    Raises:
        ValueError: `spec.path` cannot be resolved (see `model_dir`).
    """
    path = model_dir(spec, work_dir)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, spec.dtype), attn_implementation="eager"
    ).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if spec.lora is not None:
        lora = spec.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model, tokenizer
