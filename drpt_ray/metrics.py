"""Where metrics go: one dict per step to metrics.jsonl, TensorBoard and a callback (the stream the
control plane follows), plus the end-of-run plot."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO

# Shown on the progress bar (under these short names) and plotted, when present.
HEADLINE = {"loss": "loss", "reward/reward_mean": "reward", "eval/target_loss": "eval_loss",
            "eval/target_reward": "eval_reward", "eval/target_exact": "eval_exact",
            "target/reward_mean": "target_reward"}


def progress_postfix(metrics: dict) -> dict[str, str]:
    """The headline metrics of one step, as a progress bar shows them."""
    return {HEADLINE[k]: f"{v:.3f}" for k, v in metrics.items() if k in HEADLINE and isinstance(v, (int, float))}


def markdown_table(rows: list[dict]) -> str:
    """Rows of a samples table as Markdown (TensorBoard renders it), cells escaped to stay one cell."""
    def cell(v) -> str:
        if isinstance(v, dict):  # a row's per-function scores
            v = ", ".join(f"{k} {x:.3f}" for k, x in v.items())
        text = "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")

    cols = ["group", "prompt", "response", "reward", "advantage", "parts"]
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows])


class PhaseTimer:
    """Wall seconds per named phase of one step (`time/<phase>`); a phase entered twice adds up."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        """Every phase's seconds, and `time/step`: the whole step since the timer was made."""
        return {**{f"time/{k}": v for k, v in self.seconds.items()}, "time/step": time.perf_counter() - self.start}


def _reopened(path: Path, resume_step: int) -> tuple[list[dict], TextIO]:
    """The lines of `path` up to `resume_step` (a crashed run's later ones dropped), and `path` open to append."""
    kept = []
    if resume_step and path.exists():
        lines = filter(str.strip, path.read_text().splitlines())
        kept = [m for m in map(json.loads, lines) if m["step"] <= resume_step]
    path.write_text("".join(json.dumps(m) + "\n" for m in kept))
    return kept, open(path, "a")


class MetricLogger:
    """Append-only step metrics and samples tables; on resume, lines after `resume_step` (from a
    crashed run) are dropped."""

    def __init__(self, out: Path, tensorboard: bool, callback: Callable[[dict], None] | None, resume_step: int = 0,
                 on_samples: Callable[[int, list[dict]], None] | None = None):
        self.path = out / "metrics.jsonl"
        self.history, self._file = _reopened(self.path, resume_step)
        _, self._samples = _reopened(out / "samples.jsonl", resume_step)
        self.on_samples = on_samples
        self.callback = callback
        self.headline = HEADLINE
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tb"), purge_step=resume_step or None)

    def write(self, metrics: dict) -> None:
        self.history.append(metrics)
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, metrics["step"])
        if self.callback is not None:
            self.callback(metrics)

    def write_samples(self, step: int, rows: list[dict]) -> None:
        """One samples table: a line per row in samples.jsonl, a Markdown table per split in
        TensorBoard's text tab, and the callback (the stream)."""
        if not rows:
            return
        self._samples.write("".join(json.dumps({"step": step, **r}) + "\n" for r in rows))
        self._samples.flush()
        if self._tb is not None:
            for split in dict.fromkeys(r["split"] for r in rows):
                self._tb.add_text(f"samples/{split}", markdown_table([r for r in rows if r["split"] == split]), step)
        if self.on_samples is not None:
            self.on_samples(step, rows)

    def close(self) -> None:
        self._file.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()

    def plot(self, path: Path, title: str) -> None:
        """One panel per headline metric present in the history."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in self.headline if any(k in m for m in self.history)]
        if not keys:
            return
        fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            pts = [(m["step"], m[key]) for m in self.history if key in m]
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o" if len(pts) < 40 else None, ms=3)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
