"""Issue 13's bad-input findings, as behaviour on a real uvicorn server (dry-run launcher): where
a job's files may be listed from, strict JSON on the stream, the edges of what is accepted, and a
NaN loss that ends a job as DIVERGED instead of SUCCEEDED. The 4xx cases themselves are rows of
test_api.py's BAD table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from drpt_ray.reporting import EventReporter
from drpt_ray.run import DIVERGED_EXIT, reported_run
from services.control_plane import store
from services.control_plane.db import Database
from tests.control_plane.conftest import ingest_headers, ingest_token, wait_for
from tests.control_plane.test_api import TINY_SFT, sse_events


def strict_loads(text: str):
    """json.loads as a browser's JSON.parse: NaN and Infinity are errors, not floats."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def report(c, jid: str, seq: int, output_dir: str) -> None:
    r = c.post(f"/v1/ingest/{jid}", headers=ingest_headers(jid),
               json={"events": [{"seq": seq, "type": "state", "state": "RUNNING",
                                 "artifacts": {"output_dir": output_dir}}]})
    assert r.status_code == 200, r.text


def test_artifacts_are_listed_only_inside_the_jobs_own_directory(dry_server):
    runs = Path(dry_server.env["DRPT_RUNS_DIR"])
    with dry_server.http() as c:
        jid = c.post("/v1/jobs", json=TINY_SFT).json()["id"]
        own = runs / jid / "runs" / "job"
        (own / "checkpoints" / "step_2").mkdir(parents=True)
        (own / "metrics.jsonl").write_text("{}\n")
        (own / "host_file").symlink_to(dry_server.workdir / "control_plane.sqlite")  # a link out is not listed
        # the server's own files, the host's, '..' out
        outside = [str(dry_server.workdir), "/etc", f"{runs / jid}/../.."]
        for seq, path in enumerate(outside, start=1):
            report(c, jid, seq, path)
            art = c.get(f"/v1/jobs/{jid}/artifacts").json()
            assert art["output_dir"] == path and art["files"] is None and art["checkpoints"] == [], art
        report(c, jid, len(outside) + 1, str(own))
        art = c.get(f"/v1/jobs/{jid}/artifacts").json()
    assert art["files"] == [{"path": "metrics.jsonl", "bytes": 3}]
    assert art["checkpoints"] == [str(own / "checkpoints" / "step_2")]


