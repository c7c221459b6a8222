"""examples/custom_task/ runs end to end from its README, as a newcomer would run it: the bash
block's commands, in order, from a copy of the example (so the repository is left as it is), each
exiting 0, the two runs each writing a full curve of held-out evaluations (the README's table) and
counting no reward error (its reward module imported from beside the spec)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_task"

pytestmark = pytest.mark.slow


def readme_commands() -> list[list[str]]:
    """The README's first bash block: continuation lines joined, comments and a pager dropped, the
    `.venv/bin/` programs run by this test's Python."""
    block = re.search(r"```bash\n(.*?)```", (EXAMPLE / "README.md").read_text(), re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line.split("|")[0], comments=True)
        if not argv:
            continue
        program = argv[0].removeprefix(".venv/bin/")
        prefix = {"python": [sys.executable], "drpt-ray": [sys.executable, "-m", "drpt_ray.cli"]}[program]
        commands.append(prefix + argv[1:])
    return commands


def test_the_custom_task_readme_runs_end_to_end(tmp_path):
    shutil.copytree(EXAMPLE, tmp_path / "examples" / "custom_task",
                    ignore=shutil.ignore_patterns("*.jsonl", "__pycache__"))
    commands = readme_commands()
    assert len(commands) == 4, commands  # make data, config show, the layer-wise run, the full run
    outputs = []
    for argv in commands:
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, f"{shlex.join(argv)} exited {done.returncode}:\n{outputs[-1][-3000:]}"
    for name in ("general", "target", "eval"):
        assert (tmp_path / "examples" / "custom_task" / f"{name}.jsonl").stat().st_size > 0
    assert "\nregularizer:\n  feasible_set: " in outputs[1]  # config show printed the schema
    for run in ("layerwise", "full"):
        history = [json.loads(line) for line in (tmp_path / "runs" / "custom_task" / run / "metrics.jsonl").open()]
        evals = [m["step"] for m in history if "eval/target_reward" in m]
        assert evals == [0, 20, 40, 60], (run, evals)
        assert sum(m.get("reward/errors", 0) + m.get("target/errors", 0) for m in history) == 0
        assert (tmp_path / "runs" / "custom_task" / run / "curves.png").is_file()
    for said in outputs[2:]:
        assert "verdict:" in said and "reward errors" not in said
