"""Test-wide environment: offline hub, bounded vLLM memory, in-process engines, a private TMPDIR.

Set before anything imports transformers, vLLM or Ray (they read these at import time).
"""

import os
import tempfile
from pathlib import Path

from drpt_ray.topology import apply_driver_env

_TMP = Path(__file__).resolve().parent.parent / ".tmp"
_TMP.mkdir(exist_ok=True)
apply_driver_env()
for key, value in {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # in-process engines of the tests; a worker's own comes from rollout.kv_cache_gib
    "TMPDIR": str(_TMP),
}.items():
    os.environ.setdefault(key, value)
tempfile.tempdir = os.environ["TMPDIR"]
