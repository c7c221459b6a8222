"""`drpt-ray` commands for the control plane: the client commands, built on the SDK
(drpt_ray/client.py), and `serve`.

    drpt-ray serve                    the control plane on 127.0.0.1:8000 (starts a local Ray with
                                      its dashboard when RAY_ADDRESS is empty)
    drpt-ray submit SPEC.yaml [-f]    submit a JobSpec; -f follows it; --working-dir DIR ships DIR with it
    drpt-ray status [ID]              list jobs and sweeps, or one of them
    drpt-ray logs [-f] ID             the driver log; -f follows the event stream with a progress bar
    drpt-ray cancel ID                cancel a job or sweep
    drpt-ray sweep SPEC.yaml [-f]     start a Ray Tune sweep (a SweepSpec)

Server and token: `--url` / `--token`, else env `DRPT_URL` / `DRPT_TOKEN`, else
http://127.0.0.1:8000 and the token `drpt-ray serve` saved in ~/.drpt/token. Problems a user can
cause (a bad spec, an unknown id, no server) end with a message and exit status 2 (`ClientError`,
and `ApiError` with it, is a ValueError, which `drpt_ray.cli.main` reports).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys

from drpt_ray.client import (TOKEN_FILE, Alert, Client, End, Job, LogLine, MetricsReport,
                             StateChange, Sweep, SweepSummary, TrialReport, saved_token)
from drpt_ray.local_ray import start_local_ray
from drpt_ray.wire import DEFAULT_URL, HOST, PORT, JobPublic, RunPublic, SweepPublic


# ----------------------------------------------------------------------------------------------
# live display


def watch(run: Job | Sweep, out=None) -> str:
    """Follow a job or sweep until it ends, with a progress bar (jobs) or trial lines (sweeps).
    Returns the final state; the commands that follow a run exit 1 for any but SUCCEEDED (a
    DIVERGED job included)."""
    from tqdm.auto import tqdm

    from drpt_ray.metrics import progress_postfix

    out = out or sys.stdout
    bar = (tqdm(total=run.info.steps or None, desc=run.id, unit="step", file=out, dynamic_ncols=True)
           if isinstance(run, Job) else None)
    final = run.info.state
    write = (lambda s: bar.write(s, file=out)) if bar is not None else (lambda s: print(s, file=out, flush=True))
    try:
        for ev in run.events():
            match ev:
                case MetricsReport() if bar is not None:
                    bar.n = ev.step
                    bar.set_postfix(progress_postfix(ev.metrics), refresh=True)
                case LogLine():
                    write(ev.line)
                case StateChange():
                    write(f"[{ev.state}]" + (f" {ev.message}" if ev.message else ""))
                case Alert():
                    write(f"[alert] step {ev.step}: {ev.message}")
                case TrialReport() if ev.state != "RUNNING" or not ev.metrics:
                    write(f"trial {ev.trial_id} {ev.state} {json.dumps(ev.config)}")
                case SweepSummary():
                    write(f"best trial: {ev.best_trial_id} {ev.metric}={ev.best_value} {json.dumps(ev.best_config)}")
                case End():
                    final = ev.state
    finally:
        if bar is not None:
            bar.close()
    return final


# ----------------------------------------------------------------------------------------------
# commands


def _client(args) -> Client:
    return Client(args.url, args.token)


def _submit(args) -> int:
    from drpt_ray.config import JobSpec, load_spec

    spec = load_spec(args.spec, JobSpec)  # local check first: errors name the YAML's fields
    job = _client(args).submit(spec, working_dir=args.working_dir)
    print(job.id)
    if args.follow:
        return 0 if watch(job) == "SUCCEEDED" else 1
    return 0


def _sweep(args) -> int:
    from drpt_ray.config import SweepSpec, load_spec

    spec = load_spec(args.spec, SweepSpec)
    sweep = _client(args).submit_sweep(spec)
    print(sweep.id)
    if args.follow:
        state = watch(sweep)
        print(format_sweep(sweep.refresh()))
        return 0 if state == "SUCCEEDED" else 1
    return 0


def _status(args) -> int:
    c = _client(args)
    if args.id:
        run = c.run(args.id)
        print(format_sweep(run.info) if isinstance(run, Sweep) else format_job(run.info))
        return 0
    jobs, sweeps = c.jobs(args.state, args.limit), c.sweeps(args.state, args.limit)
    rows = [(j.id, j.name or "", j.mode, j.state, f"{j.step or 0}/{j.steps}", _utc(j)) for j in jobs.items]
    rows += [(w.id, w.name or "", "sweep", w.state, f"{len(w.trials)} trials", _utc(w)) for w in sweeps.items]
    print(_table(("id", "name", "kind", "state", "progress", "created (UTC)"), rows))
    print(f"{jobs.total} job(s), {sweeps.total} sweep(s)")
    return 0


def _utc(run: RunPublic) -> str:
    return run.created_at.isoformat()[:19]


def _logs(args) -> int:
    c = _client(args)
    if args.follow:
        return 0 if watch(c.run(args.id)) == "SUCCEEDED" else 1
    sys.stdout.write(c.run(args.id).logs())
    return 0


def _cancel(args) -> int:
    info = _client(args).run(args.id).cancel()
    print(f"{info.id} {info.state}")
    return 0


def format_job(job: JobPublic) -> str:
    lines = [f"{job.id}  {job.state}  mode={job.mode}  step {job.step or 0}/{job.steps}"]
    if job.message:
        lines.append(f"  message: {job.message}")
    for key in ("output_dir", "model"):
        if job.artifacts.get(key):
            lines.append(f"  {key}: {job.artifacts[key]}")
    return "\n".join(lines)


def format_sweep(sweep: SweepPublic) -> str:
    paths = sorted({p for t in sweep.trials for p in t.config})
    rows = [(t.trial_id, *[str(t.config.get(p)) for p in paths], t.state, str(t.steps),
             "-" if t.value is None else f"{t.value:.4g}") for t in sweep.trials]
    text = [f"{sweep.id}  {sweep.state}  metric={sweep.metric} ({sweep.mode})",
            _table(("trial", *paths, "state", "steps", f"{sweep.metric} (last)"), rows)]
    best = sweep.best
    text.append(f"best: {best.trial_id} {json.dumps(best.config)} value={best.value}" if best else "best: none yet")
    return "\n".join(text)


def _table(head: tuple, rows: list[tuple]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*map(str, r)) for r in (head, *rows))


# ----------------------------------------------------------------------------------------------
# serve


def ensure_token() -> str:
    """DRPT_API_TOKENS if set, else the saved token, else a new one saved to ~/.drpt/token (0600)."""
    if os.environ.get("DRPT_API_TOKENS"):
        return os.environ["DRPT_API_TOKENS"].split(",")[0].strip().rpartition(":")[2]  # `tenant:token` or `token`
    token = saved_token()
    if not token:
        token = secrets.token_urlsafe(32)
        TOKEN_FILE.parent.mkdir(parents=True, exist_ok=True)
        TOKEN_FILE.write_text(token + "\n")
        TOKEN_FILE.chmod(0o600)
        print(f"drpt-ray serve: new API token saved to {TOKEN_FILE} (clients on this machine read it)")
    os.environ["DRPT_API_TOKENS"] = token
    return token


def _serve(args) -> int:
    ensure_token()
    own_ray = None
    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"], own_ray = start_local_ray(args.ray_dashboard_port, args.num_cpus,
                                                             TOKEN_FILE.parent / "serve-ray.log")
    # uvicorn shuts down on SIGINT/SIGTERM, then re-raises the signal to the handler it found: a
    # no-op one here, so the process lives on to stop its Ray below instead of dying at once.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        return _serve_api(args)
    finally:
        if own_ray is not None and args.keep_ray:
            print(f"drpt-ray serve: the local Ray it started keeps running ({own_ray.url}); the next serve uses it")
        elif own_ray is not None:
            # Its running jobs end with it; --keep-ray leaves them running for the next serve to follow.
            print("drpt-ray serve: stopping the local Ray it started", flush=True)
            own_ray.stop()


def _serve_api(args) -> int:
    """The control plane in uvicorn until SIGINT/SIGTERM."""
    import uvicorn
    from pydantic import ValidationError

    from drpt_ray.config import format_validation_error
    from services.control_plane.app import create_app
    from services.control_plane.settings import Settings

    if not os.environ.get("DRPT_PUBLIC_URL"):
        host = HOST if args.host in ("0.0.0.0", "::", "") else args.host
        os.environ["DRPT_PUBLIC_URL"] = f"http://{host}:{args.port}"
    try:
        settings = Settings()
    except ValidationError as e:
        raise ValueError(format_validation_error(e, "control-plane settings")) from None
    docs = "docs at /docs" if settings.public_docs else "schema at /openapi.json"
    print(f"drpt-ray serve: API on http://{args.host}:{args.port} ({docs}), Ray Jobs API at {settings.dashboard_url}, "
          f"database {settings.database_url}", flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0


# ----------------------------------------------------------------------------------------------
# argparse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"control-plane URL (env DRPT_URL; default {DEFAULT_URL})")
    p.add_argument("--token", help="API token (env DRPT_TOKEN; default: the token `drpt-ray serve` saved)")


def register(subparsers) -> None:
    """Add serve, submit, status, logs, cancel and sweep to `drpt-ray`'s subcommands."""
    s = subparsers.add_parser("serve", help="run the control plane (and a local Ray when RAY_ADDRESS is empty)")
    s.add_argument("--host", default=HOST)
    s.add_argument("--port", type=int, default=PORT)
    s.add_argument("--num-cpus", type=int, default=max(4, os.cpu_count() or 1), help="CPUs of the local Ray it starts")
    s.add_argument("--ray-dashboard-port", type=int, default=8265, help="dashboard port of the local Ray")
    s.add_argument("--keep-ray", action="store_true",
                   help="leave the local Ray this serve starts (and its running jobs) up when serve exits")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=_serve)

    p = subparsers.add_parser(
        "submit", help="submit a JobSpec to the control plane",
        description="Submit a JobSpec to the control plane. With --working-dir DIR the job runs in a copy of DIR "
        "on the cluster: its modules are importable (a reward.function 'module:function' still needs the "
        "server's DRPT_USER_CODE_MODULES) and the spec's relative model/data paths are read from it, checked at "
        "submission. The server must allow it (DRPT_WORKING_DIR_MAX_BYTES).")
    p.add_argument("spec", help="YAML file with a JobSpec")
    p.add_argument("--working-dir", metavar="DIR",
                   help="ship DIR with the job (a zip of its files, without __pycache__ and .git; symlinks out of "
                   "DIR are refused): the job runs in it and its relative paths resolve in it")
    p.add_argument("-f", "--follow", action="store_true", help="follow the job to its end")
    _common(p)
    p.set_defaults(func=_submit)

    p = subparsers.add_parser("status", help="list jobs and sweeps, or show one")
    p.add_argument("id", nargs="?", help="job or sweep id")
    p.add_argument("--state", help="only runs in this state")
    p.add_argument("--limit", type=int, default=20)
    _common(p)
    p.set_defaults(func=_status)

    p = subparsers.add_parser("logs", help="a job's log; -f follows its events with a progress bar")
    p.add_argument("id", help="job or sweep id")
    p.add_argument("-f", "--follow", action="store_true")
    _common(p)
    p.set_defaults(func=_logs)

    p = subparsers.add_parser("cancel", help="cancel a job or sweep")
    p.add_argument("id")
    _common(p)
    p.set_defaults(func=_cancel)

    p = subparsers.add_parser("sweep", help="start a Ray Tune sweep (a SweepSpec)")
    p.add_argument("spec", help="YAML file with a SweepSpec")
    p.add_argument("-f", "--follow", action="store_true", help="follow the sweep and print its trial table")
    _common(p)
    p.set_defaults(func=_sweep)
