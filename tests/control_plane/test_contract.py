"""The API's contract as /openapi.json states it (issue 13, item 6): each route declares every error
status it sends, every error body is one `ErrorResponse`, and a body that is not JSON is a 422 on
every route that takes one. test_fuzz.py checks the same contract with generated requests."""

from __future__ import annotations

import httpx
import pytest

from drpt_ray.wire import ErrorResponse
from tests.control_plane.conftest import H, ingest_headers

ERROR_REF = "#/components/schemas/ErrorResponse"
BODY_ROUTES = ["/v1/jobs", "/v1/jobs/with-working-dir", "/v1/sweeps", "/v1/ingest/job_0000000000000000"]


def test_every_route_declares_its_error_statuses_with_the_one_error_shape(dry_server):
    with dry_server.http() as c:
        schema = c.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # FastAPI's own 422 shape: replaced everywhere
    ops = {(method, path): op for path, item in schema["paths"].items() for method, op in item.items()}
    for (method, path), op in ops.items():
        declared = {int(code) for code in op["responses"] if not code.startswith("2")}
        expected = {413}  # the body limit is checked before routing, on every route
        if path.startswith("/v1/") or path == "/metrics":
            expected |= {401, 403}
        if path.startswith("/v1/"):
            expected |= {422}
        if "{" in path:
            expected |= {404}
        if path.endswith("/cancel"):
            expected |= {409}
        assert declared == expected, (method, path)
        for code in declared:
            assert op["responses"][str(code)]["content"]["application/json"]["schema"]["$ref"] == ERROR_REF, (
                method, path, code)


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize("body", [b"{bad", b"\xff\xfe", b"", b"[1]"],
                         ids=["not JSON", "not UTF-8", "empty", "not an object"])
def test_a_body_that_is_not_a_json_object_is_a_422_on_every_route(dry_server, path, body):
    # FastAPI's own answer to a non-UTF-8 body was a 400 while a JSON syntax error was a 422
    with httpx.Client(base_url=dry_server.url, timeout=30) as c:
        # the driver's token there
        auth = ingest_headers(path.rpartition("/")[2]) if path.startswith("/v1/ingest/") else H
        r = c.post(path, content=body, headers=auth | {"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    err = ErrorResponse.model_validate(r.json())
    assert [d.loc for d in err.detail] == [["body"]] and err.message.startswith("body: ")


@pytest.mark.parametrize("method,path,headers,status", [
    ("GET", "/v1/jobs", {}, 401),
    ("GET", "/v1/jobs", {"Authorization": "Bearer wrong-token-123456789"}, 403),
    ("GET", "/v1/jobs/job_0000000000000000", H, 404),
    ("GET", "/v1/nothing-here", H, 404),
    ("DELETE", "/v1/jobs", H, 405),
    ("GET", "/v1/jobs?limit=0", H, 422),
])
def test_every_refusal_has_the_one_error_shape(dry_server, method, path, headers, status):
    with httpx.Client(base_url=dry_server.url, timeout=30) as c:
        r = c.request(method, path, headers=headers)
    assert r.status_code == status
    err = ErrorResponse.model_validate(r.json())
    assert err.message and (err.detail != []) == (status == 422)


def test_a_cancelled_run_cancelled_again_is_a_409_in_the_one_shape(dry_server):
    with dry_server.http() as c:
        jid = c.post("/v1/jobs", json={"mode": "sft", "steps": 5, "progress": False}).json()["id"]
        assert c.post(f"/v1/jobs/{jid}/cancel").status_code == 200
        r = c.post(f"/v1/jobs/{jid}/cancel")
    assert r.status_code == 409 and "already CANCELLED" in ErrorResponse.model_validate(r.json()).message
