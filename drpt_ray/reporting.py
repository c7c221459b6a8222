"""Driver -> control plane event reporting: batched, retried, idempotent by sequence number.

A job driver (`python -m drpt_ray.run --job-id ID --report-url URL`) or a sweep driver
(`python -m drpt_ray.tune --sweep-id ID --report-url URL`) creates one `EventReporter` and hands it
events; a background thread posts them in batches, so training never waits on the network.

Wire format (the contract between drivers and `services/control_plane`)
-----------------------------------------------------------------------
`URL` is the control plane's base URL (`DRPT_PUBLIC_URL`, e.g. `http://10.0.0.5:8000`); every
request carries `Authorization: Bearer <token>`, the run's ingest token (env `DRPT_INGEST_TOKEN`).

* `GET  {URL}/v1/ingest/{run_id}` -> `{"last_seq": N}`: the highest sequence number the control
  plane has stored for the run (0 for none). A reporter asks once at start and numbers its events
  N+1, N+2, ..., so a restarted driver (a resumed job) continues the sequence.
* `POST {URL}/v1/ingest/{run_id}` with `{"events": [EVENT, ...]}` -> `{"stored": k, "last_seq": N}`.
  Storing is idempotent by `(run_id, seq)`: a batch re-sent after a lost response is not
  duplicated. Events are sent in `seq` order, one batch in flight at a time.

An EVENT is a flat JSON object: `seq` (int, from 1, no gaps), `ts` (unix seconds, float),
`type`, and the fields of its type:

| type      | fields                                                                                   |
|-----------|------------------------------------------------------------------------------------------|
| `state`   | `state`: one of DRIVER_STATES (RUNNING, or a terminal SUCCEEDED, FAILED, CANCELLED or     |
|           | DIVERGED: the divergence guard stopped the job); `message` (str or null); `artifacts`     |
|           | (optional dict: `output_dir`, `model`, `metrics`, `curves`, `checkpoints` list)           |
| `metrics` | `step` (int) and `metrics` (the dict `run_job` reported for that step, `step` included)  |
| `log`     | `line`: one line of the driver's stdout/stderr, without the newline                      |
| `alert`   | `step` (int >= 0) and `message` (non-empty str): the divergence guard tripped at `step`   |
| `samples` | `step` and `rows`: a samples table (`JobSpec.samples`), each row `split` (general, target, |
|           | eval), `group`, `prompt`, `response`, `reward`, `advantage` (null for eval rows), `parts`|
|           | (each reward function's score by name; {} for a single built-in reward)                  |
| `trial`   | sweeps: `trial_id`, `config` (searched path -> value), `state` (PENDING, RUNNING,        |
|           | TERMINATED, STOPPED, ERROR), `metrics` (that report's metrics, {} on start), optional     |
|           | `error`                                                                                  |
| `sweep`   | sweeps, last event: `state` (TERMINATED), `metric`, `mode`, `best_trial_id`,              |
|           | `best_value`, `best_config`                                                              |

Numbers are finite: `on_metrics` sends a NaN or infinite metric as null. The control plane
validates every event against this table (drpt_ray/wire.py: extra fields, a
text `step`, a `seq` past 2**31 - 1, NaN or Infinity are refused with a 422 naming the field).

The control plane re-serves the stored events on its SSE streams (`GET /v1/jobs/{id}/events`,
`GET /v1/sweeps/{id}/events`) with `event:` = type, `data:` = the event JSON, and `id:` = the
event's position in the run's stream (its own state changes, QUEUED for one, have no `seq`).

Delivery: the sender retries with exponential backoff (0.2 s doubling to 3 s) while the control
plane is unreachable or answers 5xx/429/408; other 4xx answers (bad token, unknown run) drop that
batch with one warning on stderr, since re-sending cannot fix them. `close(timeout)` flushes with a
bounded wait; an `atexit` hook closes reporters a driver forgot to close.
"""

from __future__ import annotations

import atexit
import json
import math
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any

import httpx

BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 3.0
MAX_BATCH_EVENTS = 500
MAX_BATCH_BYTES = 256 * 1024  # stays well under the control plane's default 1 MiB body limit
MAX_BUFFERED = 200_000  # events kept while the control plane is down; older ones are dropped
LINGER_S = 0.1  # wait this long for more events before posting a small batch
RETRYABLE = {408, 425, 429}
# A run's states, in the only order they move (forward): QUEUED and PENDING (submitted to Ray)
# are the control plane's own, the rest a driver reports; the TERMINAL ones are final.
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "DIVERGED")
DRIVER_STATES = ("RUNNING", *TERMINAL)  # what a driver's `state` event may carry
STATES = ("QUEUED", "PENDING", *DRIVER_STATES)
TRIAL_STATES = ("PENDING", "RUNNING", "TERMINATED", "STOPPED", "ERROR")  # a sweep's `trial` events

_live: "weakref.WeakSet[EventReporter]" = weakref.WeakSet()


