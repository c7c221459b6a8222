"""The logging setup that silences vLLM's CPU start-up warnings drops only the named lines: any
other warning, and every error, still prints; and vLLM itself loads it from the file that
`quiet_vllm` names (VLLM_LOGGING_CONFIG_PATH), as a rollout engine does when it starts."""

from __future__ import annotations

import logging
import os

from drpt_ray.quiet import KNOWN_VLLM_NOISE, quiet_vllm


def test_vllm_loads_the_filter_that_drops_only_the_named_warnings(tmp_path, capsys, monkeypatch):
    from vllm.logger import _configure_vllm_root_logger  # what an engine start runs (configure_logging)

    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    quiet_vllm("WARNING", tmp_path)
    assert os.environ["VLLM_LOGGING_CONFIG_PATH"] == str(tmp_path / "vllm-logging.json")
    try:
        _configure_vllm_root_logger()
        child = logging.getLogger("vllm.platforms.cpu")  # children log through the "vllm" handler
        child.warning("libtcmalloc %s", "is not found in LD_PRELOAD. For best performance ...")
        child.warning("CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding")
        child.info("an INFO line below the level")
        child.warning("KV cache is larger than the memory left")  # not a known line: kept
        child.error("Triton is not installed: and this failed")  # an error: kept whatever it says
        out = capsys.readouterr().out.splitlines()
        assert [line.split("] ", 1)[1] for line in out] == [
            "KV cache is larger than the memory left", "Triton is not installed: and this failed"]
        assert out[0].startswith("WARNING ") and out[1].startswith("ERROR ")
        assert len(KNOWN_VLLM_NOISE) == len(set(KNOWN_VLLM_NOISE))
    finally:
        monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH")
        _configure_vllm_root_logger()  # vLLM's default logging again for the tests after this one
