"""Test-wide environment: offline hub, bounded vLLM memory, in-process engines, a private TMPDIR.

Set before anything imports transformers, vLLM or Ray (they read these at import time).
"""

import os
import tempfile
from pathlib import Path

_TMP = Path(__file__).resolve().parent.parent / ".tmp"
_TMP.mkdir(exist_ok=True)
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "TMPDIR": str(_TMP),
}.items():
    os.environ.setdefault(key, value)
tempfile.tempdir = os.environ["TMPDIR"]
