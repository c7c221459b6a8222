"""SFT with the regularizer: schedule, sampling, one curated-and-clipped step, a short real run, the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from drpt_ray.cli import main
from drpt_ray.config import OptimSpec, SFTSpec
from drpt_ray.data import Example, load_task, tokenize_sft
from drpt_ray.models import load_model
from drpt_ray.regularize import Regularizer
from drpt_ray.sft import cycle, lr_factor, make_optimizer, sft_step, train_sft


def test_lr_schedule_by_hand():
    spec = OptimSpec(warmup_frac=0.1, schedule="linear")
    # 100 steps: warmup 10 steps ramps 0.1 .. 1.0, then linear decay to 0 over the remaining 90
    assert [lr_factor(s, 100, spec) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, 100, spec) == pytest.approx(1.0)
    assert lr_factor(55, 100, spec) == pytest.approx(0.5)
    cos = OptimSpec(warmup_frac=0.0, schedule="cosine")
    assert [lr_factor(s, 100, cos) for s in (0, 50)] == pytest.approx([1.0, 0.5])
    assert lr_factor(70, 100, OptimSpec(warmup_frac=0.0, schedule="constant")) == 1.0


def test_cycle_visits_the_whole_pool_each_pass():
    pool = [Example(str(i), "x") for i in range(10)]
    batches = cycle(pool, 5, random.Random(0))
    first_pass = next(batches) + next(batches)
    assert sorted(e.prompt for e in first_pass) == sorted(e.prompt for e in pool)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = SFTSpec(output_dir=str(tmp_path_factory.mktemp("sft")))
    model, tok = load_model(spec.model, spec.output_dir)
    return spec, model, tok, load_task(spec.data)


def test_step_clips_the_curated_gradient(tiny):
    spec, model, tok, splits = tiny
    spec = spec.model_copy(update={"optim": OptimSpec(max_grad_norm=1e-4)})
    reg = Regularizer(model, spec.regularizer)
    opt, sched = make_optimizer(model, spec.optim, 10)
    general = tokenize_sft(tok, splits.general[:8], 64)
    target = tokenize_sft(tok, splits.target[:1], 64)
    m = sft_step(model, reg, opt, sched, general, target, spec)
    reg.remove()
    post = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    assert m["grad_norm"] > 1e-3  # the curated gradient was much larger ...
    assert float(post) <= 1e-4 * (1 + 1e-3)  # ... and the optimizer saw it clipped
    assert m["reg/kept_frac_mean"] == pytest.approx(0.5)  # top-k 0.5 of 8 in every layer
    assert -1.0 <= m["reg/cos"] <= 1.0 and m["target_loss"] > 0


@pytest.mark.parametrize("target_mode", ["separate", "merged"])
def test_short_run_learns_and_writes_artifacts(tmp_path, target_mode):
    spec = SFTSpec(
        steps=60, eval_every=30, output_dir=str(tmp_path), progress=False,
        regularizer={"feasible_set": "layerwise_subset", "target_mode": target_mode},
    )
    r = train_sft(spec)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 61))
    evals = [m["eval/target_loss"] for m in lines if "eval/target_loss" in m]
    assert len(evals) == 3 and evals[-1] < 0.6 * evals[0]
    assert all(m["reg/kept_frac_min"] == pytest.approx(0.5) for m in lines)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert r.final_eval_loss == evals[-1]


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
    assert "final held-out target loss" in res.stdout
