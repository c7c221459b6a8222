"""SFT with the regularizer: schedule, sampling, one curated-and-clipped step, a short real run, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from drpt_ray.cli import main
from drpt_ray.config import JobSpec, OptimSpec
from drpt_ray.data import load_task, tokenize_sft
from drpt_ray.learner import Learner, lr_factor
from drpt_ray.trainer import run_job


def test_lr_schedule_by_hand():
    spec = OptimSpec(warmup_frac=0.1, schedule="linear")
    # 100 steps: warmup 10 steps ramps 0.1 .. 1.0, then linear decay to 0 over the remaining 90
    assert [lr_factor(s, 100, spec) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, 100, spec) == pytest.approx(1.0)
    assert lr_factor(55, 100, spec) == pytest.approx(0.5)
    cos = OptimSpec(warmup_frac=0.0, schedule="cosine")
    assert [lr_factor(s, 100, cos) for s in (0, 50)] == pytest.approx([1.0, 0.5])
    assert lr_factor(70, 100, OptimSpec(warmup_frac=0.0, schedule="constant")) == 1.0


def test_step_clips_the_curated_gradient(tmp_path):
    spec = JobSpec(output_dir=str(tmp_path), optim=OptimSpec(max_grad_norm=1e-4))
    learner = Learner(spec)
    splits, tok = load_task(spec.data), learner.tokenizer
    general = tokenize_sft(tok, splits.general[:8], 64)
    target = tokenize_sft(tok, splits.target[:1], 64)
    m = learner.sft_step(general, target)
    learner.remove()
    post = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in learner.policy.parameters() if p.grad is not None))
    assert m["grad_norm"] > 1e-3  # the curated gradient was much larger ...
    assert float(post) <= 1e-4 * (1 + 1e-3)  # ... and the optimizer saw it clipped
    assert m["reg/kept_frac_mean"] == pytest.approx(0.5)  # top-k 0.5 of 8 in every layer
    # the reported cosine is that of the applied update with g_T over the hooked weights (clipping
    # rescales the update, not its direction), computed here by hand from .grad and the cached g_T
    pairs = [(getattr(b, part).grad, g) for b, t in learner.reg.targets.items() for part, g in t.parts().items()]
    dot, nd, nt = (sum(float((x.double() * y.double()).sum())
                       for x, y in ((a if i else b, a if j else b) for a, b in pairs))
                   for i, j in ((True, False), (True, True), (False, False)))
    assert m["reg/cos"] == pytest.approx(dot / (nd * nt) ** 0.5, rel=1e-6)
    assert m["target_loss"] > 0


@pytest.mark.parametrize("target_mode", ["separate", "merged"])
def test_short_run_learns_and_writes_artifacts(tmp_path, target_mode):
    spec = JobSpec(
        steps=60, eval_every=30, output_dir=str(tmp_path), progress=False, eval_generate=12,
        regularizer={"feasible_set": "layerwise_subset", "target_mode": target_mode},
    )
    r = run_job(spec)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(0, 61))
    evals = [m["eval/target_loss"] for m in lines if "eval/target_loss" in m]
    assert len(evals) == 3 and evals[-1] < 0.6 * evals[0]  # steps 0, 30, 60
    assert all(m["reg/kept_frac_min"] == pytest.approx(0.5) for m in lines[1:])
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert r.final["eval/target_loss"] == evals[-1]
    assert 0.0 <= r.final["eval/target_exact"] <= 1.0
    assert len([m for m in lines if "eval/target_exact" in m]) == 3


def _write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize(
    "cfg,needle",
    [
        ({"regularizer": {"feasible_set": "nope"}}, "regularizer.feasible_set"),
        ({"regularizer": {"frac": 1.5}}, "regularizer.frac"),
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"stepz": 3}, "stepz"),
        ({"model": {"path": "/no/such/dir"}}, "model.path"),
    ],
)
def test_cli_rejects_bad_config_naming_the_key(tmp_path, capsys, cfg, needle):
    code = main(["sft", str(_write(tmp_path, {"output_dir": str(tmp_path / "o"), **cfg}))])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_cli_missing_file(capsys):
    assert main(["sft", "/no/such.yaml"]) == 2
    assert "not found" in capsys.readouterr().err


def test_console_script_runs_a_config(tmp_path):
    cfg = _write(tmp_path, {"steps": 5, "eval_every": 5, "progress": False, "output_dir": str(tmp_path / "o")})
    exe = Path(sys.executable).parent / "drpt-ray"
    res = subprocess.run([str(exe), "sft", str(cfg)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "eval/target_loss" in res.stdout and "summary" in res.stdout


def _curve(values, every=100):
    return [(i * every, v) for i, v in enumerate(values)]


@pytest.mark.parametrize("values, losses, outcome, plateau", [
    # full training on scarce_target, seed 0 (bench/README.md): learns by step 300
    ([6.17, 1.82, 0.86, 0.37, 0.31, 0.24, 0.28, 0.24, 0.22, 0.27, 0.22], None, "learned", 0),
    # the layer-wise seed 0: 1.77 at step 100, then ~1.64-1.8 for the rest of the run
    ([6.17, 1.77] + [1.70, 1.75, 1.72, 1.74] * 7, None, "stalled", 2800),
    # a slow run: a 300-step plateau (a tenth of 30 evaluations), then learning
    ([6.17, 1.77, 1.73, 1.69, 1.71, 1.46] + [1.0 - 0.03 * i for i in range(25)], None, "learned", 300),
    # creeping down 5% at a time but ending above the plateau loss (the paper's code, seed 4 here)
    ([6.27, 1.73, 1.64, 1.55, 1.47, 1.39, 1.32, 1.25, 1.18], None, "stalled", 0),
    # converged below the plateau loss: no progress for most of the run is not a stall
    ([6.17, 0.45] + [0.44] * 29, None, "learned", 0),
    # learned, then unlearned past the start
    ([6.17, 1.0, 0.5, 0.3] + [7.0] * 3, None, "blew up", 0),
    # target-only: best at step 100, then memorises its 16 examples
    ([6.17, 2.9, 3.5, 4.0, 4.7], None, "overfit", 300),
    # a non-finite training loss
    ([6.17, 1.0, 0.5, 0.3], [1.0, float("nan")], "blew up", 0),
])
def test_sft_outcome_from_a_curve(values, losses, outcome, plateau):
    from drpt_ray.demo import sft_outcome

    r = sft_outcome(_curve(values), losses or [1.0])
    assert (r["outcome"], r["plateau_steps"]) == (outcome, plateau)
    assert r["final"] == values[-1] and r["best"] == min(values)


def test_machine_summary_names_the_cpu_torch_and_blas():
    import re

    from drpt_ray.machine import cpu_model, machine_summary

    line = machine_summary()
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    assert line.startswith(cpu_model()) and f"torch {torch.__version__}," in line
    assert f"BLAS {blas.group(1) if blas else 'unknown'}," in line
    assert f"{torch.get_num_threads()} threads" in line
