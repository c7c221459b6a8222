"""Ray Tune sweeps over JobSpec fields: every trial is a real `run_job` of the sweep's base spec.

    python -m drpt_ray.tune --spec SWEEP.yaml [--address A] [--sweep-id ID --report-url URL]

A `SweepSpec` (drpt_ray.config) names dotted JobSpec paths and a search dimension for each.
`run_sweep` turns it into a `ray.tune.Tuner` run:

* The trainable (`_DrptTrial`, a class trainable) builds the trial's JobSpec (base + sampled
  paths, `output_dir = <sweep output_dir>/<trial_id>`, `progress=False`) and runs `run_job` in a
  thread; each `step()` returns the next step's metrics dict, so Tune gets every step. A trial
  that Tune stops (ASHA) makes `run_job` raise at its next step, and Tune waits for its
  `finally`, which releases the trial's actors and learner group (see `_DrptTrial`).
* Each trial reserves `trial_resources(trial spec)`: a placement group with one bundle for the
  trial driver and one per actor `run_job` starts itself (rollout workers, reward model). Tune's
  placement groups capture child tasks, so those actors (started without naming a group) land
  in the trial's bundles, and they die with the trial's group and with the trial process that
  owns them: a trial stopped early by ASHA leaks nothing even when `run_job`'s `finally` does
  not get to run. The learner is the exception: in RL (and SFT with more than one learner
  worker) `run_job` runs it as a Ray Train (V2) worker group, which reserves a placement group of
  its own (`learner_resources`; Ray has no nested
  placement groups), owned by a Train controller that the trial process owns in turn. Tune
  does not see that group, so `run_sweep` lowers `max_concurrent_trials` to the number of
  trials (both groups counted) the cluster holds at once (`concurrency`).
* scheduler `grid`: FIFO over `tune.grid_search` (num_samples repeats the grid); `random`:
  num_samples draws (seeded by `base.seed`); `asha`: random draws + `ASHAScheduler` on
  `time_attr="step"`, `grace_period=base.eval_every`, `reduction_factor=2`, `max_t=steps`, so
  every rung falls on a step that evaluates the metric. Trials that reach the last step always
  finish (`stop_last_trials=False`) and save their model.
* A driver-side Tune `Callback` keeps each trial's reported metrics and calls `on_event` with
  `{"type": "trial", "trial_id", "config", "state", "metrics"}` on start (RUNNING, metrics {}),
  on every report (RUNNING, that step's metrics), and at the end (TERMINATED: all steps ran;
  STOPPED: the scheduler ended it early; ERROR: it raised, with an extra "error" string). After
  the run one `{"type": "sweep", "state": "TERMINATED", "metric", "mode", "best_trial_id",
  "best_value", "best_config"}` event closes the stream (drpt_ray/reporting.py's wire format).
* Only evaluation steps carry the metric, yet every step is reported, so for ASHA Tune's strict
  metric check is switched off during the run (ASHA skips results without the metric).

The best trial is the one whose *last* reported value of `metric` is best (min or max by `mode`):
the value each trial ended on (for a finished trial, that of the model `run_job` saved), as
Tune's `scope="last"`. Each row also carries its best-ever value (`best_value`) for reference.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from pydantic import ValidationError
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS

from drpt_ray.config import JobSpec, SearchDim, SweepSpec, format_validation_error, get_path, load_spec, set_path
from drpt_ray.topology import apply_driver_env, plan
from drpt_ray.reporting import best_trial, running_best

EventCallback = Callable[[dict], None]

ASHA_REDUCTION_FACTOR = 2
STOP_WAIT_S = 120.0  # a stopped trial's run_job gets this long to finish its step and release its actors

# Keys Tune adds to every result; the rest is what `run_job` reported.
_TUNE_KEYS = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint", "checkpoint_dir_name"}


# ----------------------------------------------------------------------------------------------
# sizing and search space


def trial_resources(spec: JobSpec) -> tune.PlacementGroupFactory:
    """The placement group one trial of `spec` reserves: the trial driver plus every actor `run_job`
    starts itself (Tune captures child tasks into the trial's group, so they land in these bundles
    without naming the group).

    Bundles, in order, from `drpt_ray.topology.plan`: the trial driver (the Tune trainable itself;
    in SFT with one learner worker the learner runs in it, so such a trial is this one bundle of
    the learner's shape), then in RL one per RolloutWorker and the reward model's, if any.
    Strategy PACK. Not in this group: the learner. In RL (and SFT
    with `resources.learner_num_workers > 1`) `run_job` runs it as a Ray Train (V2) worker group
    (`drpt_ray.learner.LearnerGroup`), and Ray Train reserves a placement group of its own for
    the workers (`learner_resources`); Ray does not nest placement groups, so learner bundles
    here would be reserved twice and never used. Its 0-CPU helpers (the Train controller, the
    mailbox actor) are captured into this group at no cost. `run_sweep` counts both groups when
    it checks how many trials fit the cluster at once.
    """
    p = plan(spec)
    bundles = [p.driver, *p.rollout, *([p.reward_model] if p.reward_model else [])]
    return tune.PlacementGroupFactory([b.resources() for b in bundles], strategy="PACK")


def learner_resources(spec: JobSpec) -> list[dict[str, float]]:
    """The bundles the trial's learner worker group reserves itself through Ray Train (outside
    the trial's placement group): `resources.learner_num_workers` times `{"CPU":
    learner_num_cpus, "GPU": learner_num_gpus}`, placed by `resources.placement_strategy`;
    [] when the learner runs in the trial process."""
    return [b.resources() for b in plan(spec).learner]


def trial_demand(spec: JobSpec) -> dict[str, float]:
    """Everything one trial holds while it runs: its placement group plus its learner group."""
    return plan(spec).total()


def search_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune param_space keyed by the dotted JobSpec paths.

    grid: `tune.grid_search(values)` (a range is an error). random / asha: values ->
    `tune.choice`; low/high -> `tune.uniform` / `tune.loguniform` (log=True), or `tune.randint` /
    `tune.lograndint` over [low, high] inclusive when the base field is an int.
    """
    base = spec.base.model_dump()
    out: dict[str, Any] = {}
    for path, dim in spec.space.items():
        out[path] = _domain(spec.scheduler, path, dim, get_path(base, path))
    return out


def _domain(scheduler: str, path: str, dim: SearchDim, current):
    if scheduler == "grid":
        if dim.values is None:
            raise ValueError(f"space: {path}: scheduler 'grid' needs values, got a range")
        return tune.grid_search(list(dim.values))
    if dim.values is not None:
        return tune.choice(list(dim.values))
    if isinstance(current, int) and not isinstance(current, bool):
        low, high = dim.probes(current)
        return tune.lograndint(low, high + 1) if dim.log else tune.randint(low, high + 1)
    return tune.loguniform(dim.low, dim.high) if dim.log else tune.uniform(dim.low, dim.high)


def trial_spec(spec: SweepSpec, config: dict, trial_id: str) -> JobSpec:
    """The JobSpec of one trial: base with each sampled path set, its own output_dir, no progress bar."""
    tree = spec.base.model_dump()
    for path, value in config.items():
        tree = set_path(tree, path, value)
    tree = set_path(tree, "output_dir", str(Path(spec.output_dir).resolve() / trial_id))
    tree = set_path(tree, "progress", False)
    try:
        return JobSpec.model_validate(tree)
    except ValidationError as e:
        raise ValueError(format_validation_error(e, f"trial {trial_id} {config}")) from None


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class TrialRow:
    trial_id: str
    config: dict  # searched path -> value
    state: str  # PENDING | RUNNING | TERMINATED | STOPPED | ERROR
    value: float | None = None  # last reported value of the sweep metric
    best_value: float | None = None  # best reported value of the sweep metric (by mode)
    steps: int = 0  # last reported step
    output_dir: str = ""
    error: str | None = None
    history: list[dict] = field(default_factory=list)  # run_job's metrics, one dict per reported step


@dataclass
class SweepResult:
    metric: str
    mode: str
    output_dir: Path
    trials: list[TrialRow]
    best: TrialRow | None  # best finite *last* reported value of `metric` among trials that did not error; else None
    plot: Path | None = None
    wall_s: float = 0.0

    def table(self) -> str:
        paths = sorted({p for t in self.trials for p in t.config})
        head = ["trial_id", *paths, "state", "steps", f"{self.metric} (last)", "best"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for t in self.trials:
            cells = [t.trial_id, *[_fmt(t.config.get(p)) for p in paths],
                     t.state, str(t.steps), _fmt(t.value), _fmt(t.best_value)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ----------------------------------------------------------------------------------------------
# the driver-side callback


class _TrialEvents(tune.Callback):
    """Collects each trial's reported metrics and forwards trial events to `on_event`."""

    def __init__(self, spec: SweepSpec, on_event: EventCallback | None):
        self.spec, self.on_event = spec, on_event
        self.rows: dict[str, TrialRow] = {}
        self._event_failed = False

    def __getstate__(self) -> dict:
        # Tuner pickles its callbacks (tuner.pkl, for restore); `on_event` may hold a reporter
        # with locks and sockets, so it stays with the live object only.
        return {**self.__dict__, "on_event": None}

    def _row(self, trial) -> TrialRow:
        row = self.rows.get(trial.trial_id)
        if row is None:
            out = str(Path(self.spec.output_dir).resolve() / trial.trial_id)
            row = self.rows[trial.trial_id] = TrialRow(trial.trial_id, dict(trial.config), "PENDING", output_dir=out)
        return row

    def _emit(self, row: TrialRow, metrics: dict, **extra) -> None:
        if self.on_event is None:
            return
        event = {"type": "trial", "trial_id": row.trial_id, "config": dict(row.config),
                 "state": row.state, "metrics": metrics, **extra}
        try:
            self.on_event(event)
        except Exception as e:  # a reporter's network hiccup must not end the sweep
            if not self._event_failed:
                print(f"drpt_ray.tune: on_event failed ({type(e).__name__}: {e}); continuing", file=sys.stderr)
            self._event_failed = True

    def on_trial_start(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row.state = "RUNNING"
        self._emit(row, {})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        metrics = {k: v for k, v in result.items() if k not in _TUNE_KEYS}
        if "step" not in metrics:  # the trainable's closing {"done": True}
            return
        row.history.append(metrics)
        row.steps = int(metrics.get("step", row.steps))
        value = metrics.get(self.spec.metric)
        if isinstance(value, (int, float)):
            row.value = float(value)
            row.best_value = running_best(row.best_value, row.value, self.spec.mode)
        self._emit(row, metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        target = int(row.config.get("steps", self.spec.base.steps))
        row.state = "TERMINATED" if row.steps >= target else "STOPPED"
        self._emit(row, row.history[-1] if row.history else {})

    def on_trial_error(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row.state = "ERROR"
        path = trial.error_file  # written (locally, synchronously) just before this callback
        row.error = _error_summary(Path(path).read_text()) if path and Path(path).exists() else "unknown error"
        self._emit(row, row.history[-1] if row.history else {}, error=row.error)


def _error_summary(text: str) -> str:
    """The last exception of a Tune error file: its `Type: message` line and what follows.

    A trial whose job the divergence guard stopped (`drpt_ray.trainer.Diverged`, whose name ends
    in none of the usual suffixes) is an ERROR trial like any other, with the guard's message."""
    lines = [x.rstrip() for x in text.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Diverged)\b", lines[i]):
            return "\n".join(lines[i:]).strip()[:2000]
    return lines[-1] if lines else "unknown error"


# ----------------------------------------------------------------------------------------------
# the trainable


class _TrialStopped(BaseException):
    """Raised from `run_job`'s metrics callback once Tune stops the trial (run_job's finally runs)."""


class _DrptTrial(tune.Trainable):
    """One trial: `run_job` in a thread of the trial process; each `step()` hands Tune the next
    step's metrics.

    A class trainable rather than a function one for the stop: Tune stops a function trainable
    without waiting for its thread (`session.finish(timeout=0)`) and then removes the trial's
    placement group, killing the process while `run_job`'s `finally` may still be releasing the
    learner's Ray Train group, whose own placement group then outlives the trial. Here `cleanup`
    makes `run_job` raise at its next step and waits (at most STOP_WAIT_S) for its `finally`.
    """

    def setup(self, config: dict, sweep: SweepSpec) -> None:
        self._results: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        job = trial_spec(sweep, config, self.trial_id)
        self._thread = threading.Thread(target=self._run, args=(job,), name="drpt-run-job", daemon=True)
        self._thread.start()

    def _run(self, job: JobSpec) -> None:
        from drpt_ray.trainer import run_job

        def on_metrics(metrics: dict) -> None:
            if self._stop.is_set():
                raise _TrialStopped()
            self._results.put(("metrics", dict(metrics)))

        try:
            run_job(job, on_metrics=on_metrics)
            self._results.put(("done", None))
        except _TrialStopped:
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised in step(), which makes the trial ERROR
            self._results.put(("error", e))

    def step(self) -> dict:
        kind, value = self._results.get()
        if kind == "metrics":
            return value
        if kind == "done":
            return {"done": True}  # no metrics: the callback skips results without "step"
        raise value

    def cleanup(self) -> None:
        self._stop.set()
        self._thread.join(timeout=STOP_WAIT_S)
        if self._thread.is_alive():
            print(f"drpt_ray.tune: trial {self.trial_id}: run_job did not stop within {STOP_WAIT_S:.0f} s",
                  file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# the run


@contextmanager
def _env(key: str, value: str | None):
    """Set (or leave alone, when value is None) one environment variable for the block."""
    if value is None:
        yield
        return
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


_SIZING_PREFIXES = ("mode", "rollout.", "resources.", "reward.")


def peak_trial_demand(spec: SweepSpec) -> dict[str, float]:
    """The most any one trial holds (`trial_demand`), over the searched values of the paths that
    change a trial's size (mode, rollout.*, resources.*, reward.*; a range counts by its ends)."""
    import itertools

    sizing = {p: d for p, d in spec.space.items() if p == "mode" or p.startswith(_SIZING_PREFIXES)}
    base = spec.base.model_dump()
    choices = [d.probes(get_path(base, p)) for p, d in sizing.items()]
    peak: dict[str, float] = {}
    for combo in itertools.product(*choices):
        tree = base
        for path, value in zip(sizing, combo):
            tree = set_path(tree, path, value)
        try:
            job = JobSpec.model_validate(tree)
        except ValueError:
            continue  # an invalid combination errors as its own trial
        for k, v in trial_demand(job).items():
            peak[k] = max(peak.get(k, 0.0), v)
    return peak or trial_demand(spec.base)


def concurrency(spec: SweepSpec) -> int:
    """`max_concurrent_trials`, lowered to the number of trials the cluster holds at once.

    Tune only sees each trial's placement group; the learner group's (reserved by Ray Train) is
    invisible to it, so without this a trial could start whose learner never gets resources.
    The count uses the cluster's current total resources; a cluster that cannot hold even one
    trial (an autoscaler still to add nodes) keeps `max_concurrent_trials`.
    """
    need = peak_trial_demand(spec)
    total = ray.cluster_resources()
    fits = min((int(total.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0),
               default=spec.max_concurrent_trials)
    if fits < 1:
        print(f"drpt_ray.tune: a trial needs {need}, more than the cluster has now ({total}); waiting for resources",
              file=sys.stderr)
        return spec.max_concurrent_trials
    if fits < spec.max_concurrent_trials:
        print(f"drpt_ray.tune: max_concurrent_trials {spec.max_concurrent_trials} -> {fits}: a trial holds {need} "
              f"(its placement group + its learner group), the cluster has {total.get('CPU', 0)} CPU", file=sys.stderr)
    return min(fits, spec.max_concurrent_trials)


def _max_steps(spec: SweepSpec) -> int:
    dim = spec.space.get("steps")
    if dim is None:
        return spec.base.steps
    return int(max(dim.values) if dim.values is not None else dim.high)


def run_sweep(spec: SweepSpec, on_event: EventCallback | None = None, address: str | None = None) -> SweepResult:
    """Run the sweep on the Ray cluster at `address` (or the running / a new local one); see the module doc."""
    t0 = time.perf_counter()
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from drpt_ray.job import init_ray

    init_ray(peak_trial_demand(spec).get("CPU", 1.0), address)
    root = Path(spec.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    param_space = search_space(spec)

    def sizing(config: dict) -> tune.PlacementGroupFactory:
        try:
            return trial_resources(trial_spec(spec, config, "sizing"))
        except ValueError:  # an invalid sampled value: the trial itself fails in setup, naming the field
            return trial_resources(spec.base)

    trainable = tune.with_resources(tune.with_parameters(_DrptTrial, sweep=spec), sizing)
    if spec.scheduler == "asha":
        max_t = _max_steps(spec)
        scheduler = ASHAScheduler(
            time_attr="step", metric=spec.metric, mode=spec.mode, max_t=max_t,
            grace_period=min(spec.base.eval_every, max_t),
            reduction_factor=ASHA_REDUCTION_FACTOR, stop_last_trials=False,
        )
    else:
        scheduler = FIFOScheduler()
    searcher = BasicVariantGenerator(max_concurrent=concurrency(spec), random_state=spec.base.seed)
    events = _TrialEvents(spec, on_event)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(scheduler=scheduler, search_alg=searcher,
                                    num_samples=spec.num_samples, reuse_actors=False),
        run_config=tune.RunConfig(
            name=spec.name or "sweep", storage_path=str(root / "tune"), callbacks=[events], verbose=0,
            # run_job writes its own checkpoints (JobSpec.checkpoint); Tune would ask a class
            # trainable for one at the end by default.
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False, checkpoint_frequency=0),
        ),
    )
    # Only evaluation steps carry the metric, but every step is reported; Tune's strict check
    # (every result must hold the scheduler's metric) would fail step 1. ASHA itself skips
    # results without the metric, so the check is switched off for this run only.
    with _env("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1" if spec.scheduler == "asha" else None):
        tuner.fit()

    trials = sorted(events.rows.values(), key=lambda t: t.trial_id)
    best = best_trial(trials, spec.mode)
    result = SweepResult(spec.metric, spec.mode, root, trials, best, wall_s=time.perf_counter() - t0)
    result.plot = plot_sweep(result, root / "sweep.png")
    if on_event is not None:
        try:
            on_event({
                "type": "sweep", "state": "TERMINATED", "metric": spec.metric, "mode": spec.mode,
                "best_trial_id": best.trial_id if best else None, "best_value": best.value if best else None,
                "best_config": dict(best.config) if best else None,
            })
        except Exception as e:
            print(f"drpt_ray.tune: on_event failed ({type(e).__name__}: {e})", file=sys.stderr)
    return result


def plot_sweep(result: SweepResult, path: Path) -> Path | None:
    """`metric` vs step, one line per trial (label: its searched values); the best trial drawn thicker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for t in result.trials:
        pts = [(m["step"], m[result.metric]) for m in t.history if result.metric in m and "step" in m]
        if pts:
            lines.append((t, pts))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for t, pts in lines:
        label = ", ".join(f"{p.split('.')[-1]}={_fmt(v)}" for p, v in sorted(t.config.items()))
        best = result.best is not None and t.trial_id == result.best.trial_id
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, lw=2.5 if best else 1.2,
                label=f"{label} [{t.state.lower()}]" + (" (best)" if best else ""))
    ax.set_xlabel("step")
    ax.set_ylabel(result.metric)
    ax.set_title(f"sweep: {result.metric} ({result.mode})", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# command line


def _print_event(event: dict) -> None:
    if event["type"] == "trial" and (event["state"] != "RUNNING" or not event["metrics"]):
        extra = f" ({event['error']})" if event.get("error") else ""
        print(f"trial {event['trial_id']} {event['state']} {event['config']}{extra}", flush=True)


def _print_result(spec: SweepSpec, result: SweepResult) -> None:
    print(result.table())
    if result.best is not None:
        b = result.best
        print(f"best trial: {b.trial_id} {b.config} {spec.metric}={b.value:.4g} (last reported, mode {spec.mode}); "
              f"output {b.output_dir}")
    else:
        print(f"best trial: none (no trial reported {spec.metric})")
    if result.plot is not None:
        print(f"plot: {result.plot}")


def _artifacts(result: SweepResult | None, spec: SweepSpec | None) -> dict:
    out = {"output_dir": str(Path(spec.output_dir).resolve())} if spec is not None else {}
    if result is not None:
        if result.plot is not None:
            out["curves"] = str(result.plot)
        if result.best is not None:
            out["best_output_dir"] = result.best.output_dir
    return out


def reported_sweep(args: argparse.Namespace) -> int:
    """Run the sweep, posting to the control plane what `drpt_ray.run` posts for a job (state
    RUNNING, log lines, SUCCEEDED / FAILED / CANCELLED with artifacts) plus every `trial` event
    and the closing `sweep` event; returns the exit status."""
    try:
        from drpt_ray.reporting import EventReporter, _jsonable, run_reported
    except ImportError as e:
        print("drpt_ray.tune: error: --report-url needs drpt_ray.reporting (EventReporter), which cannot "
              f"be imported: {e}", file=sys.stderr)
        return 2
    reporter = EventReporter(args.report_url, args.sweep_id, os.environ.get("DRPT_INGEST_TOKEN"))

    def on_event(event: dict) -> None:
        _print_event(event)
        if "metrics" in event:
            event = {**event, "metrics": _jsonable(event["metrics"])}  # NaN -> null: strict JSON on the wire
        reporter.emit(event)

    def body() -> int:
        spec = load_spec(args.spec, SweepSpec)
        reporter.state("RUNNING", artifacts=_artifacts(None, spec))
        result = run_sweep(spec, on_event=on_event, address=args.address)
        _print_result(spec, result)
        if result.best is None:
            reporter.state("FAILED", f"no trial reported {spec.metric}", artifacts=_artifacts(result, spec))
            return 1
        reporter.state("SUCCEEDED", artifacts=_artifacts(result, spec))
        return 0

    return run_reported(reporter, "drpt_ray.tune", body)


def main(argv: list[str] | None = None) -> int:
    apply_driver_env()
    p = argparse.ArgumentParser(prog="python -m drpt_ray.tune", description="Ray Tune sweep over JobSpec fields.")
    p.add_argument("--spec", required=True, help="YAML (or JSON) file with a SweepSpec")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS inside a Ray job, else a local Ray)")
    p.add_argument("--sweep-id", help="id the control plane knows this sweep by (with --report-url)")
    p.add_argument("--report-url", help="control-plane base URL to post events to; token from env DRPT_INGEST_TOKEN")
    args = p.parse_args(argv)
    if args.address is None and os.environ.get("RAY_ADDRESS"):
        args.address = "auto"  # connect to the job's cluster rather than starting a second local Ray
    if args.report_url:
        if not args.sweep_id:
            p.error("--report-url needs --sweep-id")
        return reported_sweep(args)
    try:
        spec = load_spec(args.spec, SweepSpec)
        result = run_sweep(spec, on_event=_print_event, address=args.address)
    except ValueError as e:
        print(f"drpt_ray.tune: error: {e}", file=sys.stderr)
        return 2
    _print_result(spec, result)
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
