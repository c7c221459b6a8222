"""`drpt-ray` commands that talk to the control plane (`services/control_plane`).

    drpt-ray serve                    the control plane on 127.0.0.1:8000 (starts a local Ray with
                                      its dashboard when RAY_ADDRESS is empty)
    drpt-ray submit SPEC.yaml [-f]    submit a JobSpec; -f follows it
    drpt-ray status [ID]              list jobs and sweeps, or one of them
    drpt-ray logs [-f] ID             the driver log; -f follows the event stream with a progress bar
    drpt-ray cancel ID                cancel a job or sweep
    drpt-ray sweep SPEC.yaml [-f]     start a Ray Tune sweep (a SweepSpec)

Server and token: `--url` / `--token`, else env `DRPT_URL` / `DRPT_TOKEN`, else
http://127.0.0.1:8000 and the token `drpt-ray serve` saved in ~/.drpt/token. Problems a user can
cause (a bad spec, an unknown id, no server) end with a message and exit status 2 (`ClientError`
is a ValueError, which `drpt_ray.cli.main` reports).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import httpx

HOST, PORT = "127.0.0.1", 8000  # where the control plane listens unless told otherwise
DEFAULT_URL = f"http://{HOST}:{PORT}"
TOKEN_FILE = Path("~/.drpt/token").expanduser()


class ClientError(ValueError):
    """A request the control plane refused, or could not be sent."""


# ----------------------------------------------------------------------------------------------
# Server-Sent Events


@dataclass
class SSEEvent:
    id: str | None
    event: str
    data: str

    def json(self) -> dict:
        return json.loads(self.data) if self.data else {}


def iter_sse(lines: Iterable[str]) -> Iterator[SSEEvent]:
    """Parse SSE lines (without newlines) into events; comments (heartbeats) are skipped."""
    event, data, id_ = None, [], None
    for line in lines:
        if not line:
            if data or event:
                yield SSEEvent(id_, event or "message", "\n".join(data))
            event, data, id_ = None, [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
        elif field == "id":
            id_ = value


# ----------------------------------------------------------------------------------------------
# HTTP client


class Client:
    """Thin synchronous client of the `/v1` API."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = 30.0):
        self.url = (url or os.environ.get("DRPT_URL") or DEFAULT_URL).rstrip("/")
        self.token = token or os.environ.get("DRPT_TOKEN") or _saved_token()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ClientError(f"cannot reach the control plane at {self.url} ({type(e).__name__}); is `drpt-ray serve` running?") from None
        _raise_for(r)
        return r

    def submit_job(self, spec: dict) -> dict:
        return self.request("POST", "/v1/jobs", json=spec).json()

    def create_sweep(self, spec: dict) -> dict:
        return self.request("POST", "/v1/sweeps", json=spec).json()

    def get(self, run_id: str) -> dict:
        return self.request("GET", f"/v1/{_collection(run_id)}/{run_id}").json()

    def cancel(self, run_id: str) -> dict:
        return self.request("POST", f"/v1/{_collection(run_id)}/{run_id}/cancel").json()

    def list(self, collection: str = "jobs", state: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        params = {"limit": limit, "offset": offset} | ({"state": state} if state else {})
        return self.request("GET", f"/v1/{collection}", params=params).json()

    def metrics(self, job_id: str, limit: int = 10000, offset: int = 0) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}/metrics", params={"limit": limit, "offset": offset}).json()

    def logs(self, job_id: str) -> str:
        return self.request("GET", f"/v1/jobs/{job_id}/logs").text

    def follow(self, run_id: str, after: int = 0, reconnect_for_s: float = 120.0) -> Iterator[SSEEvent]:
        """The run's SSE stream to its `end` event, reconnecting with Last-Event-ID when the connection
        drops (a restarting control plane) for up to `reconnect_for_s` seconds of failed attempts."""
        last, path, down_since = after, f"/v1/{_collection(run_id)}/{run_id}/events", None
        while True:
            headers = {"Last-Event-ID": str(last)} if last else {}
            try:
                with self._http.stream("GET", path, headers=headers, timeout=httpx.Timeout(10.0, read=90.0)) as r:
                    if r.status_code >= 400:
                        r.read()
                        _raise_for(r)
                    down_since = None
                    for ev in iter_sse(r.iter_lines()):
                        if ev.id and ev.id.isdigit():
                            last = int(ev.id)
                        yield ev
                        if ev.event == "end":
                            return
            except httpx.TransportError as e:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > reconnect_for_s:
                    raise ClientError(f"lost the event stream of {run_id} at {self.url} ({type(e).__name__})") from None
                time.sleep(1.0)


