"""The divergence guard's contract on the control-plane side: `alert` events and the terminal
DIVERGED state, through a real uvicorn control plane (dry-run launcher), the real supervisor and
store on a SQLite file, the driver's `reported_run` and the CLI client."""

from __future__ import annotations

import argparse
from pathlib import Path

from drpt_ray.service_cli import register
from drpt_ray.reporting import EventReporter
from drpt_ray.run import DIVERGED_EXIT, reported_run
from services.control_plane import store
from services.control_plane.launcher import DryRunLauncher
from services.control_plane.security import IngestKeys
from services.control_plane.settings import Settings
from services.control_plane.supervisor import Supervisor
from tests.control_plane.conftest import TOKEN, ingest_headers, ingest_token
from tests.control_plane.test_api import TINY_SFT, sse_events

COLLAPSE = ("batch reward std < 1e-06 for 3 consecutive steps (zero_variance_steps=3): every advantage is 0, "
            "nothing is learned")


def _diverged_job(c, jid: str) -> None:
    """Ingest what a driver sends when the guard stops its job at step 3."""
    batch = [
        {"seq": 1, "type": "state", "state": "RUNNING", "message": None},
        {"seq": 2, "type": "metrics", "step": 3, "metrics": {"step": 3}},
        {"seq": 3, "type": "alert", "step": 3, "message": COLLAPSE},
        {"seq": 4, "type": "state", "state": "DIVERGED", "message": COLLAPSE,
         "artifacts": {"output_dir": "/nonexistent/out"}},
    ]
    assert c.post(f"/v1/ingest/{jid}", headers=ingest_headers(jid),
                  json={"events": batch}).json() == {"stored": 4, "last_seq": 4}


def test_reporter_alert_is_stored_and_streamed_as_an_alert_event(dry_server):
    with dry_server.http() as c:
        jid = c.post("/v1/jobs", json=TINY_SFT).json()["id"]
    reporter = EventReporter(dry_server.url, jid, ingest_token(jid))
    reporter.state("RUNNING")
    reporter.alert(7, COLLAPSE)
    assert reporter.close(timeout=30)
    with dry_server.http() as c:
        events = sse_events(c, f"/v1/jobs/{jid}/events?follow=false")
        assert c.get(f"/v1/jobs/{jid}").json()["state"] == "RUNNING"  # an alert alone does not end the job
        assert 'drpt_events_ingested_total{type="alert"}' in c.get("/metrics").text
    alerts = [e.json() for e in events if e.event == "alert"]
    assert [(a["step"], a["message"], a["seq"]) for a in alerts] == [(7, COLLAPSE, 2)]


def test_diverged_is_a_final_state_that_later_driver_states_do_not_move(dry_server):
    with dry_server.http() as c:
        jid = c.post("/v1/jobs", json=TINY_SFT).json()["id"]
        _diverged_job(c, jid)
        later = [{"seq": 5, "type": "state", "state": "RUNNING"},
                 {"seq": 6, "type": "state", "state": "SUCCEEDED", "message": None}]
        assert c.post(f"/v1/ingest/{jid}", headers=ingest_headers(jid), json={"events": later}).json()["stored"] == 2
        job = c.get(f"/v1/jobs/{jid}").json()
        assert job["state"] == "DIVERGED" and job["message"] == COLLAPSE and job["finished_at"] is not None
        assert job["artifacts"]["output_dir"] == "/nonexistent/out"
        events = sse_events(c, f"/v1/jobs/{jid}/events")  # follow=true: ends because DIVERGED is terminal
        assert [e.json()["ignored"] for e in events if e.json().get("seq") in (5, 6)] == ["run already DIVERGED"] * 2
        assert events[-1].event == "end" and events[-1].json() == {"state": "DIVERGED", "message": COLLAPSE}
        assert jid in {j["id"] for j in c.get("/v1/jobs", params={"state": "DIVERGED"}).json()["items"]}
        assert c.post(f"/v1/jobs/{jid}/cancel").status_code == 409
        assert 'drpt_jobs{state="DIVERGED"}' in c.get("/metrics").text


