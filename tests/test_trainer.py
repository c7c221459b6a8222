"""The driver loop without Ray: data cursors, SFT through the one loop, checkpoints and exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from drpt_ray.algorithms import between_prompt_variance_fraction, refill
from drpt_ray.config import JobSpec
from drpt_ray.data import BatchSampler, Example
from drpt_ray.job import latest_checkpoint
from drpt_ray.trainer import Group, run_job


def _draws(*batches: list[list[float]]):
    """A draw function that returns the given batches of groups (each group: its rewards) in turn."""
    it = iter(batches)
    return lambda: [Group(Example(f"p{i}", ""), [], rewards) for i, rewards in enumerate(next(it))]


def test_refill_tops_up_to_the_batch_size_with_informative_groups_only():
    flat, mixed = [1.0, 1.0, 1.0], [0.0, 1.0, 0.5]
    r = refill(_draws([flat, mixed, flat, flat], [mixed, flat, mixed, mixed], [mixed] * 4), batch_size=4, max_rounds=5)
    assert r.rounds == 2 and len(r.seen) == 8  # 1 + 3 informative groups reach 4 after two draws
    assert len(r.kept) == 4 and all(max(g.rewards) > min(g.rewards) for g in r.kept)
    # Capped: two draws of mostly flat groups leave the batch short, never padded with flat groups.
    r = refill(_draws([flat, mixed, flat, flat], [flat, flat, flat, mixed]), batch_size=4, max_rounds=2)
    assert r.rounds == 2 and len(r.kept) == 2 and all(g.rewards == mixed for g in r.kept)
    # Nothing informative at all: the last draw comes back (a zero policy gradient, as without filtering).
    r = refill(_draws([flat] * 4, [[0.0] * 3] * 4), batch_size=4, max_rounds=2)
    assert len(r.kept) == 4 and all(g.rewards == [0.0] * 3 for g in r.kept)


def test_sampler_resume_is_exact_across_epoch_boundaries():
    pool = list(range(10))
    ref = BatchSampler(pool, 4, seed=3)
    seq = [ref.next() for _ in range(8)]  # batch 3 straddles epochs 0 and 1
    assert sorted(seq[0] + seq[1] + seq[2][:2]) == pool  # an epoch visits every item once
    for cut in (1, 2, 3, 5):  # before, at and after the boundary
        s = BatchSampler(pool, 4, seed=3)
        for _ in range(cut):
            s.next()
        resumed = BatchSampler(pool, 4, seed=3)
        resumed.load_state_dict(json.loads(json.dumps(s.state_dict())))
        assert [resumed.next() for _ in range(8 - cut)] == seq[cut:]


def _spec(tmp_path, **kw) -> JobSpec:
    base = dict(
        mode="sft", steps=6, eval_every=3, progress=False, tensorboard=True, output_dir=str(tmp_path),
        data={"n_general": 20, "n_target": 16},  # 20 examples, batch 8: step 3 straddles an epoch
        regularizer={"feasible_set": "layerwise_subset", "refresh_every": 2},
        checkpoint={"every": 2, "keep": 3},
    )
    return JobSpec.model_validate({**base, **kw})


class _Crash(Exception):
    pass


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    full = run_job(_spec(tmp_path / "a"))
    assert latest_checkpoint(tmp_path / "a").name == "step_0000006"  # the last step is checkpointed too
    w_full = torch.load(tmp_path / "a" / "checkpoints" / "step_0000004" / "learner.pt", weights_only=False)

    def crash_at_5(m):
        if m["step"] == 5:
            raise _Crash()

    with pytest.raises(_Crash):
        run_job(_spec(tmp_path / "b"), on_metrics=crash_at_5)
    assert latest_checkpoint(tmp_path / "b").name == "step_0000004"
    resumed = run_job(_spec(tmp_path / "b"))
    # same checkpoint contents at step 4: weights, optimizer moments, data cursors
    w_b = torch.load(tmp_path / "b" / "checkpoints" / "step_0000004" / "learner.pt", weights_only=False)
    for k in w_full["model"]:
        assert torch.equal(w_full["model"][k], w_b["model"][k]), k
    moments = [(w["opt"]["state"][k]["exp_avg_sq"] for w in (w_full, w_b)) for k in w_full["opt"]["state"]]
    assert moments and all(torch.equal(a, b) for a, b in moments)
    cur_a = json.loads((tmp_path / "a" / "checkpoints" / "step_0000004" / "trainer.json").read_text())
    cur_b = json.loads((tmp_path / "b" / "checkpoints" / "step_0000004" / "trainer.json").read_text())
    assert cur_a == cur_b and cur_a["general"] == {"epoch": 1, "pos": 12}
    # ... and the resumed run ends where the uninterrupted one did, bit for bit
    assert resumed.steps == full.steps == 6
    assert [m["loss"] for m in resumed.history if m["step"] > 0] == [m["loss"] for m in full.history if m["step"] > 0]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / "a" / "model" / "model.safetensors"),
            load_file(tmp_path / "b" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl holds each step once, in order, despite the crash after step 4
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2, 3, 4, 5, 6]
    assert (tmp_path / "b" / "tb").is_dir() and (tmp_path / "b" / "curves.png").exists()


def test_checkpoints_keep_only_the_newest(tmp_path):
    run_job(_spec(tmp_path, steps=8, checkpoint={"every": 2, "keep": 2}))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000006", "step_0000008"]


def test_between_prompt_variance_fraction_by_hand():
    ids = torch.tensor([0, 0, 1, 1])
    # Each prompt all right or all wrong: every bit of variance is between prompts.
    assert between_prompt_variance_fraction(torch.tensor([1.0, 1.0, 0.0, 0.0]), ids) == pytest.approx(1.0)
    # Same mean on both prompts: none of it is.
    assert between_prompt_variance_fraction(torch.tensor([1.0, 0.0, 0.0, 1.0]), ids) == pytest.approx(0.0)
    # Means 0.5 and 0 around 0.25: between 4 * 0.0625 = 0.25 of a total 0.75 -> 1/3.
    assert between_prompt_variance_fraction(torch.tensor([1.0, 0.0, 0.0, 0.0]), ids) == pytest.approx(1 / 3)
    assert between_prompt_variance_fraction(torch.zeros(4), ids) == 0.0


def test_a_resume_names_what_of_the_spec_changed():
    from drpt_ray.job import spec_changes

    saved = {"seed": 0, "optim": {"lr": 0.003, "betas": [0.9, 0.999]}, "regularizer": {"frac": 0.5}}
    now = {"seed": 0, "optim": {"lr": 0.001, "betas": [0.9, 0.999]}, "regularizer": {"frac": 0.5}, "steps": 200,
           "checkpoint": {"every": 5}}
    assert spec_changes(saved, now) == ["optim.lr 0.003 -> 0.001"]  # steps and checkpoint may change on a resume
    assert spec_changes(None, now) == []  # a checkpoint written before specs were saved


def test_a_finished_run_is_extended_from_its_last_step(tmp_path, capsys):
    """The last step is checkpointed, so the same spec with more `steps` continues where it ended
    (and says from which run and step, to which step, where); the metrics log then holds every step once."""
    run_job(_spec(tmp_path, steps=5))  # checkpoints at 2, 4 and the last step, 5
    assert latest_checkpoint(tmp_path).name == "step_0000005"
    extended = run_job(_spec(tmp_path, steps=7, eval_every=2))  # the run's length and evaluation may change
    out = capsys.readouterr().out
    assert (f"resumed from step 5 of run {tmp_path} ({tmp_path / 'checkpoints' / 'step_0000005'}); "
            f"training to step 7 in {tmp_path}\n") in out  # nothing else changed, so nothing more is said
    assert extended.steps == 7
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(8))


def test_a_changed_training_key_is_refused_before_anything_is_written_unless_allowed(tmp_path, capsys):
    run_job(_spec(tmp_path, steps=2))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    changed = dict(steps=4, optim={"lr": 1e-4}, regularizer={"feasible_set": "full", "refresh_every": 2})
    with pytest.raises(ValueError) as e:
        run_job(_spec(tmp_path, **changed))
    msg = str(e.value)
    assert msg.startswith(f"checkpoint.resume: {tmp_path / 'checkpoints' / 'step_0000002'} (step 2)")
    assert "optim.lr 0.003 -> 0.0001" in msg and "regularizer.feasible_set 'layerwise_subset' -> 'full'" in msg
    assert "checkpoint.resume_changed_spec: true" in msg
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # no step, no log line
    assert run_job(_spec(tmp_path, **changed, checkpoint={"every": 2, "resume_changed_spec": True})).steps == 4
    out = capsys.readouterr().out
    assert f"resumed from step 2 of run {tmp_path}" in out
    assert ("the spec changed since it was written: optim.lr 0.003 -> 0.0001, "
            "regularizer.feasible_set 'layerwise_subset' -> 'full'\n") in out


def test_resume_never_starts_fresh_but_not_writing_beside_another_runs_checkpoints(tmp_path, capsys):
    """`never` ignores the output_dir's checkpoints; a run that would write its own beside them is
    refused (checkpoint.keep deletes by step number, and a later `auto` would continue the old run)."""
    run_job(_spec(tmp_path, steps=2))
    fresh = run_job(_spec(tmp_path, steps=2, optim={"lr": 1e-4}, checkpoint={"every": 0, "resume": "never"}))
    assert "resumed" not in capsys.readouterr().out  # nor refused: the changed lr is a new run
    assert [m["step"] for m in fresh.history] == [0, 1, 2]
    with pytest.raises(ValueError, match=f"output_dir {tmp_path} holds another run's checkpoints "
                                         r"\(newest step_0000002\)"):
        run_job(_spec(tmp_path, steps=2, checkpoint={"every": 2, "resume": "never"}))
    other = tmp_path / "other"
    run_job(_spec(other, steps=2))
    with pytest.raises(ValueError, match="holds another run's checkpoints"):  # resuming a third run's, into this
        run_job(_spec(tmp_path, steps=4, checkpoint={"every": 2, "resume": str(other)}))


def test_resume_from_another_runs_checkpoint_writes_into_its_own_output_dir(tmp_path, capsys, monkeypatch):
    """A path resumes another run's checkpoint (a step directory, or a run's newest) exactly, and
    this run's checkpoints, log and model go to its own output_dir; the other run is left as it was."""
    a, b = tmp_path / "a", tmp_path / "b"
    full = run_job(_spec(a))  # checkpoints at 2, 4, 6
    before = {p: p.read_bytes() for p in a.rglob("*") if p.is_file()}
    step_4 = a / "checkpoints" / "step_0000004"
    resumed = run_job(_spec(b, checkpoint={"every": 2, "resume": str(step_4)}))
    assert f"resumed from step 4 of run {a} ({step_4}); training to step 6 in {b}" in capsys.readouterr().out
    # the uninterrupted run's steps 5 and 6, bit for bit
    assert [(m["step"], m["loss"]) for m in resumed.history] == [(m["step"], m["loss"]) for m in full.history[-2:]]
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step_0000006"]
    assert (b / "model" / "model.safetensors").exists()
    assert {p: p.read_bytes() for p in a.rglob("*") if p.is_file()} == before
    # a run's output_dir: its newest checkpoint; a relative path is the working directory's
    monkeypatch.chdir(tmp_path)
    extended = run_job(_spec(tmp_path / "c", steps=7, checkpoint={"every": 2, "resume": "a"}))
    assert f"resumed from step 6 of run {a}" in capsys.readouterr().out and extended.steps == 7
    with pytest.raises(ValueError, match=f"checkpoint.resume: {tmp_path / 'b' / 'model'} is not a checkpoint"):
        run_job(_spec(tmp_path / "d", checkpoint={"resume": "b/model"}))
    assert not (tmp_path / "d").exists()  # refused before anything started