def _collection(run_id: str) -> str:
    return "sweeps" if run_id.startswith("swp_") else "jobs"


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        body = r.json()
        msg = body.get("message") or body.get("detail")
    except ValueError:
        msg = r.text[:300]
    if r.status_code == 401:
        msg = f"{msg} (set --token or DRPT_TOKEN)"
    raise ClientError(f"{r.request.method} {r.request.url.path}: HTTP {r.status_code}: {msg}")


def _saved_token() -> str | None:
    return TOKEN_FILE.read_text().strip() if TOKEN_FILE.is_file() else None


# ----------------------------------------------------------------------------------------------
# live display


def watch(client: Client, run_id: str, out=None) -> str:
    """Follow a job or sweep until it ends, with a progress bar (jobs) or trial lines (sweeps).
    Returns the final state; the commands that follow a run exit 1 for any but SUCCEEDED (a
    DIVERGED job included)."""
    from tqdm.auto import tqdm

    from drpt_ray.metrics import HEADLINE

    out = out or sys.stdout
    run = client.get(run_id)
    sweep = run_id.startswith("swp_")
    bar = None if sweep else tqdm(total=run.get("steps") or None, desc=run_id, unit="step", file=out, dynamic_ncols=True)
    final = run["state"]
    write = (lambda s: bar.write(s, file=out)) if bar is not None else (lambda s: print(s, file=out, flush=True))
    try:
        for ev in client.follow(run_id):
            data = ev.json()
            if ev.event == "metrics" and bar is not None:
                m = data.get("metrics", {})
                bar.n = int(data.get("step", bar.n))
                bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in m.items() if k in HEADLINE and isinstance(v, (int, float))}, refresh=True)
            elif ev.event == "log":
                write(data.get("line", ""))
            elif ev.event == "state":
                write(f"[{data.get('state')}]" + (f" {data['message']}" if data.get("message") else ""))
            elif ev.event == "alert":
                write(f"[alert] step {data.get('step')}: {data.get('message')}")
            elif ev.event == "trial" and (data.get("state") != "RUNNING" or not data.get("metrics")):
                write(f"trial {data.get('trial_id')} {data.get('state')} {json.dumps(data.get('config'))}")
            elif ev.event == "sweep":
                write(f"best trial: {data.get('best_trial_id')} {data.get('metric')}={data.get('best_value')} {json.dumps(data.get('best_config'))}")
            elif ev.event == "end":
                final = data.get("state", final)
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
    c = _client(args)
    job = c.submit_job(spec.model_dump(mode="json", exclude_unset=True))
    print(job["id"])
    if args.follow:
        return 0 if watch(c, job["id"]) == "SUCCEEDED" else 1
    return 0


def _sweep(args) -> int:
    from drpt_ray.config import SweepSpec, load_spec

    spec = load_spec(args.spec, SweepSpec)
    c = _client(args)
    sweep = c.create_sweep(spec.model_dump(mode="json", exclude_unset=True))
    print(sweep["id"])
    if args.follow:
        state = watch(c, sweep["id"])
        print(format_sweep(c.get(sweep["id"])))
        return 0 if state == "SUCCEEDED" else 1
    return 0


def _status(args) -> int:
    c = _client(args)
    if args.id:
        run = c.get(args.id)
        print(format_sweep(run) if args.id.startswith("swp_") else format_job(run))
        return 0
    jobs, sweeps = c.list("jobs", args.state, args.limit), c.list("sweeps", args.state, args.limit)
    rows = [(j["id"], j.get("name") or "", j["mode"], j["state"], f"{j.get('step') or 0}/{j['steps']}", j["created_at"][:19]) for j in jobs["items"]]
    rows += [(w["id"], w.get("name") or "", "sweep", w["state"], f"{len(w['trials'])} trials", w["created_at"][:19]) for w in sweeps["items"]]
    print(_table(("id", "name", "kind", "state", "progress", "created (UTC)"), rows))
    print(f"{jobs['total']} job(s), {sweeps['total']} sweep(s)")
    return 0


def _logs(args) -> int:
    c = _client(args)
    if args.follow:
        return 0 if watch(c, args.id) == "SUCCEEDED" else 1
    sys.stdout.write(c.logs(args.id))
    return 0


