"""bench/gpu_overhead.py at a tiny shape on CPU: what the GPU run will execute, minus the GPU."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_overhead  # noqa: E402  (a bench script, not a package)


def test_every_variant_runs_for_lora_and_full_fine_tuning(tmp_path):
    out = tmp_path / "gpu.md"
    report = gpu_overhead.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--seq", "16", "--rows", "4",
                                "--target-rows", "2", "--lora-r", "2", "--warmup", "0", "--repeats", "1",
                                "--out", str(out)])
    assert out.read_text() == report
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| LoRA") or line.startswith("| full")]
    assert len(rows) == 2 * 6
    by = {(r[0].strip("| "), r[1]): r for r in rows}
    for trained in ("LoRA r 2", "full fine-tuning"):
        assert by[trained, "plain, same rows"][4] == "1.00"  # the fair baseline against itself
        for variant in ("layer-wise, merged", "global one-pass, separate"):
            assert float(by[trained, variant][2]) > 0 and float(by[trained, variant][5]) > 1  # a bound above plain
    # LoRA's hooked blocks are the small adapters: its bound is closer to 1 than full fine-tuning's
    assert float(by["LoRA r 2", "layer-wise, merged"][5]) < float(by["full fine-tuning", "layer-wise, merged"][5])
