"""Prometheus `/metrics`: runs by state (read from the database at scrape time, so it is right
after a restart), events ingested by type, and request latency by route (time to the response
headers, so an SSE stream counts its set-up, not its lifetime)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from drpt_ray.reporting import STATES
from services.control_plane.db import Database, Job, Sweep

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _RunsByState:
    def __init__(self, db: Database):
        self.db = db

    def collect(self):
        for model, name in ((Job, "drpt_jobs"), (Sweep, "drpt_sweeps")):
            g = GaugeMetricFamily(name, f"{model.__tablename__} by state", labels=["state"])
            with self.db.read() as s:
                counts = dict(s.execute(select(model.state, func.count()).group_by(model.state)).all())
            for state in STATES:
                g.add_metric([state], counts.get(state, 0))
            yield g


class Metrics:
    """One registry per app (several apps in one process do not clash)."""

    def __init__(self, db: Database):
        self.registry = CollectorRegistry()
        self.events = Counter("drpt_events_ingested", "Driver events stored, by type", ["type"], registry=self.registry)
        self.latency = Histogram(
            "drpt_http_request_duration_seconds", "Time to response headers, by route",
            ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_RunsByState(db))

    def count_events(self, types: list[str]) -> None:
        for t in types:
            self.events.labels(t).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LatencyMiddleware:
    """Pure ASGI: observe (method, route template, status) -> seconds to the response start."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()

        async def timed_send(message):
            if message["type"] == "http.response.start":
                route = scope.get("route")
                path = getattr(route, "path", None) or "<unmatched>"
                self.metrics.latency.labels(scope["method"], path, str(message["status"])).observe(
                    time.perf_counter() - t0)
            await send(message)

        await self.app(scope, receive, timed_send)
