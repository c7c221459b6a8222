"""Control-plane benchmark: event ingest throughput, SSE fan-out, submit latency.

    .venv/bin/python bench/control_plane.py            # 20k ingest events, 50 SSE clients x 5k events, 300 submits
    .venv/bin/python bench/control_plane.py --quick    # 5k, 50 x 1k, 100

A real server: `python -m services.control_plane` (uvicorn, one worker) in a subprocess on
127.0.0.1 with a fresh SQLite file (or `--database-url`) and the **dry-run launcher**
(`DRPT_LAUNCHER=dry-run`): submissions are recorded, queued and "admitted" as usual, but nothing is
sent to Ray, so the figures are the control plane's own cost, not training's.

1. ingest: one `drpt_ray.reporting.EventReporter` (what a job driver uses: batches of <= 500,
   one request in flight) emits N metrics events for one job as fast as it can; throughput =
   N / (first emit -> close() returned, i.e. every event acknowledged and committed).
2. fan-out: 50 SSE clients (asyncio + httpx, one process) follow one job; a reporter emits M
   events then SUCCEEDED. Burst: all M at once; reported: time until every client has its `end`
   event and events delivered per second summed over clients. Paced: `--rate` events/s (a fast
   training job is ~10 steps/s); reported: delivery latency (receive time - the event's `ts`, set
   at emit) p50/p99 over all clients' events, which includes the reporter's 0.1 s batching linger.
   The reporter and the clients share this process (and its GIL); the server is a separate one.
3. submit: `POST /v1/jobs` with a tiny SFT JobSpec, one at a time and 16 at a time; latency p50/p99
   from the client's side (request sent -> 201 received).
Goal (issue 4): ingest >= 1,000 events/s. Results are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drpt_ray.client import iter_sse  # noqa: E402
from drpt_ray.machine import machine_summary  # noqa: E402
from drpt_ray.local_ray import free_port  # noqa: E402
from drpt_ray.reporting import EventReporter  # noqa: E402
from services.control_plane.security import IngestKeys  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
H = {"Authorization": f"Bearer {TOKEN}"}
INGEST_SECRET = "bench-ingest-secret-0123456789abcdef"


def driver_token(jid: str) -> str:
    """The job's ingest token, as the launcher gives it to the job's driver (ingest takes no other)."""
    return IngestKeys(INGEST_SECRET).token(jid)
SPEC = {"mode": "sft", "steps": 20, "eval_every": 10, "progress": False}
METRICS = {"loss": 1.2345, "lr": 0.001, "reg/kept_frac_mean": 0.5, "reg/cos": 0.12, "time/step": 0.2, "grad_norm": 0.9}


def start_server(workdir: Path, database_url: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, DRPT_API_TOKENS=TOKEN, DRPT_INGEST_SECRET=INGEST_SECRET,
               DRPT_LAUNCHER="dry-run", DRPT_MAX_RUNNING_JOBS="1",
               DATABASE_URL=database_url or f"sqlite:///{workdir / 'bench.sqlite'}",
               DRPT_RUNS_DIR=str(workdir / "runs"),
               DRPT_PUBLIC_URL=f"http://127.0.0.1:{port}", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "services.control_plane",
                             "--port", str(port), "--log-level", "error"],
                            cwd=ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("control plane did not start within 60 s")


def new_job(url: str) -> str:
    return httpx.post(f"{url}/v1/jobs", json=SPEC, headers=H, timeout=30).json()["id"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# ----------------------------------------------------------------------------------------------


def bench_ingest(url: str, n: int) -> dict:
    jid = new_job(url)
    rep = EventReporter(url, jid, driver_token(jid))
    t0 = time.perf_counter()
    for i in range(n):
        rep.on_metrics({"step": i, **METRICS})
    ok = rep.close(timeout=600)
    dt = time.perf_counter() - t0
    last = httpx.get(f"{url}/v1/ingest/{jid}", headers={"Authorization": f"Bearer {driver_token(jid)}"},
                     timeout=30).json()["last_seq"]
    assert ok and last == n, (ok, last, n)
    return {"events": n, "seconds": dt, "events_per_s": n / dt}


async def _follow(client: httpx.AsyncClient, url: str, jid: str, lat: list[float]) -> int:
    got = 0
    async with client.stream("GET", f"{url}/v1/jobs/{jid}/events", headers=H, timeout=httpx.Timeout(30, read=300)) as r:
        assert r.status_code == 200
        lines = []
        async for line in r.aiter_lines():
            lines.append(line)
            if line:
                continue
            for ev in iter_sse(lines):
                if ev.event == "end":
                    return got
                data = json.loads(ev.data)
                if ev.event == "metrics" and data.get("ts"):
                    lat.append(time.time() - data["ts"])
                got += 1
            lines = []
    return got


async def _fanout(url: str, clients: int, m: int, rate: float | None) -> dict:
    jid = new_job(url)
    lat: list[float] = []
    limits = httpx.Limits(max_connections=clients + 5)
    async with httpx.AsyncClient(limits=limits) as client:
        tasks = [asyncio.create_task(_follow(client, url, jid, lat)) for _ in range(clients)]
        await asyncio.sleep(1.0)  # let every stream attach (they first replay the few stored events)
        rep = EventReporter(url, jid, driver_token(jid))
        t0 = time.perf_counter()

        def produce():
            for i in range(m):
                if rate:
                    time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
                rep.on_metrics({"step": i, **METRICS})
            rep.state("SUCCEEDED")
            return rep.close(timeout=600)

        ok = await asyncio.to_thread(produce)
        counts = await asyncio.wait_for(asyncio.gather(*tasks), timeout=600)
        dt = time.perf_counter() - t0
    assert ok
    assert min(counts) >= m + 1, counts
    return {"clients": clients, "events": m, "seconds": dt, "delivered_per_s": sum(counts) / dt,
            "lat_p50_ms": 1000 * pct(lat, 0.5), "lat_p99_ms": 1000 * pct(lat, 0.99)}


def bench_fanout(url: str, clients: int, m: int, rate: float | None = None) -> dict:
    return asyncio.run(_fanout(url, clients, m, rate))


def bench_submit(url: str, n: int, concurrency: int) -> dict:
    with httpx.Client(base_url=url, headers=H, timeout=30, limits=httpx.Limits(max_connections=concurrency + 2)) as c:
        def one(i: int) -> float:
            t = time.perf_counter()
            r = c.post("/v1/jobs", json=SPEC | {"name": f"b{i}"})
            assert r.status_code == 201, r.text
            return time.perf_counter() - t

        t0 = time.perf_counter()
        if concurrency == 1:
            lat = [one(i) for i in range(n)]
        else:
            with ThreadPoolExecutor(concurrency) as pool:
                lat = list(pool.map(one, range(n)))
        dt = time.perf_counter() - t0
    return {"n": n, "concurrency": concurrency,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * pct(lat, 0.99),
            "per_s": n / dt}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--database-url", help="default: a fresh SQLite file")
    p.add_argument("--rate", type=float, default=100.0, help="events/s of the paced fan-out run")
    a = p.parse_args()
    print(f"machine: {machine_summary()}", flush=True)
    n_ingest, n_fan, n_submit = (5000, 1000, 100) if a.quick else (20000, 5000, 300)
    n_paced = int(a.rate * (5 if a.quick else 15))
    with tempfile.TemporaryDirectory(prefix="cpbench") as tmp:
        proc, url = start_server(Path(tmp), a.database_url)
        try:
            ingest = bench_ingest(url, n_ingest)
            fan = bench_fanout(url, a.clients, n_fan)
            paced = bench_fanout(url, a.clients, n_paced, rate=a.rate)
            seq = bench_submit(url, n_submit, 1)
            par = bench_submit(url, n_submit, 16)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    db = "SQLite (WAL)" if not a.database_url else a.database_url.split(":")[0]
    print(f"\ncontrol plane: uvicorn 1 worker, {db}, dry-run launcher, {os.cpu_count()} CPU(s)\n")
    print("| measurement | result |\n|---|---|")
    print(f"| ingest, 1 reporter, {ingest['events']} metrics events | **{ingest['events_per_s']:,.0f} events/s** "
          f"({ingest['seconds']:.1f} s, goal >= 1,000) |")
    print(f"| SSE fan-out, {fan['clients']} clients, burst of {fan['events']} events | all delivered in "
          f"{fan['seconds']:.1f} s: {fan['delivered_per_s']:,.0f} events/s delivered in total |")
    print(f"| SSE fan-out, {paced['clients']} clients, {a.rate:.0f} events/s for {paced['events'] / a.rate:.0f} s | "
          f"emit -> received latency p50 {paced['lat_p50_ms']:.0f} ms, p99 {paced['lat_p99_ms']:.0f} ms |")
    for r in (seq, par):
        print(f"| submit `POST /v1/jobs`, {r['n']} at concurrency {r['concurrency']} | p50 {r['p50_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms ({r['per_s']:.0f} submits/s) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
