"""The control plane's HTTP contract on a real uvicorn server, with the dry-run launcher (no Ray):
auth, validation, limits, the queue, idempotent ingest, SSE resume, the reporter across a
control-plane restart, and the CLI client."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from drpt_ray.client import ClientError, iter_sse
from drpt_ray.reporting import EventReporter
from drpt_ray.wire import ErrorResponse
from tests.control_plane.conftest import H, TOKEN, ingest_headers, ingest_token, wait_for

TINY_SFT = {"mode": "sft", "steps": 20, "eval_every": 10, "progress": False}


def sse_events(http: httpx.Client, path: str, headers: dict | None = None) -> list:
    with http.stream("GET", path, headers=headers or {}, timeout=httpx.Timeout(10, read=30)) as r:
        assert r.status_code == 200, r.read()
        out = []
        for ev in iter_sse(r.iter_lines()):
            out.append(ev)
            if ev.event == "end":
                return out
    raise AssertionError("stream closed without an end event")


def test_healthz_needs_no_token_and_openapi_documents_v1(dry_server):
    assert httpx.get(f"{dry_server.url}/healthz", timeout=5).status_code == 200
    with dry_server.http() as c:
        paths = c.get("/openapi.json").json()["paths"]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/metrics", "/v1/jobs/{job_id}/artifacts",
                 "/v1/sweeps", "/v1/sweeps/{sweep_id}", "/metrics"):
        assert path in paths
    assert (paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            .endswith("/JobSpec"))


INGEST = "/v1/ingest/job_0000000000000000"
HI = ingest_headers("job_0000000000000000")  # that run's driver
BAD = [
    # (name, method, path, body, headers, status, words the message must contain)
    ("no token", "GET", "/v1/jobs", None, {}, 401, ["bearer"]),
    ("no token for the schema", "GET", "/openapi.json", None, {}, 401, ["bearer"]),
    ("no token for metrics", "GET", "/metrics", None, {}, 401, ["bearer"]),
    ("wrong token", "GET", "/v1/jobs", None, {"Authorization": "Bearer wrong-token-123456789"}, 403, ["invalid"]),
    ("no body", "POST", "/v1/jobs", None, H, 422, ["body", "required"]),
    ("missing sweep space", "POST", "/v1/sweeps", {"base": TINY_SFT}, H, 422, ["body.space", "required"]),
    ("wrong type", "POST", "/v1/jobs", {"steps": "many"}, H, 422, ["body.steps", "integer"]),
    ("unknown field", "POST", "/v1/jobs", {"stepz": 5}, H, 422, ["body.stepz", "not permitted"]),
    ("unknown regularizer", "POST", "/v1/jobs", {"regularizer": {"feasible_set": "magic"}},
     H, 422, ["body.regularizer.feasible_set", "layerwise_subset"]),
    ("negative strength", "POST", "/v1/jobs", {"regularizer": {"frac": -0.5}},
     H, 422, ["body.regularizer.frac", "greater than or equal to 0"]),
    ("negative tau", "POST", "/v1/jobs", {"regularizer": {"tau": -1}},
     H, 422, ["body.regularizer.tau", "greater than 0"]),
    ("unknown advantage", "POST", "/v1/jobs", {"mode": "rlvr", "algorithm": {"advantage": "nope"}},
     H, 422, ["body.algorithm.advantage", "grpo"]),
    ("inconsistent spec", "POST", "/v1/jobs", {"mode": "rlhf"}, H, 422, ["reward.kind"]),
    ("fsdp on one worker", "POST", "/v1/jobs", {"resources": {"fsdp": True}},
     H, 422, ["resources.learner_num_workers"]),
    ("two_pass on a layer-wise set", "POST", "/v1/jobs",
     {"regularizer": {"feasible_set": "layerwise_subset", "passes": "two_pass"}}, H, 422,
     ["body.regularizer", "regularizer.passes", "'layerwise_subset'"]),
    ("sweep over a non-field", "POST", "/v1/sweeps", {"space": {"regularizer.strength": {"values": [1]}}},
     H, 422, ["regularizer.strength", "not a JobSpec field"]),
    ("bad state filter", "GET", "/v1/jobs?state=DONE", None, H, 422, ["query.state"]),
    ("negative page", "GET", "/v1/jobs?offset=-1", None, H, 422, ["query.offset"]),
    ("huge body", "POST", "/v1/jobs", {"name": "x" * (2 << 20)}, H, 413, ["limit"]),
    ("unknown job", "GET", "/v1/jobs/job_0000000000000000", None, H, 404, ["job_0000000000000000"]),
    ("unknown job cancel", "POST", "/v1/jobs/job_0000000000000000/cancel", None, H, 404, ["no job"]),
    ("unknown job events", "GET", "/v1/jobs/job_0000000000000000/events", None, H, 404, ["no job"]),
    ("unknown job metrics", "GET", "/v1/jobs/job_0000000000000000/metrics", None, H, 404, ["no job"]),
    ("unknown sweep", "GET", "/v1/sweeps/swp_0000000000000000", None, H, 404, ["no sweep"]),
    ("bad ingest token", "GET", "/v1/ingest/job_0000000000000000", None,
     {"Authorization": "Bearer not-the-ingest-token"}, 403, ["ingest token"]),
    ("alert without message", "POST", INGEST, {"events": [{"seq": 1, "type": "alert", "step": 3}]}, HI, 422,
     ["body.events.0.alert.message", "field required"]),
    ("alert with a blank message", "POST", INGEST,
     {"events": [{"seq": 1, "type": "alert", "step": 3, "message": " "}]}, HI, 422,
     ["body.events.0.alert.message", "pattern"]),
    ("alert with a text step", "POST", INGEST, {"events": [{"seq": 1, "type": "alert", "step": "abc", "message": "x"}]},
     HI, 422, ["body.events.0.alert.step", "integer", "'abc'"]),
    ("unknown driver state", "POST", INGEST, {"events": [{"seq": 1, "type": "state", "state": "EXPLODED"}]}, HI, 422,
     ["body.events.0.state.state", "DIVERGED", "'EXPLODED'"]),
    # issue 13, "what an outside client found": each was a 500, a broken stream, or accepted
    ("huge offset, jobs", "GET", f"/v1/jobs?offset={2**63}", None, H,
     422, ["query.offset", "less than or equal to 9223372036854775807"]),
    ("huge offset, sweeps", "GET", f"/v1/sweeps?offset={2**63}", None, H, 422, ["query.offset"]),
    ("huge offset, metrics", "GET", f"/v1/jobs/job_0000000000000000/metrics?offset={2**63}",
     None, H, 422, ["query.offset"]),
    ("non-ASCII digit in Last-Event-ID", "GET",
     "/v1/jobs/job_0000000000000000/events", None, H | {"Last-Event-ID": b"\xb2"}, 422,
     ["header.last-event-id", "integer"]),
    ("Last-Event-ID past int64", "GET", "/v1/jobs/job_0000000000000000/events",
     None, H | {"Last-Event-ID": str(2**63)}, 422,
     ["header.last-event-id", "less than or equal"]),
    ("after past int64", "GET", f"/v1/sweeps/swp_0000000000000000/events?after={2**63}", None, H, 422, ["query.after"]),
    ("NaN lr", "POST", "/v1/jobs", {"optim": {"lr": float("nan")}}, H, 422, ["body.optim.lr", "finite number"]),
    ("-Infinity tau", "POST", "/v1/jobs", {"regularizer": {"tau": float("-inf")}},
     H, 422, ["body.regularizer.tau", "finite number"]),
    ("Infinity lr", "POST", "/v1/jobs", {"optim": {"lr": float("inf")}}, H, 422, ["body.optim.lr", "finite number"]),
    ("NaN in a sweep range", "POST", "/v1/sweeps",
     {"scheduler": "random", "space": {"optim.lr": {"low": float("nan"), "high": 1.0}}}, H, 422,
     ["body.space.optim.lr.low", "finite number"]),
    ("bool steps", "POST", "/v1/jobs", {"steps": True}, H, 422, ["body.steps", "valid integer", "(got true)"]),
    ("text steps", "POST", "/v1/jobs", {"steps": "30"}, H, 422, ["body.steps", "valid integer", "'30'"]),
    ("float steps", "POST", "/v1/jobs", {"steps": 30.0}, H, 422, ["body.steps", "valid integer"]),
    ("2**70 steps", "POST", "/v1/jobs", {"steps": 2**70}, H, 422, ["body.steps", "less than or equal to 2147483647"]),
    ("bool lr", "POST", "/v1/jobs", {"optim": {"lr": True}}, H, 422, ["body.optim.lr", "valid number"]),
    ("number for a flag", "POST", "/v1/jobs", {"progress": 1}, H, 422, ["body.progress", "valid boolean"]),
    ("500 kB name", "POST", "/v1/jobs", {"name": "x" * 500_000}, H, 422, ["body.name", "at most 200 characters"]),
    ("long sweep name", "POST", "/v1/sweeps",
     {"name": "x" * 201, "space": {"regularizer.tau": {"values": [1.0]}}}, H, 422, ["body.name", "200"]),
    ("second grid value invalid", "POST", "/v1/sweeps", {"space": {"regularizer.tau": {"values": [1.0, -2.0]}}}, H, 422,
     ["regularizer.tau=-2.0", "greater than 0"]),
    ("grid value of the wrong type", "POST", "/v1/sweeps",
     {"space": {"steps": {"values": [5, "30"]}}}, H, 422, ["steps='30'", "valid integer"]),
    ("range end invalid", "POST", "/v1/sweeps",
     {"scheduler": "random", "space": {"regularizer.frac": {"low": 0.5, "high": 2.0}}}, H, 422,
     ["regularizer.frac=2.0", "less than or equal to 1"]),
    ("output_dir climbing out", "POST", "/v1/jobs", {"output_dir": "../../../../srv/x"},
     H, 422, ["body.output_dir", "no '..'", "../../../../srv/x"]),
    ("absolute output_dir", "POST", "/v1/jobs", {"output_dir": "/etc/drpt"},
     H, 422, ["body.output_dir", "no absolute path"]),
    ("absolute sweep output_dir", "POST", "/v1/sweeps",
     {"output_dir": "/etc/drpt", "space": {"regularizer.tau": {"values": [1.0]}}}, H, 422,
     ["body.output_dir", "relative path"]),
    ("sweep base output_dir climbing out", "POST", "/v1/sweeps",
     {"base": {"output_dir": "a/../../x"}, "space": {"regularizer.tau": {"values": [1.0]}}},
     H, 422, ["body.base.output_dir", "no '..'"]),
    ("output_dir searched by a sweep", "POST", "/v1/sweeps", {"space": {"output_dir": {"values": ["/etc"]}}}, H, 422,
     ["'output_dir'", "cannot be searched"]),
    ("ingest seq past int32", "POST", INGEST, {"events": [{"seq": 2**70, "type": "log", "line": "x"}]}, HI, 422,
     ["body.events.0.log.seq", "less than or equal to 2147483647"]),
    ("metrics step as text", "POST", INGEST,
     {"events": [{"seq": 1, "type": "metrics", "step": "abc", "metrics": {}}]}, HI, 422,
     ["body.events.0.metrics.step", "valid integer", "'abc'"]),
    ("metrics' own step as text", "POST", INGEST,
     {"events": [{"seq": 1, "type": "metrics", "step": 1, "metrics": {"step": "abc"}}]}, HI, 422,
     ["body.events.0.metrics.metrics", "`step` must be an integer", "'abc'"]),
    ("NaN metric", "POST", INGEST,
     {"events": [{"seq": 1, "type": "metrics", "step": 1, "metrics": {"loss": float("nan")}}]}, HI, 422,
     ["body.events.0.metrics.metrics.loss", "finite number"]),
    ("log without line", "POST", INGEST, {"events": [{"seq": 1, "type": "log"}]},
     HI, 422, ["body.events.0.log.line", "field required"]),
    ("unknown event type", "POST", INGEST, {"events": [{"seq": 1, "type": "gossip"}]},
     HI, 422, ["body.events.0", "'gossip'", "'metrics'"]),
    ("unknown event field", "POST", INGEST, {"events": [{"seq": 1, "type": "log", "line": "x", "lvl": 3}]}, HI, 422,
     ["body.events.0.log.lvl", "not permitted"]),
]


@pytest.mark.parametrize("name,method,path,body,headers,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_the_right_4xx_naming_the_problem(dry_server, name, method, path, body, headers, status, words):
    # json.dumps writes NaN and Infinity as the bare tokens a careless client sends (httpx's json= refuses them)
    content = None if body is None else json.dumps(body)
    with httpx.Client(base_url=dry_server.url, timeout=30) as c:
        r = c.request(method, path, content=content,
                      headers=headers | ({"Content-Type": "application/json"} if content else {}))
    assert r.status_code == status, r.text
    text = r.text
    assert "Traceback" not in text and 'File "' not in text
    err = ErrorResponse.model_validate(r.json())  # every refusal has the one shape
    for w in words:
        assert w.lower() in err.message.lower(), (w, err.message)
    assert (err.detail != []) == (status == 422)


def test_streamed_body_over_the_limit_is_413(dry_server):
    def chunks():
        for _ in range(40):
            yield b" " * 65536  # 2.5 MiB, no Content-Length

    with dry_server.http() as c:
        r = c.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_50_concurrent_submissions_are_recorded_once_and_queued(server_factory):
    s = server_factory("queue", DRPT_LAUNCHER="dry-run", DRPT_MAX_RUNNING_JOBS=2)
    with s.http() as c, ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: c.post("/v1/jobs", json=TINY_SFT | {"name": f"j{i}"}), range(50)))
        assert [r.status_code for r in responses] == [201] * 50
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 50
        listed = c.get("/v1/jobs", params={"limit": 100}).json()
        assert listed["total"] == 50 and {j["id"] for j in listed["items"]} == ids
        assert sorted(j["name"] for j in listed["items"]) == sorted(f"j{i}" for i in range(50))

        def states():
            page = c.get("/v1/jobs", params={"limit": 100}).json()["items"]
            counts = {st: sum(j["state"] == st for j in page) for st in ("QUEUED", "PENDING", "RUNNING")}
            return counts if counts["QUEUED"] == 48 and counts["PENDING"] + counts["RUNNING"] == 2 else None

        wait_for(states, 20, "2 jobs admitted, 48 queued")  # DRPT_MAX_RUNNING_JOBS=2
        page1 = c.get("/v1/jobs", params={"limit": 20, "offset": 0}).json()["items"]
        page2 = c.get("/v1/jobs", params={"limit": 40, "offset": 20}).json()["items"]
        assert len(page1) == 20 and len(page2) == 30 and not {j["id"] for j in page1} & {j["id"] for j in page2}
        # a job never submitted has no launcher log: its log is the driver's streamed lines, `tail` the last ones
        queued = next(j["id"] for j in c.get("/v1/jobs", params={"state": "QUEUED"}).json()["items"])
        lines = [{"seq": i + 1, "type": "log", "line": f"line {i}"} for i in range(3)]
        assert c.post(f"/v1/ingest/{queued}", headers=ingest_headers(queued),
                      json={"events": lines}).json()["stored"] == 3
        assert c.get(f"/v1/jobs/{queued}").json()["ray_job_id"] is None
        assert c.get(f"/v1/jobs/{queued}/logs").text == "line 0\nline 1\nline 2\n"
        assert c.get(f"/v1/jobs/{queued}/logs", params={"tail": 2}).text == "line 1\nline 2\n"
        cancelled = list(pool.map(lambda i: c.post(f"/v1/jobs/{i}/cancel"), ids))
        assert all(r.status_code == 200 and r.json()["state"] == "CANCELLED" for r in cancelled)
        assert c.get("/v1/jobs", params={"state": "CANCELLED"}).json()["total"] == 50
        assert c.post(f"/v1/jobs/{next(iter(ids))}/cancel").status_code == 409
        prom = c.get("/metrics").text
    assert 'drpt_jobs{state="CANCELLED"} 50.0' in prom
    assert 'drpt_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="201"} 50.0' in prom


def test_ingest_is_idempotent_and_sse_resumes_after_last_event_id(dry_server):
    with dry_server.http() as c:
        job = c.post("/v1/jobs", json=TINY_SFT).json()
        jid = job["id"]
        # the supervisor launches the job asynchronously; the logs assert below needs it launched
        wait_for(lambda: c.get(f"/v1/jobs/{jid}").json()["ray_job_id"] is not None,
                 30, "the supervisor to launch the job")
        batch = [{"seq": 1, "type": "state", "state": "RUNNING"}] + [
            {"seq": i + 2, "type": "metrics", "step": i, "metrics": {"step": i, "loss": 1.0 / (i + 1)}}
            for i in range(5)
        ]
        assert c.post(f"/v1/ingest/{jid}", headers=ingest_headers(jid),
                      json={"events": batch}).json() == {"stored": 6, "last_seq": 6}
        again = batch[3:] + [{"seq": 7, "type": "log", "line": "hello"}]  # a retried batch overlapping the first
        assert c.post(f"/v1/ingest/{jid}", headers=ingest_headers(jid),
                      json={"events": again}).json() == {"stored": 1, "last_seq": 7}
        assert c.get(f"/v1/ingest/{jid}", headers=ingest_headers(jid)).json()["last_seq"] == 7
        steps = [m["step"] for m in c.get(f"/v1/jobs/{jid}/metrics").json()["items"]]
        assert steps == [0, 1, 2, 3, 4]
        assert [m["step"]
                for m in c.get(f"/v1/jobs/{jid}/metrics", params={"offset": 3, "limit": 10}).json()["items"]] == [3, 4]

        first = sse_events(c, f"/v1/jobs/{jid}/events?follow=false")
        ids = [int(e.id) for e in first if e.id]
        assert ids == list(range(1, len(ids) + 1))
        resumed = sse_events(c, f"/v1/jobs/{jid}/events?follow=false", headers={"Last-Event-ID": str(ids[4])})
        assert [e.id for e in resumed if e.id] == [str(i) for i in ids[5:]]
        assert [e.event for e in resumed][-1] == "end"

        # a follower attached now gets the live tail, then `end` after the driver's SUCCEEDED
        got: list = []
        t = threading.Thread(target=lambda: got.extend(sse_events(c, f"/v1/jobs/{jid}/events",
                                                                  headers={"Last-Event-ID": str(ids[-1])})))
        t.start()
        c.post(f"/v1/ingest/{jid}", headers=ingest_headers(jid),
               json={"events": [{"seq": 8, "type": "state", "state": "SUCCEEDED", "message": None,
                                 "artifacts": {"output_dir": "/nonexistent/out"}}]})
        t.join(30)
        assert not t.is_alive()
        assert [(e.event, e.json().get("state")) for e in got] == [("state", "SUCCEEDED"), ("end", "SUCCEEDED")]
        done = c.get(f"/v1/jobs/{jid}").json()
        assert done["state"] == "SUCCEEDED" and done["step"] == 4
        assert c.get(f"/v1/jobs/{jid}/artifacts").json()["output_dir"] == "/nonexistent/out"
        # a submitted job's log is the launcher's (Ray's) whole log, not the streamed `log` lines
        assert c.get(f"/v1/jobs/{jid}/logs").text == f"dry-run launcher: nothing ran for {done['ray_job_id']}\n"
        assert done["ray_job_id"] is not None


def test_reporter_buffers_while_the_control_plane_is_down(server_factory):
    s = server_factory("reporter", DRPT_LAUNCHER="dry-run")
    with s.http() as c:
        jid = c.post("/v1/jobs", json=TINY_SFT).json()["id"]
    s.kill()
    reporter = EventReporter(s.url, jid, ingest_token(jid))
    reporter.state("RUNNING")
    for i in range(300):
        reporter.on_metrics({"step": i, "loss": float(i)})
    reporter.log("a line")
    s.start()  # same port, same database
    assert reporter.close(timeout=30)
    # a restarted driver continues the sequence instead of reusing numbers
    second = EventReporter(s.url, jid, ingest_token(jid))
    second.state("SUCCEEDED")
    assert second.close(timeout=30)
    with s.http() as c:
        events = sse_events(c, f"/v1/jobs/{jid}/events?follow=false")
        seqs = [e.json()["seq"] for e in events if e.id and "seq" in e.json()]
        assert seqs == list(range(1, 304))
        assert [m["step"] for m in c.get(f"/v1/jobs/{jid}/metrics").json()["items"]] == list(range(300))
        assert c.get(f"/v1/jobs/{jid}").json()["state"] == "SUCCEEDED"


def test_cli_client_submit_status_cancel(dry_server, tmp_path, capsys):
    import argparse

    from drpt_ray.service_cli import register

    parser = argparse.ArgumentParser(prog="drpt-ray")
    register(parser.add_subparsers(dest="command", required=True))
    spec = tmp_path / "job.yaml"
    spec.write_text("mode: sft\nsteps: 20\neval_every: 10\nprogress: false\n")
    common = ["--url", dry_server.url, "--token", TOKEN]

    def run(*argv) -> str:
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0
        return capsys.readouterr().out

    jid = run("submit", str(spec), *common).strip()
    assert jid.startswith("job_")
    assert jid in run("status", *common)
    assert "mode=sft" in run("status", jid, *common)
    assert "CANCELLED" in run("cancel", jid, *common)
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: sft\nregularizer: {feasible_set: magic}\n")
    with pytest.raises(ValueError, match="regularizer.feasible_set"):
        run("submit", str(bad), *common)
    with pytest.raises(ClientError, match="HTTP 403"):
        run("status", "--url", dry_server.url, "--token", "wrong-token-123456789")
