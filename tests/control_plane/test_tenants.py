"""Tenants, read roots and admission on a shared server (issue 22, items 3-5), on a real uvicorn
server (dry-run launcher: nothing runs; the supervisor's admission and reconcile are real), on
SQLite and Postgres.

The oracle for "another tenant's run is invisible" is the answer for an id that does not exist:
the same status and the same message, so a tenant cannot even learn that the run exists.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.control_plane.conftest import ingest_headers, wait_for

ALICE, BOB, OPS = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef01", "ops-token-0123456789abcdef012"
TENANTS = {"DRPT_API_TOKENS": f"alice:{ALICE},bob:{BOB},ops:{OPS}", "DRPT_ADMIN_TENANTS": "ops"}
SFT = {"mode": "sft", "steps": 2, "progress": False}
RL = {"mode": "rlvr", "steps": 2, "progress": False}
SWEEP = {"base": SFT, "space": {"optim.lr": {"values": [0.1, 0.2]}}}


def as_(s, token: str) -> httpx.Client:
    return httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def fields(r) -> list[str]:
    return [".".join(map(str, d["loc"])) for d in r.json()["detail"]]


def test_a_tenant_sees_streams_and_cancels_only_its_own_runs(server_factory):
    s = server_factory(DRPT_LAUNCHER="dry-run", DRPT_MAX_RUNNING_JOBS=4, **TENANTS)
    with as_(s, ALICE) as alice, as_(s, BOB) as bob, as_(s, OPS) as ops:
        job = alice.post("/v1/jobs", json=SFT).json()
        sweep = alice.post("/v1/sweeps", json=SWEEP).json()
        assert job["tenant"] == sweep["tenant"] == "alice"
        bobs = bob.post("/v1/jobs", json=SFT).json()
        jid, sid = job["id"], sweep["id"]
        wait_for(lambda: alice.get(f"/v1/jobs/{jid}").json()["state"] == "RUNNING", 20, "alice's job running (dry-run)")

        routes = [("GET", "/v1/jobs/{j}"), ("GET", "/v1/jobs/{j}/metrics"), ("GET", "/v1/jobs/{j}/logs"),
                  ("GET", "/v1/jobs/{j}/artifacts"), ("GET", "/v1/jobs/{j}/events?follow=false"),
                  ("POST", "/v1/jobs/{j}/stream-token"), ("POST", "/v1/jobs/{j}/cancel"),
                  ("GET", "/v1/sweeps/{s}"), ("GET", "/v1/sweeps/{s}/events?follow=false"),
                  ("GET", "/v1/sweeps/{s}/logs"),
                  ("POST", "/v1/sweeps/{s}/stream-token"), ("POST", "/v1/sweeps/{s}/cancel")]
        for method, route in routes:
            theirs = bob.request(method, route.format(j=jid, s=sid))
            missing = bob.request(method, route.format(j="job_0000000000000000", s="swp_0000000000000000"))
            assert theirs.status_code == missing.status_code == 404, (route, theirs.text)
            assert theirs.json()["message"].replace(jid, "X").replace(sid, "X") == \
                (missing.json()["message"].replace("job_0000000000000000", "X")
                 .replace("swp_0000000000000000", "X")), route
        assert [j["id"] for j in bob.get("/v1/jobs").json()["items"]] == [bobs["id"]]
        assert bob.get("/v1/sweeps").json()["total"] == 0
        assert alice.get(f"/v1/jobs/{jid}").json()["state"] == "RUNNING"  # bob's cancel did nothing
        assert alice.get(f"/v1/sweeps/{sid}/logs").status_code == 200  # her sweep's driver log is hers to read

        # the admin tenant sees every run and may cancel any
        assert {j["id"] for j in ops.get("/v1/jobs").json()["items"]} == {jid, bobs["id"]}
        assert ops.get(f"/v1/sweeps/{sid}").status_code == 200
        assert ops.post(f"/v1/jobs/{bobs['id']}/cancel").json()["state"] == "CANCELLED"

        # driver events: only with the run's own ingest token, never with an API token (not even the owner's)
        event = {"events": [{"seq": 1, "type": "log", "line": "from outside"}]}
        for token in (ALICE, BOB, OPS):
            r = alice.post(f"/v1/ingest/{jid}", json=event, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 403 and "ingest token" in r.json()["message"], r.text
        assert alice.post(f"/v1/ingest/{jid}", json=event, headers=ingest_headers(bobs["id"])).status_code == 403
        assert alice.post(f"/v1/ingest/{jid}", json=event, headers=ingest_headers(jid)).json()["stored"] == 1


def test_per_tenant_running_limit_lets_other_tenants_through(server_factory):
    s = server_factory(DRPT_LAUNCHER="dry-run", DRPT_MAX_RUNNING_JOBS=3, DRPT_MAX_RUNNING_PER_TENANT=1, **TENANTS)
    with as_(s, ALICE) as alice, as_(s, BOB) as bob:
        a1, a2 = (alice.post("/v1/jobs", json=SFT).json()["id"] for _ in range(2))
        b1 = bob.post("/v1/jobs", json=SFT).json()["id"]
        wait_for(lambda: bob.get(f"/v1/jobs/{b1}").json()["state"] == "RUNNING",
                 20, "bob's job admitted past alice's queue")
        states = lambda: [alice.get(f"/v1/jobs/{j}").json()["state"] for j in (a1, a2)]  # noqa: E731
        assert states() == ["RUNNING", "QUEUED"]  # a free global slot, but alice is at her limit
        alice.post(f"/v1/jobs/{a1}/cancel")
        wait_for(lambda: states() == ["CANCELLED", "RUNNING"], 20, "alice's second job admitted once her first ended")


def test_a_run_running_without_a_ray_job_holds_no_slot_and_is_failed(server_factory):
    """Only its driver (its ingest token) can move a run, but a run reported RUNNING before it was
    submitted must neither hold a slot nor stay RUNNING (supervisor.ORPHAN_GRACE_TICKS: 100 x 0.05 s here)."""
    s = server_factory(DRPT_LAUNCHER="dry-run", DRPT_MAX_RUNNING_JOBS=1, DRPT_POLL_INTERVAL_S=0.05, **TENANTS)
    with as_(s, ALICE) as alice:
        first, second, third = (alice.post("/v1/jobs", json=SFT).json()["id"] for _ in range(3))
        wait_for(lambda: alice.get(f"/v1/jobs/{first}").json()["state"] == "RUNNING", 20, "the first job running")
        alice.post(f"/v1/ingest/{second}", json={"events": [{"seq": 1, "type": "state", "state": "RUNNING"}]},
                   headers=ingest_headers(second))
        assert alice.get(f"/v1/jobs/{second}").json()["state"] == "RUNNING"
        alice.post(f"/v1/jobs/{first}/cancel")
        wait_for(lambda: alice.get(f"/v1/jobs/{third}").json()["ray_job_id"] is not None,
                 20, "the third job takes the free slot")
        wait_for(lambda: alice.get(f"/v1/jobs/{second}").json()["state"] == "FAILED",
                 30, "the orphan failed by the supervisor")
        assert "no Ray job" in alice.get(f"/v1/jobs/{second}").json()["message"]
        assert alice.get(f"/v1/jobs/{second}").json()["ray_job_id"] is None


@pytest.fixture
def host(tmp_path: Path) -> dict[str, Path]:
    """A read root with a model dir, a symlink out of it, a directory outside it, and the runs dir inside it."""
    root = tmp_path / "shared"
    (root / "models" / "m").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data" / "general.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "key").write_text("secret")
    (root / "models" / "escape").symlink_to(outside)
    return {"root": root, "outside": outside, "runs": root / "runs"}


def test_reads_are_confined_to_the_read_roots_and_refusals_say_nothing_of_the_host(server_factory, host):
    root = host["root"]
    s = server_factory(DRPT_LAUNCHER="dry-run", DRPT_READ_ROOTS=str(root), DRPT_RUNS_DIR=str(host["runs"]), **TENANTS)
    with as_(s, ALICE) as alice, as_(s, BOB) as bob:
        ok = alice.post("/v1/jobs", json=SFT | {"model": {"path": str(root / "models" / "m")}})
        assert ok.status_code == 201, ok.text
        data = {"general_path": str(root / "data" / "general.jsonl"),
                "target_path": str(root / "data" / "general.jsonl")}
        assert alice.post("/v1/jobs", json=SFT | {"data": data}).status_code == 201
        run_dir = host["runs"] / ok.json()["id"]
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("{}\n")

        refused = ["/etc", "/root/.ssh", "/proc/1/root", str(host["outside"] / "key"), str(root / "models" / "missing"),
                   str(root / "models" / "escape"), str(root / "models" / "escape" / "key"),
                   "models/m", "../shared/models/m",
                   str(root / "models" / ".." / ".." / "private"), str(run_dir / "metrics.jsonl"), str(run_dir)]
        messages = set()
        for path in refused:
            for body, field in ((SFT | {"model": {"path": path}}, "body.model.path"),
                                (SFT | {"data": data | {"eval_path": path}}, "body.data.eval_path"),
                                (RL | {"mode": "rlhf", "reward": {"kind": "model", "model_path": path}},
                                 "body.reward.model_path")):
                r = bob.post("/v1/jobs", json=body)
                assert r.status_code == 422 and fields(r) == [field], (path, r.text)
                messages.add(r.json()["detail"][0]["msg"])
        assert len(messages) == 1 and "DRPT_READ_ROOTS" in messages.pop()  # missing, forbidden, symlinked: one answer
        sweep = bob.post("/v1/sweeps",
                         json={"base": SFT, "space": {"model.path": {"values": [str(root / "models" / "m"),
                                                                                "/etc", "/proc/1/root"]}}})
        assert (sweep.status_code == 422
                and fields(sweep) == ["body.space.model.path.values.1", "body.space.model.path.values.2"])
        assert bob.get("/v1/jobs").json()["total"] == 0


def test_without_read_roots_a_server_job_reads_no_host_path(server_factory, host):
    s = server_factory(DRPT_LAUNCHER="dry-run")
    with s.http() as c:
        r = c.post("/v1/jobs", json=SFT | {"model": {"path": str(host["root"] / "models" / "m")}})
        assert r.status_code == 422 and "none configured" in r.json()["detail"][0]["msg"]
        assert c.post("/v1/jobs", json=SFT).status_code == 201  # a model built in code reads nothing


ABSURD = [  # (body, the first field named, words of its message)
    (RL | {"rollout": {"num_workers": 4096}}, "body.resources",
     ["4098 CPUs", "rollout 4096 x 1", "allows 4", "DRPT_MAX_RUN_CPUS"]),
    (RL | {"rollout": {"num_workers": 2, "kv_cache_gib": 40}},
     "body.rollout.kv_cache_gib", ["2 rollout worker(s) x 40 GiB = 80 GiB", "64"]),
    (RL | {"resources": {"learner_num_cpus": 1e300}}, "body.resources", ["1e+300 CPUs", "DRPT_MAX_RUN_CPUS"]),
    (SFT | {"resources": {"learner_num_gpus": 8}}, "body.resources", ["8 GPUs", "allows 1", "DRPT_MAX_RUN_GPUS"]),
    (RL | {"rollout": {"kv_cache_gib": 10**6}}, "body.rollout.kv_cache_gib", ["1000000 GiB", "DRPT_MAX_KV_CACHE_GIB"]),
    (SFT | {"batch_size": 10**9}, "body.batch_size", ["1000000000", "4096", "DRPT_MAX_BATCH_SIZE"]),
    # the schema's bound
    (RL | {"rollout": {"num_workers": 10**6}}, "body.rollout.num_workers", ["less than or equal to 4096"]),
]


def test_absurd_resources_are_refused_at_submission_naming_demand_and_limit(server_factory):
    s = server_factory(DRPT_LAUNCHER="dry-run", DRPT_MAX_RUN_CPUS=4, DRPT_MAX_RUN_GPUS=1)
    with s.http() as c:
        for body, field, words in ABSURD:
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 422 and fields(r)[0] == field, r.text  # (4096 workers also exceed the KV cache)
            assert all(w in r.json()["detail"][0]["msg"] for w in words), r.json()["detail"][0]["msg"]
        assert c.get("/v1/jobs").json()["total"] == 0
        assert c.post("/v1/jobs", json=RL | {"rollout": {"num_workers": 2}}).status_code == 201  # 1 + 1 + 2 CPUs fit


def test_a_sweep_whose_largest_trial_cannot_fit_is_refused_not_left_to_time_out(server_factory):
    s = server_factory(DRPT_LAUNCHER="dry-run", DRPT_MAX_RUN_CPUS=3)
    with s.http() as c:
        r = c.post("/v1/sweeps", json={"base": RL, "space": {"rollout.num_workers": {"values": [1, 2]},
                                                             "optim.lr": {"values": [0.1, 0.2]}}})
        assert r.status_code == 422 and fields(r) == ["body.base.resources"], r.text
        assert "4 CPUs" in r.json()["detail"][0]["msg"]
        assert c.post("/v1/sweeps",
                      json={"base": RL, "space": {"rollout.num_workers": {"values": [1]}}}).status_code == 201