def test_supervisor_keeps_diverged_when_ray_reports_the_driver_failed(db):
    launcher = DryRunLauncher(Settings(api_tokens=[TOKEN]))
    sup = Supervisor(db, launcher, IngestKeys("secret"), max_running=2, interval_s=60.0, notify=lambda run_id: None)
    with db.write() as s:
        diverged, silent = (store.create(s, "job", TINY_SFT, name, mode="sft").id for name in ("diverged", "silent"))
    sup.tick()  # admit both: dry-run Ray says RUNNING
    sup.tick()
    store.ingest(db, diverged, [{"seq": 1, "type": "state", "state": "DIVERGED", "message": COLLAPSE}])
    for run_id in (diverged, silent):  # both drivers exited non-zero (DIVERGED_EXIT for the first)
        launcher.submitted[run_id] = "FAILED"
    sup.tick()
    with db.read() as s:
        got = {run_id: (store.get_run(s, run_id).state, store.get_run(s, run_id).message)
               for run_id in (diverged, silent)}
    assert got[diverged] == ("DIVERGED", COLLAPSE)
    assert got[silent] == ("FAILED", "Ray: dry-run launcher")  # the same tick did reconcile: the check is not vacuous


def test_cli_shows_a_diverged_job_and_following_it_exits_non_zero(dry_server, capsys):
    parser = argparse.ArgumentParser(prog="drpt-ray")
    register(parser.add_subparsers(dest="command", required=True))
    with dry_server.http() as c:
        jid = c.post("/v1/jobs", json=TINY_SFT).json()["id"]
        _diverged_job(c, jid)

    def run(*argv) -> tuple[int, str]:
        args = parser.parse_args([*argv, "--url", dry_server.url, "--token", TOKEN])
        return args.func(args), capsys.readouterr().out

    rc, out = run("status", jid)
    assert rc == 0 and f"{jid}  DIVERGED" in out and COLLAPSE in out
    rc, out = run("logs", "-f", jid)
    assert rc == 1
    assert f"[alert] step 3: {COLLAPSE}" in out and f"[DIVERGED] {COLLAPSE}" in out


def test_driver_reports_diverged_with_artifacts_and_exits_3(dry_server, tmp_path, monkeypatch):
    from drpt_ray import trainer

    def collapsing_run_job(spec, on_metrics=None, address=None, on_alert=None, on_samples=None):
        """`run_job`'s side of the contract when the guard stops a job at step 3, without training
        (tests/control_plane/test_ray_jobs.py trains one to collapse)."""
        for step in range(4):
            on_metrics({"step": step, "reward/reward_std": 0.0})
        (Path(spec.output_dir) / "checkpoints" / "step_2").mkdir(parents=True)
        on_alert(3, COLLAPSE)
        raise trainer.Diverged(3, COLLAPSE)

    monkeypatch.setattr(trainer, "run_job", collapsing_run_job)
    spec = tmp_path / "job.yaml"
    spec.write_text(f"mode: sft\nsteps: 20\neval_every: 10\nprogress: false\noutput_dir: {tmp_path / 'out'}\n")
    with dry_server.http() as c:
        jid = c.post("/v1/jobs", json=TINY_SFT).json()["id"]
    monkeypatch.setenv("DRPT_INGEST_TOKEN", ingest_token(jid))  # what the launcher gives the job's driver
    args = argparse.Namespace(spec=str(spec), address=None, output_dir=None, job_id=jid, report_url=dry_server.url)
    assert reported_run(args) == DIVERGED_EXIT == 3
    with dry_server.http() as c:
        job = c.get(f"/v1/jobs/{jid}").json()  # reported_run returns once its events are acknowledged
        events = sse_events(c, f"/v1/jobs/{jid}/events?follow=false")
    assert job["state"] == "DIVERGED" and job["message"] == f"step 3: {COLLAPSE}" and job["step"] == 3
    assert job["artifacts"]["checkpoints"] == [str((tmp_path / "out" / "checkpoints" / "step_2").resolve())]
    assert [(e.json()["step"], e.json()["message"]) for e in events if e.event == "alert"] == [(3, COLLAPSE)]
    assert any(e.event == "log" and e.json()["line"] == f"drpt-ray: diverged at step 3: {COLLAPSE}" for e in events)
