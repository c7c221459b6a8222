"""drpt-ray control plane: a FastAPI service that records jobs and sweeps, runs them on Ray through
the Ray Jobs API, and streams their events. Layout (FastAPI template style):

    app.py         create_app(settings): middleware, error handlers, routers, lifespan
    settings.py    environment (DRPT_API_TOKENS, DATABASE_URL, RAY_ADDRESS, ...)
    db.py          SQLAlchemy tables: jobs, sweeps, trials, events, meta
    store.py       run lifecycle (forward-only states) and idempotent event ingest
    supervisor.py  queue admission (DRPT_MAX_RUNNING_JOBS) and reconciliation with Ray
    launcher.py    Ray Jobs API (token auth handled) or a dry-run launcher
    security.py    bearer tokens, per-run ingest tokens, body limit
    notify.py      wakes SSE streams when a run's stream grows
    metrics.py     Prometheus /metrics
    public.py      database rows -> the response models of drpt_ray/wire.py (requests are JobSpec / SweepSpec)
    deps.py        typed dependencies
    routes/        jobs.py, sweeps.py, events.py (SSE + driver ingest)

Run it with `drpt-ray serve` or `python -m services.control_plane --host H --port P`.
"""