class EventReporter:
    """Posts a run's events to the control plane from a background thread.

    Args:
        url: control-plane base URL (`http://host:port`).
        run_id: the job or sweep id the control plane gave the run.
        token: the run's ingest token (None sends no Authorization header).
        timeout_s: per-request HTTP timeout.

    `emit(event)` (and the helpers `on_metrics`, `state`, `log`, `alert`) only append to an in-memory
    queue; sequence numbers are assigned by the sender thread, after it has learnt the last
    acknowledged one from the control plane.
    """

    def __init__(self, url: str, run_id: str, token: str | None, timeout_s: float = 10.0):
        self.endpoint = f"{url.rstrip('/')}/v1/ingest/{run_id}"
        self.run_id = run_id
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(headers=headers, timeout=timeout_s)
        self._queue: deque[dict] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._abandon_at: float | None = None  # close(): give up retrying after this time
        self._next_seq: int | None = None  # known once the control plane answered
        self.acked_seq = 0
        self.dropped = 0
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._run, name=f"drpt-reporter-{run_id}", daemon=True)
        self._thread.start()
        _live.add(self)

    # ------------------------------------------------------------------ producer side (any thread)

    def emit(self, event: dict[str, Any]) -> None:
        """Queue one event (`{"type": ..., **fields}`); never blocks on the network."""
        item = dict(event)
        item.setdefault("ts", time.time())
        with self._cond:
            if self._closing:
                return
            if len(self._queue) >= MAX_BUFFERED:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(item)
            self._cond.notify()

    def on_metrics(self, metrics: dict) -> None:
        """The `run_job(on_metrics=...)` callback: one `metrics` event per step."""
        self.emit({"type": "metrics", "step": int(metrics.get("step", 0)), "metrics": _jsonable(metrics)})

    def state(self, state: str, message: str | None = None, artifacts: dict | None = None) -> None:
        event = {"type": "state", "state": state, "message": message}
        if artifacts is not None:
            event["artifacts"] = artifacts
        self.emit(event)

    def log(self, line: str) -> None:
        self.emit({"type": "log", "line": line})

    def samples(self, step: int, rows: list[dict]) -> None:
        """The `run_job(on_samples=...)` callback: one `samples` event per table (a non-finite number as null)."""
        clean = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
        self.emit({"type": "samples", "step": int(step), "rows": clean})

    def alert(self, step: int, message: str) -> None:
        """The `run_job(on_alert=...)` callback: the divergence guard tripped at `step`."""
        self.emit({"type": "alert", "step": int(step), "message": message})

    def close(self, timeout: float = 30.0) -> bool:
        """Flush queued events, waiting at most `timeout` seconds; True if everything was acknowledged."""
        with self._cond:
            self._closing = True
            self._abandon_at = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout + 1.0)
        self._http.close()
        _live.discard(self)
        with self._cond:
            return not self._queue

    # ------------------------------------------------------------------ sender thread

    def _run(self) -> None:
        backoff = BACKOFF_START_S
        batch: list[dict] = []
        while True:
            with self._cond:
                if not batch:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if not self._queue and self._closing:
                        return
                    if not self._closing and len(self._queue) < MAX_BATCH_EVENTS:
                        self._cond.wait(LINGER_S)  # let a burst of events share one request
                if self._abandon_at is not None and time.monotonic() > self._abandon_at:
                    self._warn("abandon", f"gave up with {len(self._queue)} event(s) unsent")
                    return
            try:
                if self._next_seq is None:
                    self._next_seq = self._fetch_last_seq() + 1
                if not batch:
                    batch = self._take_batch()
                if batch:
                    self._post(batch)
                    batch = []
                backoff = BACKOFF_START_S
            except _Dropped:
                batch = []
            except (httpx.HTTPError, _Retry) as e:
                self._warn("retry", f"control plane unreachable ({type(e).__name__}: {e}); retrying with backoff")
                self._sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _take_batch(self) -> list[dict]:
        """Pop up to MAX_BATCH_EVENTS / MAX_BATCH_BYTES events and number them."""
        out, size = [], 0
        with self._cond:
            while self._queue and len(out) < MAX_BATCH_EVENTS:
                n = len(json.dumps(self._queue[0]))
                if out and size + n > MAX_BATCH_BYTES:
                    break
                item = self._queue.popleft()
                item["seq"] = self._next_seq
                self._next_seq += 1
                out.append(item)
                size += n
        return out

    def _fetch_last_seq(self) -> int:
        r = self._http.get(self.endpoint)
        self._check(r)
        return int(r.json()["last_seq"])

    def _post(self, batch: list[dict]) -> None:
        r = self._http.post(self.endpoint, json={"events": batch})
        self._check(r)
        self.acked_seq = max(self.acked_seq, batch[-1]["seq"])

    def _check(self, r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        if r.status_code >= 500 or r.status_code in RETRYABLE:
            raise _Retry(f"HTTP {r.status_code}")
        self._warn(f"http{r.status_code}",
                   f"control plane refused events (HTTP {r.status_code}: {r.text[:200]}); dropping them")
        if self._next_seq is None:  # cannot even learn the sequence: nothing will ever be accepted
            with self._cond:
                self.dropped += len(self._queue)
                self._queue.clear()
                self._closing = True
            self._next_seq = 1
        raise _Dropped

    def _sleep(self, seconds: float) -> None:
        """Back off; new events do not cut this short, a close() deadline does."""
        deadline = self._abandon_at
        if deadline is not None:
            seconds = max(0.0, min(seconds, deadline - time.monotonic()))
        time.sleep(seconds)

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            print(f"drpt_ray.reporting[{self.run_id}]: {msg}", file=sys.__stderr__, flush=True)


class _Retry(Exception):
    pass


class _Dropped(Exception):
    pass


def _jsonable(metrics: dict) -> dict:
    """Metrics as strict JSON: numbers as int/float (non-finite -> null, JSON has no NaN), the rest str()."""
    out = {}
    for k, v in metrics.items():
        if v is None or isinstance(v, (bool, int, str)):
            out[k] = v
            continue
        try:
            f = float(v)  # floats, numpy and 0-d torch scalars
        except (TypeError, ValueError):
            out[k] = str(v)
            continue
        out[k] = f if math.isfinite(f) else None
    return out


@atexit.register
def _close_all() -> None:
    for reporter in list(_live):
        reporter.close(timeout=10.0)


class LineTee:
    """A text stream that writes through to `stream` and sends each complete line to `sink`.

    Used by `drpt_ray.run` to turn the driver's stdout/stderr into `log` events. A carriage
    return (a progress bar redrawing) keeps only the text after it.
    """

    def __init__(self, stream, sink):
        self._stream, self._sink, self._buf = stream, sink, ""
        self._lock = threading.Lock()  # Ray's log monitor prints worker lines from its own thread

    def write(self, s: str) -> int:
        n = self._stream.write(s)
        with self._lock:
            self._buf += s
            lines = []
            while "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                line = line.rsplit("\r", 1)[-1].rstrip()
                if line:
                    lines.append(line)
        for line in lines:
            self._sink(line)
        return n

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


STOP_FLUSH_S = 2.0  # Ray SIGKILLs a stopped job a few seconds after SIGTERM
FINAL_FLUSH_S = 30.0


class Stopped(BaseException):
    """SIGTERM: Ray is stopping the job (a cancel)."""


def _on_sigterm(signum, frame):
    raise Stopped()


def run_reported(reporter: "EventReporter", prog: str, body) -> int:
    """Run a driver `body() -> exit status` under the control plane's eye, for jobs and sweeps alike.

    stdout/stderr are teed to the reporter as `log` lines; SIGTERM (how Ray stops a job) becomes
    CANCELLED; a ValueError (a user's bad spec or file) becomes FAILED with exit status 2, anything
    else FAILED with a traceback and status 1. `body` reports RUNNING and its own outcome. The
    reporter is flushed (bounded) on the way out.
    """
    import signal
    import traceback

    real_out, real_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = LineTee(real_out, reporter.log), LineTee(real_err, reporter.log)
    signal.signal(signal.SIGTERM, _on_sigterm)
    flush_s, rc = FINAL_FLUSH_S, 0
    try:
        rc = body()
    except Stopped:
        flush_s, rc = STOP_FLUSH_S, 143
        reporter.state("CANCELLED", "stopped (SIGTERM from Ray)")
    except ValueError as e:  # user-caused: a bad spec, a missing file
        print(f"{prog}: error: {e}", file=sys.stderr)
        reporter.state("FAILED", str(e))
        rc = 2
    except BaseException as e:  # noqa: BLE001 - every failure must reach the control plane
        traceback.print_exc()
        reporter.state("FAILED", f"{type(e).__name__}: {e}".strip())
        rc = 1
    finally:
        sys.stdout, sys.stderr = real_out, real_err
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if not reporter.close(timeout=flush_s):
            print(f"{prog}: some events could not be delivered to {reporter.endpoint}", file=sys.stderr)
    return rc


# ----------------------------------------------------------------------------------------------
# a sweep's best trial (the driver's `sweep` event and the control plane's fallback both use this)


def _better(mode: str):
    return min if mode == "min" else max


def running_best(best: float | None, value: float, mode: str) -> float | None:
    """A trial's best-ever value of the sweep metric (by `mode`) once it reports `value`; a
    non-finite `value` leaves it as it was."""
    if not math.isfinite(value):
        return best
    return value if best is None else _better(mode)(best, value)


def best_trial(trials: list, mode: str):
    """The trial whose last reported value of the sweep metric (`.value`) is best by `mode`, among
    those that did not error (`.state != "ERROR"`) and have a finite value; None if there is none."""
    scored = [t for t in trials if t.value is not None and math.isfinite(t.value) and t.state != "ERROR"]
    return _better(mode)(scored, key=lambda t: t.value, default=None)
