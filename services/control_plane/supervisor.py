"""The loop beside the API: admits queued runs to Ray and reconciles active ones with Ray.

One thread, one tick every `DRPT_POLL_INTERVAL_S` (sooner when woken by a submit, a cancel or a
finished run). The first tick runs at start-up, so runs that were PENDING or RUNNING when the
previous control-plane process died are matched against Ray before anything new is admitted.

* reconcile: for every run Ray holds (PENDING/RUNNING, or CANCELLED while Ray has not stopped it
  yet), ask Ray for its status. Ray RUNNING -> RUNNING; Ray SUCCEEDED/FAILED and the driver did not
  report it -> the same state with Ray's message; Ray STOPPED -> CANCELLED (if requested) else
  FAILED; Ray has no such job -> FAILED. A CANCELLED run still alive on Ray is stopped again. A
  run RUNNING with no Ray job behind it (only events posted with its ingest token can move a run
  before its submission) holds no slot and fails after ORPHAN_GRACE_TICKS poll intervals.
* admit: while fewer than `DRPT_MAX_RUNNING_JOBS` runs are PENDING/RUNNING, submit the oldest
  QUEUED job or sweep whose tenant has fewer than `DRPT_MAX_RUNNING_PER_TENANT` on Ray (the others
  wait, and a later tenant's run goes first). Ray unreachable -> they stay QUEUED and the next tick retries.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from sqlalchemy import select

from services.control_plane import store
from services.control_plane.db import ACTIVE, Database, Job, Sweep, now
from services.control_plane.launcher import RAY_TERMINAL, Launcher, LauncherUnavailable
from services.control_plane.security import IngestKeys

log = logging.getLogger("drpt.control_plane")
ADMIT_LOOKAHEAD = 1000  # queued runs read per tick beyond the free slots
ORPHAN_GRACE_TICKS = 100  # a run RUNNING with no Ray job fails after this many poll intervals


class Supervisor:
    def __init__(self, db: Database, launcher: Launcher, keys: IngestKeys, max_running: int, interval_s: float,
                 notify: Callable[[str], None], max_per_tenant: int | None = None):
        self.db, self.launcher, self.keys = db, launcher, keys
        self.max_running, self.interval_s, self.notify = max_running, interval_s, notify
        self.max_per_tenant = max_per_tenant
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drpt-supervisor", daemon=True)
        self._last_warning: str | None = None
        self.ray_reachable: bool | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, run_id: str, kind: str, scope: str | None) -> Job | Sweep:
        """Mark a run (of tenant `scope`, when given) CANCELLED and stop its Ray job; if Ray cannot be
        reached now, the next reconcile stops it (the run's `cancel_requested` stays set). Returns the run."""
        run, ray_job_id = store.request_cancel(self.db, run_id, kind=kind, scope=scope)
        if ray_job_id is not None:
            try:
                self.launcher.stop(ray_job_id)
            except LauncherUnavailable as e:
                log.warning("cancel %s: could not reach Ray yet (%s)", run_id, e)
        self.notify(run_id)
        self.wake()
        return run

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def tick(self) -> None:
        try:
            self.reconcile()
            self.admit()
            self.ray_reachable = True
            self._last_warning = None
        except LauncherUnavailable as e:
            self.ray_reachable = False
            if str(e) != self._last_warning:  # once per distinct problem, not every tick
                log.warning("Ray Jobs API unavailable (%s); queued runs wait, active runs are re-checked", e)
                self._last_warning = str(e)
        except Exception:
            log.exception("supervisor tick failed")

    # ------------------------------------------------------------------------------------------

    def reconcile(self) -> None:
        # Runs RUNNING with no Ray job: they hold no slot (store.count_active), and after a grace
        # period (a test or a late driver may still finish them) they fail.
        cutoff = now() - ORPHAN_GRACE_TICKS * self.interval_s
        with self.db.read() as s:
            orphans = [run_id for model in (Job, Sweep) for run_id in s.scalars(
                select(model.id).where(model.state.in_(ACTIVE), model.ray_job_id.is_(None), model.started_at < cutoff))]
        for run_id in orphans:
            with self.db.write() as s:
                run = store.get_run(s, run_id, for_update=True)
                changed = store.transition(s, run, "FAILED",
                                           "reported running with no Ray job behind it (not submitted by "
                                           "this control plane)")
            if changed:
                self.notify(run_id)
        with self.db.read() as s:
            todo = []
            for model in (Job, Sweep):
                rows = s.execute(
                    select(model.id, model.ray_job_id, model.state, model.ray_status).where(
                        model.ray_job_id.is_not(None),
                        model.state.in_(ACTIVE) | ((model.state == "CANCELLED")
                                                   & (model.ray_status.is_(None)
                                                      | model.ray_status.not_in(RAY_TERMINAL + ("MISSING",)))),
                    )
                ).all()
                todo += rows
        for run_id, ray_job_id, state, _ in todo:
            ray = self.launcher.status(ray_job_id)
            if state == "CANCELLED" and ray.status not in RAY_TERMINAL + ("MISSING",):
                self.launcher.stop(ray_job_id)
                ray = self.launcher.status(ray_job_id)
            if self._apply_ray_status(run_id, ray.status, ray.message):
                self.notify(run_id)

    def _apply_ray_status(self, run_id: str, status: str, message: str | None) -> bool:
        with self.db.write() as s:
            run = store.get_run(s, run_id, for_update=True)
            run.ray_status = status
            if status == "RUNNING":
                return store.transition(s, run, "RUNNING", "running on Ray")
            if status == "SUCCEEDED":
                return store.transition(s, run, "SUCCEEDED", "Ray reports the driver exited 0")
            if status == "FAILED":
                return store.transition(s, run, "FAILED", f"Ray: {message or 'driver failed'}")
            if status == "STOPPED":
                if run.cancel_requested:
                    return store.transition(s, run, "CANCELLED", "cancelled by request")
                return store.transition(s, run, "FAILED", "stopped on Ray outside the control plane")
            if status == "MISSING":
                return store.transition(s, run, "FAILED", message)
            return False

    def admit(self) -> None:
        with self.db.read() as s:
            active = store.count_active(s)
            free = self.max_running - sum(active.values())
            if free <= 0:
                return
            queued = []
            for model in (Job, Sweep):  # enough to look past the runs of tenants at their limit
                queued += s.execute(select(model.id, model.created_at, model.spec, model.tenant)
                                    .where(model.state == "QUEUED")
                                    .order_by(model.created_at).limit(free + ADMIT_LOOKAHEAD)).all()
        for run_id, _, spec, tenant in sorted(queued, key=lambda r: r[1]):
            if free <= 0:
                break
            if self.max_per_tenant is not None and active.get(tenant, 0) >= self.max_per_tenant:
                continue
            free -= 1
            active[tenant] = active.get(tenant, 0) + 1
            kind = "sweep" if store.model_of(run_id) is Sweep else "job"
            try:
                ray_job_id = self.launcher.submit(run_id, kind, spec, self.keys.token(run_id))
            except LauncherUnavailable:
                raise
            except Exception as e:  # Ray refused this submission: the run cannot start
                self._finish_submit(run_id, None, f"submission to Ray failed: {e}")
                continue
            self._finish_submit(run_id, ray_job_id, None)

    def _finish_submit(self, run_id: str, ray_job_id: str | None, error: str | None) -> None:
        with self.db.write() as s:
            run = store.get_run(s, run_id, for_update=True)
            if error is not None:
                store.transition(s, run, "FAILED", error)
            else:
                run.ray_job_id = ray_job_id
                # cancelled meanwhile: reconcile stops it
                run.ray_status = None if run.state == "CANCELLED" else "PENDING"
                store.transition(s, run, "PENDING", f"submitted to Ray as {ray_job_id}")
        self.notify(run_id)
