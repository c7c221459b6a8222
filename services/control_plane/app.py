"""`create_app(settings)`: the FastAPI control plane.

Record-then-execute: a request is answered from the database (a submit is a QUEUED row and an
id), the `Supervisor` thread started by the lifespan hook moves runs onto Ray, and job drivers
post their events back. The API process holds no training state, so it can restart at any time.
"""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from services.control_plane import store
from services.control_plane.db import Database
from services.control_plane.deps import ApiAuth
from services.control_plane.launcher import Launcher, make_launcher
from services.control_plane.metrics import LatencyMiddleware, Metrics
from services.control_plane.notify import Hub
from services.control_plane.routes import events, jobs, sweeps
from services.control_plane.security import BodyLimitMiddleware, IngestKeys
from services.control_plane.settings import Settings
from services.control_plane.supervisor import Supervisor

log = logging.getLogger("drpt.control_plane")

DESCRIPTION = """
Submit post-training jobs (the `JobSpec` of `drpt_ray.config`) and Ray Tune sweeps (`SweepSpec`),
follow their metrics live over Server-Sent Events, cancel them. Work runs on Ray through the Ray
Jobs API. Every route but `/healthz` needs `Authorization: Bearer <token>` (DRPT_API_TOKENS).
"""


def create_app(settings: Settings | None = None, launcher: Launcher | None = None) -> FastAPI:
    """Build the app; the database is opened here, the supervisor starts with the server."""
    settings = settings or Settings()
    db = Database(settings.database_url)
    keys = IngestKeys.load(db, settings.ingest_secret)
    launcher = launcher or make_launcher(settings)
    hub = Hub()
    supervisor = Supervisor(db, launcher, keys, settings.max_running_jobs, settings.poll_interval_s, hub.notify)
    metrics = Metrics(db)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        hub.bind(asyncio.get_running_loop())
        supervisor.start()  # its first tick reconciles the runs a previous process left active
        try:
            yield
        finally:
            supervisor.stop()
            db.dispose()

    docs = {} if settings.public_docs else {"openapi_url": None, "docs_url": None, "redoc_url": None}
    app = FastAPI(title="drpt-ray control plane", version="1", description=DESCRIPTION, lifespan=lifespan, **docs)
    app.state.settings, app.state.db, app.state.keys = settings, db, keys
    app.state.launcher, app.state.hub, app.state.supervisor, app.state.metrics = launcher, hub, supervisor, metrics

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(store.NotFound, lambda r, e: JSONResponse({"detail": str(e)}, status_code=404))
    app.add_exception_handler(store.Conflict, lambda r, e: JSONResponse({"detail": str(e)}, status_code=409))
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    app.include_router(jobs.router)
    app.include_router(sweeps.router)
    app.include_router(events.router)

    @app.get("/healthz", tags=["ops"], summary="Liveness (no auth)")
    def healthz() -> dict:
        return {"status": "ok", "ray_reachable": supervisor.ray_reachable}

    @app.get("/metrics", tags=["ops"], dependencies=[ApiAuth], summary="Prometheus metrics",
             response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    if not settings.public_docs:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[ApiAuth])
        def openapi() -> dict:
            return app.openapi()

    return app


def _location(loc) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming every bad field by its path (`body.regularizer.feasible_set`), without tracebacks."""
    detail, lines = [], []
    for e in exc.errors():
        item = {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        got = e.get("input")
        if _echoable(got):
            item["input"] = got
        detail.append(item)
        lines.append(f"{_location(item['loc'])}: {item['msg']}" + (f" (got {got!r})" if "input" in item else ""))
    return JSONResponse({"detail": detail, "message": "; ".join(lines)}, status_code=422)


def _echoable(value) -> bool:
    """Whether a bad input goes back in the 422 as it came: short scalars only, and no NaN or
    Infinity, which strict JSON (the response) cannot carry."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, (str, int, float, bool)) and len(str(value)) <= 200


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error (details are in the control-plane log)"}, status_code=500)
