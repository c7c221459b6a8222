"""`create_app(settings)`: the FastAPI control plane.

Record-then-execute: a request is answered from the database (a submit is a QUEUED row and an
id), the `Supervisor` thread started by the lifespan hook moves runs onto Ray, and job drivers
post their events back. The API process holds no training state, so it can restart at any time.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from services.control_plane import dashboard, errors
from services.control_plane.db import Database
from services.control_plane.deps import ApiAuth
from services.control_plane.launcher import Launcher, make_launcher
from services.control_plane.metrics import LatencyMiddleware, Metrics
from services.control_plane.notify import Hub
from services.control_plane.routes import events, jobs, sweeps
from services.control_plane.security import BodyLimitMiddleware, IngestKeys, StreamTokens
from services.control_plane.settings import Settings
from services.control_plane.supervisor import Supervisor

DESCRIPTION = """
Submit post-training jobs (the `JobSpec` of `drpt_ray.config`) and Ray Tune sweeps (`SweepSpec`),
follow their metrics live over Server-Sent Events, cancel them. Work runs on Ray through the Ray
Jobs API. Every route but `/healthz` needs `Authorization: Bearer <token>` (DRPT_API_TOKENS); a
browser's EventSource, which cannot send it, opens a stream with a `stream_token` minted by
`POST /v1/jobs/{id}/stream-token`. Every refusal is an `ErrorResponse`; any bad input, an
unparseable body included, is a 422 whose `detail` names each field by its path.
"""


def create_app(settings: Settings | None = None, launcher: Launcher | None = None) -> FastAPI:
    """Build the app; the database is opened here, the supervisor starts with the server."""
    settings = settings or Settings()
    db = Database(settings.database_url)
    keys = IngestKeys.load(db, settings.ingest_secret)
    launcher = launcher or make_launcher(settings)
    hub = Hub()
    supervisor = Supervisor(db, launcher, keys, settings.max_running_jobs, settings.poll_interval_s, hub.notify,
                            settings.max_running_per_tenant)
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

    app.state.stream_tokens = StreamTokens(keys, settings.stream_token_ttl_s)

    errors.install(app)
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        # Outermost, so that a 401 or 413 carries the CORS headers too (else a page cannot read why).
        # No credentials: the API reads bearer tokens and stream tokens, never cookies.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key"],
                           expose_headers=["Location"], max_age=600)

    # What every /v1 route can answer besides its own 404/409: a token problem, a body over the
    # limit (checked before routing, whatever the method) and bad input.
    for router in (jobs.router, sweeps.router, events.router):
        app.include_router(router, responses=errors.errors(401, 403, 413, 422))

    @app.get("/healthz", tags=["ops"], summary="Liveness (no auth)", responses=errors.errors(413))
    def healthz() -> dict:
        return {"status": "ok", "ray_reachable": supervisor.ray_reachable}

    @app.get("/metrics", tags=["ops"], dependencies=[ApiAuth], summary="Prometheus metrics",
             response_class=Response, responses={200: {"content": {"text/plain": {}}}} | errors.errors(401, 403, 413))
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    dashboard.mount(app)  # /ui: static pages that call the routes above with the user's token

    if not settings.public_docs:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[ApiAuth])
        def openapi() -> dict:
            return app.openapi()

    return app