def _cancel(args) -> int:
    run = _client(args).cancel(args.id)
    print(f"{run['id']} {run['state']}")
    return 0


def format_job(job: dict) -> str:
    lines = [f"{job['id']}  {job['state']}  mode={job['mode']}  step {job.get('step') or 0}/{job['steps']}"]
    if job.get("message"):
        lines.append(f"  message: {job['message']}")
    for key in ("output_dir", "model"):
        if job.get("artifacts", {}).get(key):
            lines.append(f"  {key}: {job['artifacts'][key]}")
    return "\n".join(lines)


def format_sweep(sweep: dict) -> str:
    paths = sorted({p for t in sweep["trials"] for p in t["config"]})
    rows = [(t["trial_id"], *[str(t["config"].get(p)) for p in paths], t["state"], str(t["steps"]),
             "-" if t["value"] is None else f"{t['value']:.4g}") for t in sweep["trials"]]
    text = [f"{sweep['id']}  {sweep['state']}  metric={sweep['metric']} ({sweep['mode']})",
            _table(("trial", *paths, "state", "steps", f"{sweep['metric']} (last)"), rows)]
    best = sweep.get("best")
    text.append(f"best: {best['trial_id']} {json.dumps(best['config'])} value={best['value']}" if best else "best: none yet")
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
        return os.environ["DRPT_API_TOKENS"].split(",")[0].strip()
    token = _saved_token()
    if not token:
        token = secrets.token_urlsafe(32)
        TOKEN_FILE.parent.mkdir(parents=True, exist_ok=True)
        TOKEN_FILE.write_text(token + "\n")
        TOKEN_FILE.chmod(0o600)
        print(f"drpt-ray serve: new API token saved to {TOKEN_FILE} (clients on this machine read it)")
    os.environ["DRPT_API_TOKENS"] = token
    return token


def dashboard_up(url: str) -> bool:
    """A Ray dashboard answers at `url` (401/403: up, with token auth)."""
    try:
        return httpx.get(f"{url}/api/version", timeout=2.0).status_code in (200, 401, 403)
    except httpx.HTTPError:
        return False


def start_local_ray(dashboard_port: int, num_cpus: int, timeout_s: float = 90.0) -> str:
    """Start a local Ray head with the dashboard (the Jobs API) unless one answers already; returns
    its URL. It outlives this process, so restarting the control plane does not stop running jobs."""
    url = f"http://127.0.0.1:{dashboard_port}"
    if dashboard_up(url):
        print(f"drpt-ray serve: using the local Ray dashboard at {url}")
        return url
    ray_bin = Path(sys.executable).with_name("ray")
    ray_cmd = str(ray_bin) if ray_bin.exists() else shutil.which("ray")
    if ray_cmd is None:
        raise ValueError("cannot find the `ray` command to start a local Ray; install ray[default] or set RAY_ADDRESS")
    # The agents' default ports (52365, ...) may be held by another Ray on this machine; a busy
    # agent port does not fail `ray start`, it silently disables the Jobs API. Take free ones.
    agent_ports = {flag: _free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "runtime-env-agent-port", "metrics-export-port")}
    cmd = [ray_cmd, "start", "--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", f"--num-cpus={num_cpus}", "--disable-usage-stats"]
    cmd += [f"--{flag}={port}" for flag, port in agent_ports.items()]
    print("drpt-ray serve: starting a local Ray:", " ".join(cmd[1:]))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise ValueError(f"`ray start` failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    deadline = time.monotonic() + timeout_s
    while not dashboard_up(url):
        if time.monotonic() > deadline:
            raise ValueError(f"the local Ray started but its dashboard did not answer at {url} within {timeout_s:.0f} s")
        time.sleep(0.5)
    print(f"drpt-ray serve: local Ray up, dashboard {url} (it keeps running after serve exits; `ray stop` ends it)")
    return url


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args) -> int:
    import uvicorn
    from pydantic import ValidationError

    from drpt_ray.config import format_validation_error
    from services.control_plane.app import create_app
    from services.control_plane.settings import Settings

    ensure_token()
    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = start_local_ray(args.ray_dashboard_port, args.num_cpus)
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
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
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
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=_serve)

    p = subparsers.add_parser("submit", help="submit a JobSpec to the control plane")
    p.add_argument("spec", help="YAML file with a JobSpec")
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
