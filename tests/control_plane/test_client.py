"""The SDK (drpt_ray.client) against a real control plane with the dry-run launcher; the test posts
what a driver would. Submit -> wait -> metrics, refusals as `ApiError`s naming the field, a stream
that resumes across a control-plane restart with no gap and no duplicate, a sweep's best trial,
and the CLI's message and exit status for a spec the server refuses."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from drpt_ray import cli
from drpt_ray.client import ApiError, Client, ClientError, End, MetricsReport, StateChange, SweepSummary, TrialReport
from drpt_ray.config import JobSpec
from tests.control_plane.conftest import TOKEN, free_port, ingest_headers
from tests.control_plane.test_api import TINY_SFT


def drive(http: httpx.Client, run_id: str, events: list[dict]) -> None:
    """Post events to the run's ingest route, as its driver would."""
    r = http.post(f"/v1/ingest/{run_id}", headers=ingest_headers(run_id), json={"events": events})
    assert r.status_code == 200 and r.json()["stored"] == len(events), r.text


def metrics(seqs: range, first_step: int) -> list[dict]:
    return [{"seq": q, "type": "metrics", "step": first_step + i,
             "metrics": {"step": first_step + i, "loss": 1.0 / (q + 1)}}
            for i, q in enumerate(seqs)]


def test_submit_wait_and_metrics(dry_server, monkeypatch):
    client = dry_server.client()
    job = client.submit(JobSpec(mode="sft", steps=3, eval_every=3, progress=False), idempotency_key="sdk-submit-1")
    assert job.info.steps == 3 and job.info.state in ("QUEUED", "PENDING")
    # the same submission retried under its key is the same job, not a second one
    assert client.submit(JobSpec(mode="sft", steps=3, eval_every=3, progress=False),
                         idempotency_key="sdk-submit-1").id == job.id

    def driver():
        time.sleep(1.0)  # wait() is already polling
        with dry_server.http() as c:
            drive(c, job.id, [{"seq": 1, "type": "state", "state": "RUNNING"}, *metrics(range(2, 5), 0),
                              {"seq": 5, "type": "state", "state": "SUCCEEDED"}])

    t = threading.Thread(target=driver)
    t.start()
    assert job.wait(timeout=60, poll_s=0.2) == "SUCCEEDED"
    t.join()
    assert job.info.step == 2
    monkeypatch.setattr("drpt_ray.client.METRICS_PAGE", 2)  # the history comes in pages: 2 + 1
    assert job.metrics() == [{"step": 0, "loss": 1 / 3}, {"step": 1, "loss": 1 / 4}, {"step": 2, "loss": 1 / 5}]


def test_wait_times_out_and_cancel_refused_twice_is_an_api_error(dry_server):
    job = dry_server.client().submit(TINY_SFT)
    with pytest.raises(TimeoutError, match=job.id):
        job.wait(timeout=0.5, poll_s=0.1)
    assert job.cancel().state == "CANCELLED" and job.wait(timeout=5) == "CANCELLED"
    with pytest.raises(ApiError) as refused:
        job.cancel()
    assert refused.value.status == 409 and "already CANCELLED" in refused.value.message and refused.value.fields == []


def test_refusals_raise_api_error_with_the_field_paths(dry_server):
    client = dry_server.client()
    with pytest.raises(ApiError) as bad:
        client.submit({"mode": "sft", "regularizer": {"tau": -1.0}, "steps": "30"})
    e = bad.value
    assert e.status == 422 and sorted(e.paths) == ["body.regularizer.tau", "body.steps"]
    assert {f.type for f in e.fields} == {"greater_than", "int_type"}
    assert "body.regularizer.tau" in str(e) and "HTTP 422" in str(e)
    with pytest.raises(ApiError) as missing:
        client.job("job_0000000000000000")
    assert missing.value.status == 404 and missing.value.paths == [] and "job_0000000000000000" in missing.value.message
    with pytest.raises(ApiError) as unauthorised:
        Client(dry_server.url, "wrong-token-123456789").jobs()
    assert unauthorised.value.status == 403
    with pytest.raises(ClientError) as down:
        Client(f"http://127.0.0.1:{free_port()}", TOKEN).jobs()
    assert not isinstance(down.value, ApiError) and "cannot reach" in str(down.value)


def test_events_resume_across_a_restart_with_no_gap_and_no_duplicate(server_factory):
    s = server_factory("resume", DRPT_LAUNCHER="dry-run")
    job = s.client().submit(TINY_SFT)
    with s.http() as c:
        drive(c, job.id, metrics(range(1, 11), 0))
    events = job.events()
    seen = [next(events) for _ in range(5)]

    def restart_and_finish():
        time.sleep(2.0)  # the follower meanwhile finds nobody listening, and retries
        s.start()  # same port, same database
        with s.http() as c:
            drive(c, job.id, [*metrics(range(11, 21), 10), {"seq": 21, "type": "state", "state": "SUCCEEDED"}])

    s.kill()  # SIGKILL mid-stream: the open connection breaks
    t = threading.Thread(target=restart_and_finish)
    t.start()
    seen += list(events)
    t.join()
    assert s.starts == 2
    ids = [ev.id for ev in seen[:-1]]
    assert ids == list(range(1, len(ids) + 1)) and ids[-1] == job.refresh().events
    assert [ev.step for ev in seen if isinstance(ev, MetricsReport)] == list(range(20))
    # the control plane's own
    assert isinstance(seen[0], StateChange) and seen[0].state == "QUEUED" and seen[0].seq is None
    assert isinstance(seen[-1], End) and seen[-1].state == "SUCCEEDED"


