"""Screenshots of the dashboard's pages for docs/ (docs/dashboard.md shows them): a dry-run control
plane on a temporary SQLite database, runs whose events this script posts as drivers would (made-up
but typical curves: nothing trains), and headless Chromium (Debian's chromium + chromium-driver).

    .venv/bin/python scripts/ui_screenshots.py [--out docs]

writes ui-jobs.png, ui-job.png, ui-sweep.png and ui-submit.png into --out.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test helpers (tests/ is not an installed package)

from tests.control_plane.browser import headless_chromium, open_dashboard, shown  # noqa: E402
from tests.control_plane.conftest import TOKEN, make_server, wait_for  # noqa: E402

RL = {"mode": "rlvr", "name": "rlvr-layerwise", "steps": 100, "eval_every": 10, "progress": False}
TAUS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]  # soft_subset temperature: small = target-only, large = full training


def rl_metrics(step: int, rng: random.Random) -> dict:
    """One RL step's metrics, shaped like a run that learns (keys as run_job reports them)."""
    rise = 1 - math.exp(-step / 25)
    m = {"step": step, "loss": rng.gauss(0, 0.02), "reward/reward_mean": 0.35 + 0.5 * rise + rng.gauss(0, 0.04),
         "reg/kept_frac_mean": 0.62 - 0.12 * rise + rng.gauss(0, 0.02),
         "reg/cos": 0.22 + 0.3 * rise + rng.gauss(0, 0.03)}
    for phase, seconds in (("gen", 0.9), ("reward", 0.05), ("logprob", 0.2),
                           ("regularize", 0.35), ("update", 0.25), ("sync", 0.08)):
        m[f"time/{phase}"] = seconds * (1 + rng.gauss(0, 0.08))
    if step % RL["eval_every"] == 0:
        m["eval/target_reward"] = 0.73 + 0.2 * rise + rng.gauss(0, 0.015)
    return m


def seed_runs(c) -> tuple[str, str]:
    """A running RL job at step 60 of 100, a finished and a cancelled SFT job, and a sweep over tau
    whose held-out loss is U-shaped. Returns the RL job's and the sweep's ids."""
    post = lambda run_id, events: c.post(f"/v1/ingest/{run_id}", json={"events": events}).raise_for_status()  # noqa: E731
    done = c.post("/v1/jobs",
                  json={"mode": "sft", "name": "sft-target-only", "steps": 300, "progress": False}).json()["id"]
    post(done, [{"seq": 1, "type": "metrics", "step": 300, "metrics": {"step": 300, "loss": 0.21}},
                {"seq": 2, "type": "state", "state": "SUCCEEDED", "message": "300 steps"}])
    cancelled = c.post("/v1/jobs",
                       json={"mode": "sft", "name": "sft-full", "steps": 300, "progress": False}).json()["id"]
    wait_for(lambda: c.get(f"/v1/jobs/{cancelled}").json()["state"] == "RUNNING", 30, "the dry-run launcher")
    c.post(f"/v1/jobs/{cancelled}/cancel").raise_for_status()

    job = c.post("/v1/jobs", json=RL).json()["id"]
    rng = random.Random(0)
    events = [{"type": "state", "state": "RUNNING"}]
    for step in range(61):
        events.append({"type": "metrics", "step": step, "metrics": rl_metrics(step, rng)})
        if step % 10 == 0:
            m = events[-1]["metrics"]
            events.append({"type": "log",
                           "line": f"step {step:3d}  reward {m['reward/reward_mean']:.3f}  kept "
                           f"{m['reg/kept_frac_mean']:.2f}"})
    post(job, [dict(e, seq=i + 1) for i, e in enumerate(events)])

    sweep = c.post("/v1/sweeps", json={"name": "tau-sweep", "metric": "eval/target_loss", "mode": "min",
                                       "base": {"mode": "sft", "steps": 300, "progress": False,
                                                "regularizer": {"feasible_set": "soft_subset"}},
                                       "space": {"regularizer.tau": {"values": TAUS}}}).json()["id"]
    trials = []
    for i, tau in enumerate(TAUS):
        loss = 0.17 + 0.045 * (math.log10(tau) - math.log10(0.3)) ** 2 + rng.gauss(0, 0.004)  # best in the middle
        trials.append({"seq": i + 1, "type": "trial", "trial_id": f"trial_{i:05d}", "config": {"regularizer.tau": tau},
                       "state": "TERMINATED", "metrics": {"step": 300, "eval/target_loss": loss}})
    post(sweep, trials)
    return job, sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    out = p.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ui-shots") as tmp:
        server = make_server(Path(tmp) / "cp", DRPT_LAUNCHER="dry-run", DRPT_MAX_RUNNING_JOBS=4).start()
        try:
            with server.http() as c, headless_chromium(Path(tmp)) as driver:
                job, sweep = seed_runs(c)
                ready = lambda css: wait_for(lambda: shown(driver, css), 30, css)  # noqa: E731
                for name, view, css, height in (("jobs", "", "#jobs table", 640),
                                                ("job", f"#/job/{job}", '[data-chart="time"]', 1480),
                                                ("sweep", f"#/sweep/{sweep}", '[data-chart="strength"]', 1000)):
                    driver.set_window_size(1360, height)
                    open_dashboard(driver, server.url, TOKEN, view)
                    ready(css)
                    driver.save_screenshot(str(out / f"ui-{name}.png"))
                # the submit form after the API refused a negative strength and an unknown key
                driver.set_window_size(1360, 1100)
                open_dashboard(driver, server.url, TOKEN, "#/submit")
                ready("#submit-form")
                driver.find_element("id", "field-name").send_keys("my-first-job")
                driver.find_element("id", "field-regularizer.frac").send_keys("-0.5")
                driver.find_element("id", "field-json").clear()
                driver.find_element("id", "field-json").send_keys('{"progress": false, "eval_evry": 50}')
                driver.find_element("css selector", "#submit-form button[type=submit]").click()
                ready("#error-json li")
                driver.save_screenshot(str(out / "ui-submit.png"))
        finally:
            server.stop()
    print(f"wrote {', '.join(f'ui-{n}.png' for n in ('jobs', 'job', 'sweep', 'submit'))} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
