"""The error contract: every refusal is an `ErrorResponse` (`{"message": ..., "detail": [...]}`),
and every route declares in /openapi.json the statuses it can send (`errors(...)`).

| status | when |
|---|---|
| 401 | no `Authorization: Bearer` header (and, on a stream, no `stream_token`) |
| 403 | a token that is not accepted for this route or run |
| 404 | no job or sweep with that id |
| 409 | cancelling a run that already ended |
| 413 | a body over DRPT_MAX_BODY_BYTES (security.BodyLimitMiddleware) |
| 422 | any bad input: a body that is not JSON (or not UTF-8), a bad field, query or header; `detail` names each by its path |

A body that cannot be parsed is a 422 like any other bad body, on every route: FastAPI answers a
non-UTF-8 body with a 400 of its own, which is turned into the 422 here (the API sends no other
400). A 500 is never meant to be sent: its body says only that the log has the details.
"""  # noqa: E501 (Markdown table rows cannot be wrapped)

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from services.control_plane import store
from drpt_ray.wire import ErrorResponse, FieldError

log = logging.getLogger("drpt.control_plane")

WHEN = {
    401: "No bearer token.",
    403: "The token is not accepted here.",
    404: "No run with this id.",
    409: "The run is not in a state that allows this.",
    413: "The body is over DRPT_MAX_BODY_BYTES.",
    422: "Bad input; `detail` names each bad field by its path.",
}


def errors(*codes: int) -> dict:
    """`responses=` for a route or router: the error statuses it sends, each with the one shape."""
    return {code: {"model": ErrorResponse, "description": WHEN[code]} for code in codes}


def error_response(status: int, message: str, detail: list[FieldError] = (),
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(message=message, detail=list(detail)).model_dump(mode="json", exclude_none=True),
                        status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Route every refusal through the one shape."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(store.NotFound, lambda r, e: error_response(404, str(e)))
    app.add_exception_handler(store.Conflict, lambda r, e: error_response(409, str(e)))
    app.add_exception_handler(Exception, _internal_error)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming every bad field by its path (`body.regularizer.feasible_set`), without tracebacks."""
    detail = [_field_error(e) for e in exc.errors()]
    message = "; ".join(f"{'.'.join(map(str, d.loc)) or '<root>'}: {d.msg}"
                        + (f" (got {d.input!r})" if d.input is not None else "")
                        for d in detail)
    return error_response(422, message, detail)


def _field_error(e: dict) -> FieldError:
    if e.get("type") == "json_invalid":  # FastAPI's loc is ("body", <character position>): no field of the body
        _, pos = e["loc"]
        return FieldError(loc=["body"], msg=f"the body is not valid JSON: {e['ctx']['error']} at character {pos}",
                          type="json_invalid")
    got = e.get("input")
    return FieldError(loc=list(e.get("loc", ())), msg=e.get("msg", ""),
                      type=e.get("type", ""), input=got if _echoable(got) else None)


def _echoable(value) -> bool:
    """Whether a bad input goes back in the 422 as it came: short scalars only, and no NaN or
    Infinity, which strict JSON (the response) cannot carry."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, (str, int, float, bool)) and len(str(value)) <= 200


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 400:  # FastAPI's "error parsing the body" (a body that is not UTF-8)
        bad = FieldError(loc=["body"], msg="the body is not valid JSON (UTF-8)", type="json_invalid")
        return error_response(422, f"body: {bad.msg}", [bad])
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error (details are in the control-plane log)")
