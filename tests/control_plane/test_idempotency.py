"""`Idempotency-Key` on POST /v1/jobs and /v1/sweeps (issue 13, item 6), on SQLite and Postgres:
a retry gets the first answer and creates nothing, another body under the same key is a 422, keys
belong to one API token, and after 24 h (an injected clock) a key is free again."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.exceptions import RequestValidationError

from services.control_plane import store
from services.control_plane.idempotency import TTL_S, IdempotencyKey, create_once
from services.control_plane.public import job_public
from tests.control_plane.conftest import TOKEN

TINY_SFT = {"mode": "sft", "steps": 20, "eval_every": 10, "progress": False}
SWEEP = {"space": {"regularizer.tau": {"values": [1.0, 2.0]}}, "base": TINY_SFT}


def named(c, kind: str, name: str) -> list[dict]:
    return [r for r in c.get(f"/v1/{kind}", params={"limit": 200}).json()["items"] if r["name"] == name]


@pytest.mark.parametrize("kind, body", [("jobs", TINY_SFT), ("sweeps", SWEEP)])
def test_a_retried_submission_creates_one_run_and_gets_the_first_answer(dry_server, kind, body):
    body = body | {"name": f"retried-{kind}"}
    with dry_server.http() as c:
        first = c.post(f"/v1/{kind}", json=body, headers={"Idempotency-Key": f"retry-{kind}"})
        assert first.status_code == 201 and "idempotent-replayed" not in first.headers
        # the same request again, its keys in another order and a default spelled out: the same body
        again = c.post(f"/v1/{kind}", json=dict(reversed(body.items())), headers={"Idempotency-Key": f"retry-{kind}"})
        assert again.status_code == 201 and again.json() == first.json()
        assert again.headers["location"] == first.headers["location"] == f"/v1/{kind}/{first.json()['id']}"
        assert again.headers["idempotent-replayed"] == "true"
        assert [r["id"] for r in named(c, kind, body["name"])] == [first.json()["id"]]
        # without a key every POST is a new run
        assert c.post(f"/v1/{kind}", json=body).json()["id"] != first.json()["id"]


def test_concurrent_retries_create_one_job(dry_server):
    body = TINY_SFT | {"name": "burst"}
    with dry_server.http() as c, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "burst"}),
                                range(16)))
        assert {r.status_code for r in answers} == {201}
        assert len({r.json()["id"] for r in answers}) == 1
        assert len(named(c, "jobs", "burst")) == 1


def test_the_same_key_with_another_body_is_a_422_naming_the_header(dry_server):
    with dry_server.http() as c:
        assert c.post("/v1/jobs", json=TINY_SFT | {"name": "first"},
                      headers={"Idempotency-Key": "reused"}).status_code == 201
        r = c.post("/v1/jobs", json=TINY_SFT | {"name": "second"}, headers={"Idempotency-Key": "reused"})
        assert r.status_code == 422, r.text
        assert (r.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
                and "different request" in r.json()["message"])
        assert named(c, "jobs", "second") == []
        # a sweep body under a job's key is another request too
        assert c.post("/v1/sweeps", json=SWEEP, headers={"Idempotency-Key": "reused"}).status_code == 422


@pytest.mark.parametrize("key", ["", "x" * 256, "naïve", "two words"])
def test_a_malformed_key_is_a_422(dry_server, key):
    with dry_server.http() as c:
        r = c.post("/v1/jobs", json=TINY_SFT, headers={"Idempotency-Key": key.encode()})
    assert r.status_code == 422 and "header.Idempotency-Key" in r.json()["message"], r.text


def test_the_header_is_in_the_openapi_contract(dry_server):
    with dry_server.http() as c:
        paths = c.get("/openapi.json").json()["paths"]
    for path in ("/v1/jobs", "/v1/jobs/with-working-dir", "/v1/sweeps"):
        (param,) = [p for p in paths[path]["post"]["parameters"] if p["name"] == "Idempotency-Key"]
        assert param["in"] == "header" and not param["required"] and "422" in param["description"]


def test_keys_belong_to_one_api_token(server_factory):
    other = "other-token-0123456789abcdef"
    s = server_factory("tokens", DRPT_LAUNCHER="dry-run", DRPT_API_TOKENS=f"{TOKEN},{other}")
    with s.http() as c:
        mine = c.post("/v1/jobs", json=TINY_SFT | {"name": "mine"}, headers={"Idempotency-Key": "k"})
        theirs = c.post("/v1/jobs", json=TINY_SFT | {"name": "theirs"},
                        headers={"Idempotency-Key": "k", "Authorization": f"Bearer {other}"})
        assert (mine.status_code, theirs.status_code) == (201, 201) and mine.json()["id"] != theirs.json()["id"]
        assert "idempotent-replayed" not in theirs.headers


def test_a_key_is_free_again_after_24_hours(db):
    key, t0 = IdempotencyKey.of(TOKEN, "daily"), 1_000_000.0

    def submit(name: str, at: float):
        def create(s):
            job = store.create(s, "job", TINY_SFT | {"name": name}, name, mode="sft")
            return job_public(job), f"/v1/jobs/{job.id}"

        return create_once(db, key, TINY_SFT | {"name": name}, create, clock=lambda: at)

    first = submit("day one", t0)
    assert submit("day one", t0 + TTL_S - 1).body == first.body  # still replayed a second before it expires
    with pytest.raises(RequestValidationError, match="different request"):  # the app answers it with a 422
        submit("day two", t0 + TTL_S - 1)
    later = submit("day two", t0 + TTL_S)  # expired: a new submission, even with another body
    assert later.status_code == 201 and later.body != first.body and "idempotent-replayed" not in later.headers
    with db.read() as s:
        assert sorted(j.name for j in store.list_runs(s, store.Job, None, 10, 0)[0]) == ["day one", "day two"]
