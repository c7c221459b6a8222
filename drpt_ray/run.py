"""`python -m drpt_ray.run --spec SPEC.yaml [--address ADDR] [--job-id ID --report-url URL]`: the job
entry point Ray Jobs and KubeRay RayJobs call (same as `drpt-ray run`).

With `--report-url` the driver reports to the control plane (`drpt_ray.reporting`, token from env
`DRPT_INGEST_TOKEN`): state RUNNING, one `metrics` event per step, an `alert` event each time the
divergence guard trips, its stdout/stderr lines as `log` events, and a final SUCCEEDED /
FAILED(message) / CANCELLED (on SIGTERM, which is how Ray stops a job) / DIVERGED(message, when the
divergence guard ended the job: a non-finite loss, or any alert with `divergence.stop_on_divergence`;
exit status 3) with the artifact paths. Inside a Ray job (env RAY_ADDRESS set) the default address
is that cluster.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from drpt_ray.cli import main
from drpt_ray.errors import DIVERGED_EXIT


def entry(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m drpt_ray.run")
    p.add_argument("--spec", required=True, help="YAML (or JSON) file with a JobSpec")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS inside a Ray job, else a local Ray)")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--job-id", help="id the control plane knows this job by (with --report-url)")
    p.add_argument("--report-url", help="control-plane base URL to post events to; token from env DRPT_INGEST_TOKEN")
    a = p.parse_args(argv)
    if os.environ.get("RAY_ADDRESS"):  # inside a Ray job (Jobs API, KubeRay RayJob)
        if a.address is None:
            a.address = "auto"  # the job's cluster, not a second local Ray
        # run_job's ray.init(runtime_env=...) repeats env vars the job's runtime env already sets
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    if a.report_url:
        if not a.job_id:
            p.error("--report-url needs --job-id")
        return reported_run(a)
    out = str(Path(a.output_dir).resolve()) if a.output_dir else _absolute_output_dir(a.spec)
    args = ["run", a.spec] + (["--address", a.address] if a.address else []) + (["--output-dir", out] if out else [])
    return main(args)


def _absolute_output_dir(spec_path: str) -> str | None:
    """The spec's output_dir made absolute; None if the spec cannot be read,
    which `drpt-ray run` then reports."""
    from drpt_ray.config import JobSpec, load_spec

    try:
        return str(Path(load_spec(spec_path, JobSpec).output_dir).resolve())
    except ValueError:
        return None


def reported_run(a: argparse.Namespace) -> int:
    """Run the job, reporting state, metrics and log lines; returns the process exit status."""
    from drpt_ray.cli import summary
    from drpt_ray.config import JobSpec, load_spec
    from drpt_ray.reporting import EventReporter, run_reported

    from drpt_ray.local_ray import CONTROL_PLANE_SECRETS

    # Names only: what the control plane passed, and whether any of its own secrets came along.
    leaked = sorted(k for k in CONTROL_PLANE_SECRETS if k in os.environ)
    print("drpt-ray driver: environment has " + ", ".join(sorted(k for k in os.environ if k.startswith("DRPT_")))
          + f"; control-plane secrets: {', '.join(leaked) or 'none'}", file=sys.stderr)

    reporter = EventReporter(a.report_url, a.job_id, os.environ.get("DRPT_INGEST_TOKEN"))

    def body() -> int:
        from drpt_ray.trainer import Diverged, run_job  # inside: a failed import is reported as FAILED

        spec = load_spec(a.spec, JobSpec)  # run_job makes its paths absolute
        if a.output_dir:
            spec.output_dir = str(Path(a.output_dir).resolve())
        reporter.state("RUNNING", artifacts={"output_dir": str(Path(spec.output_dir).resolve())})
        try:
            result = run_job(spec, on_metrics=reporter.on_metrics, address=a.address, on_alert=reporter.alert,
                             on_samples=reporter.samples)
        except Diverged as e:
            print(f"drpt-ray: diverged at step {e.step}: {e.message}", file=sys.stderr)
            reporter.state("DIVERGED", f"step {e.step}: {e.message}", artifacts=artifacts(spec.output_dir))
            return DIVERGED_EXIT
        print(summary(result.history))
        reporter.state("SUCCEEDED", artifacts=artifacts(result.output_dir))
        return 0

    return run_reported(reporter, "drpt-ray", body)


def artifacts(out: Path) -> dict:
    """Paths a finished job leaves in its output_dir (absolute, as seen by the driver)."""
    out = Path(out).resolve()
    found = {"output_dir": str(out), "checkpoints": sorted(str(p) for p in (out / "checkpoints").glob("step_*"))}
    for key, name in (("model", "model"), ("metrics", "metrics.jsonl"),
                      ("curves", "curves.png"), ("tensorboard", "tb")):
        if (out / name).exists():
            found[key] = str(out / name)
    return found


if __name__ == "__main__":
    sys.exit(entry())