def test_the_stream_is_strict_json_and_a_nan_metric_arrives_as_null(dry_server):
    with dry_server.http() as c:
        jid = c.post("/v1/jobs", json=TINY_SFT).json()["id"]
    reporter = EventReporter(dry_server.url, jid, ingest_token(jid))
    reporter.on_metrics({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
    reporter.state("FAILED", "step 1: non-finite loss")
    assert reporter.close(timeout=30)
    with dry_server.http() as c:
        frames = [strict_loads(e.data) for e in sse_events(c, f"/v1/jobs/{jid}/events")]
        history = strict_loads(c.get(f"/v1/jobs/{jid}/metrics").text)["items"]
    metrics = [f["metrics"] for f in frames if f.get("type") == "metrics"]
    assert metrics == history == [{"step": 1, "loss": None, "grad_norm": None, "lr": 0.5}]


def test_a_nan_stored_before_ingest_refused_them_is_streamed_as_null(server_factory):
    server = server_factory("legacy", DRPT_LAUNCHER="dry-run")
    if server.env["DATABASE_URL"].startswith("postgresql"):
        pytest.skip("Postgres' json type never accepted a NaN: no such rows exist there")
    with server.http() as c:
        jid = c.post("/v1/jobs", json=TINY_SFT).json()["id"]
        # the supervisor appends nothing more once the job runs: this test's writes cannot race it
        wait_for(lambda: c.get(f"/v1/jobs/{jid}").json()["state"] == "RUNNING", 30, "the supervisor to launch the job")
    db = Database(server.env["DATABASE_URL"])  # the server's own file; store.ingest does not validate
    store.ingest(db, jid, [{"seq": 1, "type": "metrics", "step": 1, "metrics": {"step": 1, "loss": float("nan")}},
                           {"seq": 2, "type": "state", "state": "FAILED", "message": None}])
    db.dispose()
    with server.http() as c:
        frames = [strict_loads(e.data) for e in sse_events(c, f"/v1/jobs/{jid}/events")]
        history = strict_loads(c.get(f"/v1/jobs/{jid}/metrics").text)["items"]
    assert [f["metrics"] for f in frames if f.get("type") == "metrics"] == history == [{"step": 1, "loss": None}]


def test_event_ids_up_to_int64_are_accepted(dry_server):
    with dry_server.http() as c:
        jid = c.post("/v1/jobs", json=TINY_SFT).json()["id"]
        for headers, query in (({"Last-Event-ID": str(2**63 - 1)}, ""), ({}, f"&after={2**63 - 1}")):
            events = sse_events(c, f"/v1/jobs/{jid}/events?follow=false{query}", headers=headers)
            assert [e.event for e in events] == ["end"]  # nothing after the largest id, and a clean end
        assert c.get("/v1/jobs", params={"offset": 2**63 - 1}).json()["items"] == []


def test_what_stays_valid_is_still_accepted(dry_server):
    """Strictness refuses coercion, not the natural spellings: an int for a float, a list for the betas
    pair, a relative output_dir, a 200-character name, every value of a valid grid and range."""
    job = TINY_SFT | {"name": "n" * 200, "output_dir": "outputs/lr-1", "optim": {"lr": 1, "betas": [0.9, 0.95]}}
    sweep = {"base": TINY_SFT, "output_dir": "tau", "space": {"regularizer.tau": {"values": [0.5, 1, 2.0]}}}
    # int field: draws 2..8
    ranged = {"base": TINY_SFT, "scheduler": "random", "space": {"batch_size": {"low": 1.5, "high": 8}}}
    with dry_server.http() as c:
        r = c.post("/v1/jobs", json=job)
        assert r.status_code == 201, r.text
        spec = r.json()["spec"]
        assert (spec["optim"]["lr"] == 1.0 and spec["optim"]["betas"] == [0.9, 0.95]
                and spec["output_dir"] == "outputs/lr-1")
        for body in (sweep, ranged):
            r = c.post("/v1/sweeps", json=body)
            assert r.status_code == 201, r.text


def test_a_nan_loss_ends_the_job_diverged_naming_the_step(dry_server, tmp_path, monkeypatch):
    """The real driver and trainer on a tiny SFT run whose learning rate blows the weights up: the
    loss is NaN at step 2, the run stops there, and the job is not a success."""
    spec = tmp_path / "job.yaml"
    spec.write_text("mode: sft\nsteps: 20\neval_every: 10\nprogress: false\ntensorboard: false\n"
                    f"optim: {{lr: 1e30, warmup_frac: 0.0, schedule: constant}}\noutput_dir: {tmp_path / 'out'}\n")
    with dry_server.http() as c:
        jid = c.post("/v1/jobs", json=TINY_SFT).json()["id"]
    monkeypatch.setenv("DRPT_INGEST_TOKEN", ingest_token(jid))  # what the launcher gives the job's driver
    args = argparse.Namespace(spec=str(spec), address=None, output_dir=None, job_id=jid, report_url=dry_server.url)
    assert reported_run(args) == DIVERGED_EXIT
    with dry_server.http() as c:
        job = c.get(f"/v1/jobs/{jid}").json()
        frames = [(e.event, strict_loads(e.data)) for e in sse_events(c, f"/v1/jobs/{jid}/events")]
    assert job["state"] == "DIVERGED" and job["step"] == 2
    assert job["message"] == "step 2: non-finite loss and grad_norm"
    assert [d["metrics"]["loss"] for t, d in frames if t == "metrics" and d["step"] == 2] == [None]
    assert frames[-1] == ("end", {"state": "DIVERGED", "message": job["message"]})
