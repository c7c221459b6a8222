"""End to end on a real local Ray (Jobs API, token auth on) behind a real uvicorn control plane:
a tiny RLVR job followed by 20 SSE clients, one with a shipped working directory, cancel, SIGKILL +
restart of the control plane mid-job, a job the divergence guard stops, and a Tune sweep of
regularizer strengths."""

from __future__ import annotations

import faulthandler
import os
import shutil
import threading
import time

import httpx
import pytest

from drpt_ray.demo import RLVR_DEMO
from tests.control_plane.conftest import ROOT, make_server, wait_for
from tests.control_plane.test_api import sse_events

pytestmark = pytest.mark.slow

QUIET = {"progress": False, "tensorboard": False, "checkpoint": {"resume": False}}
RLVR_TINY = RLVR_DEMO | QUIET | {
    "name": "rlvr-tiny", "steps": 5, "warm_start_sft_steps": 20, "eval_every": 5, "eval_size": 16, "batch_size": 4,
    "target_batch_size": 2, "rollout": {"sampling": {"n": 4, "max_new_tokens": 8, "temperature": 0.7}},
}
SFT = {"mode": "sft", "eval_every": 20} | QUIET


@pytest.fixture(autouse=True)
def watchdog():
    """No test may hang CI: dump every stack and exit after 900 s."""
    faulthandler.dump_traceback_later(900, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def ray_server(ray_cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("raycp")
    (workdir / "data").mkdir()
    (workdir / "data" / "broken.jsonl").write_text("this line is not JSON\n")  # readable, but no dataset
    s = make_server(workdir, RAY_ADDRESS=ray_cluster.dashboard_url,
                    DRPT_MAX_RUNNING_JOBS=1, DRPT_READ_ROOTS=str(workdir / "data"),
                    DRPT_WORKING_DIR_MAX_BYTES=1 << 20, DRPT_USER_CODE="true",
                    DRPT_USER_CODE_MODULES="shipped_reward").start()
    yield s
    s.stop()


def _wait_for_step(c: httpx.Client, jid: str, step: int, timeout: float) -> None:
    """Follow the job's stream until it reports metrics for `step` (or fail on a terminal state)."""
    deadline = time.monotonic() + timeout
    with c.stream("GET", f"/v1/jobs/{jid}/events", timeout=httpx.Timeout(10, read=timeout)) as r:
        from drpt_ray.client import iter_sse

        for ev in iter_sse(r.iter_lines()):
            if ev.event == "metrics" and ev.json()["step"] >= step:
                return
            assert ev.event != "end", f"job ended early: {ev.data}"
            assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
    raise AssertionError("stream closed")


def _assert_complete_stream(events: list, steps: int) -> None:
    ids = [int(e.id) for e in events if e.id]
    assert ids == list(range(1, len(ids) + 1)), "stream positions have a gap"
    seqs = [e.json()["seq"] for e in events if e.id and e.json().get("seq") is not None]
    assert seqs == list(range(1, len(seqs) + 1)), "driver seqs have a gap or a duplicate"
    assert [e.json()["step"] for e in events if e.event == "metrics"] == list(range(steps + 1))


def test_rlvr_job_succeeds_and_20_sse_clients_each_get_every_event(ray_server, ray_cluster):
    if os.environ.get("RAY_AUTH_MODE") != "disabled":  # Ray 2.60's default: the launcher must send the token
        assert httpx.get(f"{ray_cluster.dashboard_url}/api/version", timeout=10).status_code == 401
    with ray_server.http(limits=httpx.Limits(max_connections=40)) as c:
        job = c.post("/v1/jobs", json=RLVR_TINY)
        assert job.status_code == 201, job.text
        jid = job.json()["id"]
        got: list[list | None] = [None] * 20

        def follow(i: int) -> None:
            got[i] = sse_events(c, f"/v1/jobs/{jid}/events")

        threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(20)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300  # one budget for all 20, not 300 s each
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        done = c.get(f"/v1/jobs/{jid}").json()
        assert done["state"] == "SUCCEEDED", (done["message"], c.get(f"/v1/jobs/{jid}/logs").text[-3000:])
        stored = sse_events(c, f"/v1/jobs/{jid}/events?follow=false")
        _assert_complete_stream(stored, RLVR_TINY["steps"])
        for events in got:
            assert events is not None, "an SSE client did not reach the end event"
            assert [(e.id, e.event, e.data) for e in events] == [(e.id, e.event, e.data) for e in stored]

        history = c.get(f"/v1/jobs/{jid}/metrics").json()
        assert history["total"] == RLVR_TINY["steps"] + 1
        assert [m["step"] for m in history["items"]] == list(range(RLVR_TINY["steps"] + 1))
        assert "eval/target_reward" in history["items"][0] and "reward/reward_mean" in history["items"][1]
        artifacts = c.get(f"/v1/jobs/{jid}/artifacts").json()
        assert artifacts["model"] and artifacts["model"].endswith("/model")
        assert any(f["path"] == "metrics.jsonl" for f in artifacts["files"])
        logs = c.get(f"/v1/jobs/{jid}/logs").text
        assert "summary (first -> last)" in logs
        # the driver's real environment (issue 22, item 2): its run's ingest token, none of the control plane's secrets
        (line,) = [x for x in logs.splitlines() if x.startswith("drpt-ray driver: environment has")]
        assert "DRPT_INGEST_TOKEN" in line and line.endswith("; control-plane secrets: none"), line
        wait_for(lambda: ray_cluster.job_status(done["ray_job_id"]) == "SUCCEEDED", 60, "the Ray job to exit 0")


def test_a_job_with_a_working_dir_imports_its_reward_and_reads_its_data_from_it(ray_server, tmp_path):
    """`drpt-ray submit --working-dir` (issue 26, item 2): the reward module and the data files exist
    only in the shipped directory; the job reads both from Ray's copy of it and writes to its run directory."""
    example = ROOT / "examples" / "custom_task"
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    for name in ("general", "target", "eval"):
        shutil.copy(example / f"{name}.jsonl", project / "data")
    shutil.copy(example / "reward.py", project / "shipped_reward.py")  # a name no module on the cluster has
    files = {f"{name}_path": f"data/{name}.jsonl" for name in ("general", "target", "eval")}
    spec = RLVR_TINY | {"name": "rlvr-working-dir", "data": {"task": None, **files},
                        "reward": {"kind": "function", "function": "shipped_reward:score"}}
    job = ray_server.client().submit(spec, working_dir=project)
    assert job.wait(timeout=300) == "SUCCEEDED", (job.info.message, job.logs()[-3000:])
    assert job.info.artifacts["output_dir"] == str(ray_server.workdir / "runs" / job.id / "runs" / "job")
    history = job.metrics()
    assert len(history) == RLVR_TINY["steps"] + 1 and "reward/reward_mean" in history[1]


def test_cancel_a_running_job_stops_its_ray_job(ray_server, ray_cluster):
    with ray_server.http() as c:
        jid = c.post("/v1/jobs", json=SFT | {"steps": 5000}).json()["id"]
        _wait_for_step(c, jid, 1, timeout=180)
        r = c.post(f"/v1/jobs/{jid}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
        ray_job_id = r.json()["ray_job_id"]
        wait_for(lambda: ray_cluster.job_status(ray_job_id) == "STOPPED", 60, "Ray to stop the job")
        events = sse_events(c, f"/v1/jobs/{jid}/events")
        assert events[-1].event == "end" and events[-1].json()["state"] == "CANCELLED"
        assert c.get(f"/v1/jobs/{jid}").json()["state"] == "CANCELLED"


def test_a_job_bigger_than_the_cluster_is_refused_at_submission(ray_server):
    """The cluster has 4 CPUs: an RL job with 3 rollout workers needs 5 (driver, learner, 3 engines),
    a sweep trial likewise; both are a 422 at once (they would wait on Ray forever), 3 CPUs are fine."""
    big = RLVR_TINY | {"rollout": RLVR_TINY.get("rollout", {}) | {"num_workers": 3}}
    with ray_server.http() as c:
        r = c.post("/v1/jobs", json=big)
        assert r.status_code == 422 and [d["loc"] for d in r.json()["detail"]] == [["body", "resources"]], r.text
        assert "reserves 5 CPUs" in r.text and "alive nodes hold 4" in r.text
        r = c.post("/v1/sweeps", json={"base": RLVR_TINY, "space": {"rollout.num_workers": {"values": [1, 3]}}})
        assert r.status_code == 422 and "alive nodes hold 4" in r.text, r.text


def test_a_failing_job_reports_failed_with_its_reason(ray_server):
    broken = str(ray_server.workdir / "data" / "broken.jsonl")  # under the server's read roots, so admitted
    bad = SFT | {"steps": 5, "data": {"task": None, "general_path": broken, "target_path": broken}}
    with ray_server.http() as c:
        jid = c.post("/v1/jobs", json=bad).json()["id"]
        events = sse_events(c, f"/v1/jobs/{jid}/events")
        job = c.get(f"/v1/jobs/{jid}").json()
    assert events[-1].json()["state"] == job["state"] == "FAILED"
    assert broken in job["message"]
    assert any(e.event == "log" and broken in e.json()["line"] for e in events)


def test_a_collapsing_rlvr_job_ends_diverged_with_an_alert(ray_server, ray_cluster):
    # lr 0.05 collapses the tiny policy: every response scores alike, so the guard trips
    steps = 50
    spec = RLVR_TINY | {
        "name": "rlvr-collapse", "steps": steps, "algorithm": RLVR_DEMO["algorithm"],
        "optim": RLVR_DEMO["optim"] | {"lr": 0.05},
        "divergence": {"zero_variance_steps": 3, "stop_on_divergence": True},
    }
    with ray_server.http() as c:
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        jid = r.json()["id"]
        events = sse_events(c, f"/v1/jobs/{jid}/events")
        job = c.get(f"/v1/jobs/{jid}").json()
        assert events[-1].json()["state"] == job["state"] == "DIVERGED", (
            job["message"], c.get(f"/v1/jobs/{jid}/logs").text[-3000:])
        alerts = [e.json() for e in events if e.event == "alert"]
        # the alert that stopped it
        assert alerts and f"step {alerts[-1]['step']}: {alerts[-1]['message']}" == job["message"]
        assert alerts[-1]["step"] == job["step"]
        assert job["step"] < steps and job["artifacts"]["output_dir"]
        # the driver exits 3 after reporting DIVERGED; Ray's FAILED must not overwrite it
        wait_for(lambda: ray_cluster.job_status(job["ray_job_id"]) == "FAILED", 60, "the Ray job to exit non-zero")
        time.sleep(1.0)  # > DRPT_POLL_INTERVAL_S: the supervisor has seen Ray's FAILED
        assert c.get(f"/v1/jobs/{jid}").json()["state"] == "DIVERGED"


def test_sigkill_and_restart_of_the_control_plane_loses_nothing(server_factory, ray_cluster):
    s = server_factory("restart", RAY_ADDRESS=ray_cluster.dashboard_url, DRPT_MAX_RUNNING_JOBS=1)
    steps = 100
    with s.http() as c:
        jid = c.post("/v1/jobs", json=SFT | {"steps": steps}).json()["id"]
        _wait_for_step(c, jid, 3, timeout=180)
    s.kill()  # mid-job: the driver keeps training and buffers its events
    time.sleep(2.0)
    s.start()  # same port (the driver's report URL) and database
    client = s.client()
    final = [ev for ev in client.follow(jid, reconnect_for_s=60) if ev.event == "end"]
    with s.http() as c:
        job = c.get(f"/v1/jobs/{jid}").json()
        assert final[0].json()["state"] == job["state"] == "SUCCEEDED", job["message"]
        _assert_complete_stream(sse_events(c, f"/v1/jobs/{jid}/events?follow=false"), steps)
        assert [m["step"] for m in c.get(f"/v1/jobs/{jid}/metrics").json()["items"]] == list(range(steps + 1))


def test_sweep_of_regularizer_strengths_reports_a_best_trial(ray_server):
    spec = {
        "name": "frac-sweep",
        "base": SFT | {"steps": 10, "eval_every": 5},
        "space": {"regularizer.frac": {"values": [0.25, 0.5, 1.0]}},
        "metric": "eval/target_loss", "mode": "min", "scheduler": "grid", "max_concurrent_trials": 3,
    }
    with ray_server.http() as c:
        r = c.post("/v1/sweeps", json=spec)
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        events = sse_events(c, f"/v1/sweeps/{sid}/events")
        sweep = c.get(f"/v1/sweeps/{sid}").json()
    logs = [e.json()["line"] for e in events if e.event == "log"]
    assert events[-1].json()["state"] == sweep["state"] == "SUCCEEDED", (sweep["message"], sweep["trials"], logs[-30:])
    assert sorted(t["config"]["regularizer.frac"] for t in sweep["trials"]) == [0.25, 0.5, 1.0]
    assert all(t["state"] == "TERMINATED" and t["steps"] == 10 and t["value"] is not None for t in sweep["trials"])
    best = sweep["best"]
    assert best is not None and best["value"] == min(t["value"] for t in sweep["trials"])
    assert any(e.event == "trial" for e in events) and any(e.event == "sweep" for e in events)