def test_a_sweeps_trials_and_best(dry_server, capsys):
    client = dry_server.client()
    sweep = client.submit_sweep({"space": {"regularizer.tau": {"values": [0.5, 1.0, 2.0]}}, "base": TINY_SFT,
                                 "metric": "eval/target_loss", "mode": "min"})
    assert sweep.best() is None and sweep.trials() == []
    losses = {"t0": 0.9, "t1": 0.4, "t2": 0.7}
    trials = [{"seq": i + 1, "type": "trial", "trial_id": tid,
               "config": {"regularizer.tau": tau}, "state": "TERMINATED",
               "metrics": {"step": 20, "eval/target_loss": losses[tid]}}
              for i, (tid, tau) in enumerate(zip(losses, (0.5, 1.0, 2.0)))]
    with dry_server.http() as c:
        drive(c, sweep.id, trials)
        best = sweep.best()  # before the driver's pick: the best last value of the metric (min)
        assert (best.trial_id, best.config, best.value) == ("t1", {"regularizer.tau": 1.0}, 0.4)
        assert [(t.trial_id, t.state) for t in sweep.trials()] == [(tid, "TERMINATED") for tid in losses]
        drive(c, sweep.id, [{"seq": 4, "type": "sweep", "state": "TERMINATED",
                             "metric": "eval/target_loss", "mode": "min",
                             "best_trial_id": "t1", "best_value": 0.4, "best_config": {"regularizer.tau": 1.0}},
                            {"seq": 5, "type": "state", "state": "SUCCEEDED"}])
    assert sweep.wait(timeout=30) == "SUCCEEDED" and sweep.best().trial_id == "t1"
    typed = [ev for ev in sweep.events() if isinstance(ev, (TrialReport, SweepSummary))]
    assert [type(ev).__name__ for ev in typed] == ["TrialReport"] * 3 + ["SweepSummary"]
    assert typed[-1].best_config == {"regularizer.tau": 1.0}
    assert cli.main(["status", sweep.id, "--url", dry_server.url, "--token", TOKEN]) == 0  # the CLI's trial table
    table = capsys.readouterr().out
    assert (f"{sweep.id}  SUCCEEDED  metric=eval/target_loss (min)" in table
            and 'best: t1 {"regularizer.tau": 1.0} value=0.4' in table)


def test_cli_prints_the_field_path_of_a_refused_spec_and_exits_2(dry_server, tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    # valid locally; the server decides where runs write
    spec.write_text("mode: sft\nsteps: 20\noutput_dir: /etc/drpt\n")
    assert cli.main(["submit", str(spec), "--url", dry_server.url, "--token", TOKEN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drpt-ray: error: POST /v1/jobs: HTTP 422: body.output_dir:") and "absolute" in err


def test_samples_tables_stream_and_come_back_filtered(dry_server, monkeypatch):
    """A driver's samples tables (EventReporter.samples, a non-finite number sent as null) reach the
    job's event stream typed, and GET /v1/jobs/{id}/samples pages and filters them by split and step;
    a malformed row is refused naming its field."""
    from drpt_ray.client import SamplesTable
    from drpt_ray.reporting import EventReporter
    from tests.control_plane.conftest import ingest_token

    client = dry_server.client()
    job = client.submit(TINY_SFT)

    def row(split, group, reward, advantage):
        return {"split": split, "group": group, "prompt": f"p{group}", "response": f"r|{reward}\n",
                "reward": reward, "advantage": advantage}

    at_0 = [row("eval", 0, 1.0, None), row("eval", 1, 0.0, None)]
    at_10 = [row("general", 0, 1.0, 0.7), row("general", 0, 0.0, -0.7), row("target", 0, 1.0, float("nan"))]
    reporter = EventReporter(dry_server.url, job.id, ingest_token(job.id))
    reporter.samples(0, at_0)
    reporter.samples(10, at_10)
    reporter.state("SUCCEEDED")
    assert reporter.close(30)
    want = [{"step": 0, **r} for r in at_0] + [{"step": 10, **r} for r in at_10]
    want[-1]["advantage"] = None
    monkeypatch.setattr("drpt_ray.client.METRICS_PAGE", 2)  # 5 rows come in 3 pages
    assert job.samples() == want
    assert job.samples(split="general") == want[2:4]
    assert job.samples(step=0) == want[:2] and job.samples(split="eval", step=10) == []
    tables = [ev for ev in job.events() if isinstance(ev, SamplesTable)]
    assert [(t.step, len(t.rows)) for t in tables] == [(0, 2), (10, 3)] and tables[1].rows[2].advantage is None
    with dry_server.http() as c:
        bad = row("train", 0, 1.0, None)
        r = c.post(f"/v1/ingest/{job.id}", headers=ingest_headers(job.id),
                   json={"events": [{"seq": 4, "type": "samples", "step": 11, "rows": [bad]}]})
        assert r.status_code == 422 and "split" in r.text


def test_a_working_dir_packs_its_files_follows_links_inside_and_refuses_links_out(tmp_path):
    import io
    import zipfile

    from drpt_ray.working_dir import pack

    d, outside = tmp_path / "project", tmp_path / "secret.txt"
    (d / "data").mkdir(parents=True)
    (d / "data" / "a.jsonl").write_text("{}\n")
    (d / "data" / "again").symlink_to(d / "data")  # a loop: walked once
    (d / "alias.jsonl").symlink_to(d / "data" / "a.jsonl")
    outside.write_text("not yours")
    assert sorted(zipfile.ZipFile(io.BytesIO(pack(d))).namelist()) == ["alias.jsonl", "data/a.jsonl"]
    with pytest.raises(ValueError, match="more than 4 bytes"):
        pack(d, max_bytes=4)
    (d / "data" / "leak.txt").symlink_to(outside)
    with pytest.raises(ValueError, match=f"links to {outside}, outside the directory"):
        pack(d)
