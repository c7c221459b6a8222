"""Ray Tune sweeps over JobSpec fields: real `run_job` trials on a 2-CPU local Ray."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time

import pytest
import ray
from ray import tune

from drpt_ray.demo import RLVR_DEMO
from drpt_ray.config import JobSpec, SweepSpec
from drpt_ray.tune import main as tune_main
from drpt_ray.tune import (_error_summary, learner_resources, peak_trial_demand, run_sweep, search_space, trial_demand,
                           trial_resources)
from drpt_ray.wire import IngestBatch

pytestmark = pytest.mark.slow

SFT_TOY = {"mode": "sft", "steps": 30, "eval_every": 10, "progress": False, "tensorboard": False,
           "regularizer": {"feasible_set": "soft_subset"}}
METRIC = "eval/target_loss"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def assert_cluster_free(timeout_s: float = 20.0) -> None:
    """Every placement group (trials' and learner groups') is gone and all CPUs are back."""
    deadline = time.time() + timeout_s
    while True:
        total, avail = ray.cluster_resources(), ray.available_resources()
        groups = [k for k in total if "_group_" in k]  # a group's resources exist while the group does
        if avail.get("CPU", 0) == total["CPU"] and not groups:
            return
        if time.time() > deadline:
            raise AssertionError(f"resources still held after the sweep: groups {groups}, available {avail}")
        time.sleep(0.5)


def test_grid_sweep_of_tau_runs_real_trials(local_ray, tmp_path):
    spec = SweepSpec.model_validate({
        "base": SFT_TOY, "space": {"regularizer.tau": {"values": [0.5, 2.0, 8.0]}},
        "metric": METRIC, "mode": "min", "scheduler": "grid", "output_dir": str(tmp_path),
    })
    events = []
    t0 = time.perf_counter()
    result = run_sweep(spec, on_event=events.append)
    print(f"grid sweep: {time.perf_counter() - t0:.1f} s\n{result.table()}")

    assert [t.state for t in result.trials] == ["TERMINATED"] * 3
    assert sorted(t.config["regularizer.tau"] for t in result.trials) == [0.5, 2.0, 8.0]
    for t in result.trials:
        assert t.steps == 30
        assert [m["step"] for m in t.history] == list(range(31))  # every step reached Tune
        evals = [m[METRIC] for m in t.history if METRIC in m]
        assert len(evals) == 4 and t.value == evals[-1] and t.best_value == min(evals)
        # a real run_job trial: its own output dir, the same metrics on disk, its tau in effect
        lines = [json.loads(x) for x in (tmp_path / t.trial_id / "metrics.jsonl").read_text().splitlines()]
        assert t.history == lines  # exactly run_job's metrics reached Tune and the callback (no Tune keys)
        assert (tmp_path / t.trial_id / "model" / "model.safetensors").exists()
    assert len({t.value for t in result.trials}) == 3  # tau changes the run
    assert result.best.trial_id == min(result.trials, key=lambda t: t.value).trial_id
    assert (tmp_path / "sweep.png").stat().st_size > 0

    trial_events = [e for e in events if e["type"] == "trial"]
    assert {e["state"] for e in trial_events} == {"RUNNING", "TERMINATED"}
    ends = [e for e in trial_events if e["state"] == "TERMINATED"]
    assert len(ends) == 3 and all(e["metrics"]["step"] == 30 and set(e["config"]) == {"regularizer.tau"} for e in ends)
    assert sum(1 for e in trial_events if e["state"] == "RUNNING" and e["metrics"]) == 3 * 31
    assert events[-1]["type"] == "sweep" and events[-1]["best_trial_id"] == result.best.trial_id
    assert_cluster_free()


def test_asha_random_sweep_stops_early_and_releases_resources(local_ray, tmp_path):
    spec = SweepSpec.model_validate({
        "base": SFT_TOY,
        "space": {"regularizer.tau": {"low": 0.1, "high": 20.0, "log": True}, "optim.lr": {"values": [3e-4, 3e-3]}},
        "metric": METRIC, "mode": "min", "scheduler": "asha", "num_samples": 4, "max_concurrent_trials": 2,
        "output_dir": str(tmp_path),
    })
    t0 = time.perf_counter()
    result = run_sweep(spec)
    print(f"asha sweep: {time.perf_counter() - t0:.1f} s\n{result.table()}")

    assert len(result.trials) == 4 and all(t.state in ("TERMINATED", "STOPPED") for t in result.trials)
    assert len({t.config["regularizer.tau"] for t in result.trials}) == 4
    stopped = [t for t in result.trials if t.state == "STOPPED"]
    assert all(10 <= t.steps < 30 and t.steps % 10 == 0 for t in stopped)  # cut at a rung, which is an eval step
    assert result.best is not None
    assert result.best.value == min(t.value for t in result.trials)
    assert_cluster_free()


def test_trial_resources_bundles():
    rl = JobSpec.model_validate({
        "mode": "rlhf", "reward": {"kind": "model"},
        "resources": {"learner_num_cpus": 2, "learner_num_gpus": 1},
        "rollout": {"num_workers": 2, "num_cpus_per_worker": 1.5, "num_gpus_per_worker": 0.5},
    })
    pgf = trial_resources(rl)
    assert pgf.bundles == [
        {"CPU": 1.0},  # trial driver
        {"CPU": 1.5, "GPU": 0.5}, {"CPU": 1.5, "GPU": 0.5},  # rollout workers
        {"CPU": 0.5},  # reward model
    ]
    assert pgf.strategy == "PACK"
    assert learner_resources(rl) == [{"CPU": 2.0, "GPU": 1.0}]  # Ray Train's own placement group
    assert trial_demand(rl) == {"CPU": 6.5, "GPU": 2.0}
    sft = JobSpec(mode="sft")
    # learner in the trial process
    assert trial_resources(sft).bundles == [{"CPU": 1.0}] and learner_resources(sft) == []
    assert learner_resources(JobSpec(mode="sft", resources={"learner_num_workers": 2})) == [{"CPU": 1.0}] * 2
    assert trial_resources(JobSpec(mode="rlvr")).bundles == [{"CPU": 1.0}, {"CPU": 1.0}]
    sweep = SweepSpec(base={"mode": "rlvr"},
                      space={"rollout.num_workers": {"values": [1, 3]}, "optim.lr": {"values": [1e-3, 1e-4]}})
    assert peak_trial_demand(sweep) == {"CPU": 5.0}  # driver + 3 rollout workers + learner


def test_search_space_mapping():
    space = {"regularizer.tau": {"values": [0.5, 2.0]}, "optim.lr": {"low": 1e-4, "high": 1e-2, "log": True},
             "regularizer.frac": {"low": 0.1, "high": 0.9}, "batch_size": {"low": 2, "high": 16}}
    grid = search_space(SweepSpec(space={"regularizer.tau": space["regularizer.tau"]}, scheduler="grid"))
    assert grid == {"regularizer.tau": tune.grid_search([0.5, 2.0])}
    rnd = search_space(SweepSpec(space=space, scheduler="random"))
    tau, lr, frac, bs = (rnd[k] for k in space)
    assert isinstance(tau, tune.search.sample.Categorical) and tau.categories == [0.5, 2.0]
    assert isinstance(lr.get_sampler(), tune.search.sample.Float._LogUniform) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert isinstance(frac.get_sampler(), tune.search.sample.Float._Uniform) and (frac.lower, frac.upper) == (0.1, 0.9)
    # int field: randint, high inclusive
    assert isinstance(bs, tune.search.sample.Integer) and (bs.lower, bs.upper) == (2, 17)


def test_bad_space_path_is_named():
    with pytest.raises(ValueError, match=re.escape("'regularizer.tauu'")):
        SweepSpec.model_validate({"space": {"regularizer.tauu": {"values": [1.0]}}})


def test_rl_trial_actors_land_in_the_trial_placement_group(local_ray, tmp_path):
    """One RLVR trial on 2 CPUs: its placement group (driver 1 + rollout worker 0.5) and Ray
    Train's learner group (0.5) fill the cluster, so the trial only runs if the rollout worker is
    captured by the trial's group and the learner's group is the only other reservation."""
    base = {**RLVR_DEMO, "steps": 3, "warm_start_sft_steps": 10, "eval_every": 3, "eval_size": 8, "tensorboard": False,
            "resources": {"learner_num_cpus": 0.5}, "rollout": {**RLVR_DEMO["rollout"], "num_cpus_per_worker": 0.5}}
    spec = SweepSpec.model_validate({"base": base, "space": {"algorithm.kl_coef": {"values": [0.0]}},
                                     "metric": "eval/target_reward", "mode": "max", "output_dir": str(tmp_path)})
    seen = []

    def on_event(e):
        if e["type"] == "trial" and e["metrics"].get("step") == 1:
            total, avail = ray.cluster_resources(), ray.available_resources()  # zero entries are left out of avail
            groups = [k for k in total if re.fullmatch(r"CPU_group_[0-9a-f]+", k)]
            seen.append((avail.get("CPU", 0.0), sorted((total[k], avail.get(k, 0.0)) for k in groups)))

    t0 = time.perf_counter()
    result = run_sweep(spec, on_event=on_event)
    print(f"rl sweep: {time.perf_counter() - t0:.1f} s\n{result.table()}")
    assert [t.state for t in result.trials] == ["TERMINATED"] and result.trials[0].steps == 3
    assert result.best.value is not None and "reward/reward_mean" in result.trials[0].history[-1]
    cpu_free, groups = seen[0]
    # learner group, trial group: all CPUs held and in use
    assert cpu_free == 0.0 and groups == [(0.5, 0.0), (1.5, 0.0)]
    assert_cluster_free()


def test_an_invalid_combination_fails_only_its_trial(local_ray, tmp_path):
    # Every value is valid on its own (the schema checks each against the base), but layer-wise
    # selection with two_pass is not: that combination surfaces only as its trial runs.
    spec = SweepSpec.model_validate({
        "base": {**SFT_TOY, "steps": 2, "eval_every": 2, "regularizer": {"feasible_set": "global_subset"}},
        "space": {"regularizer.feasible_set": {"values": ["global_subset", "layerwise_subset"]},
                  "regularizer.passes": {"values": ["two_pass"]}},
        "metric": METRIC, "mode": "min", "output_dir": str(tmp_path),
    })
    events = []
    result = run_sweep(spec, on_event=events.append)
    by_set = {t.config["regularizer.feasible_set"]: t for t in result.trials}
    assert by_set["global_subset"].state == "TERMINATED" and result.best is by_set["global_subset"]
    assert by_set["layerwise_subset"].state == "ERROR" and "regularizer.passes" in by_set["layerwise_subset"].error
    assert any(e["type"] == "trial" and e["state"] == "ERROR" and "regularizer.passes" in e["error"] for e in events)
    assert_cluster_free()


def test_a_diverged_trial_is_summarised_by_the_guard_message():
    # what Tune writes for a trial whose run_job raised Diverged while handling another exception
    text = (
        "Failure # 1 (occurred at 2026-01-01_00-00-00)\nray::_DrptTrial.train() (pid=1, ip=127.0.0.1)\n"
        "ValueError: could not convert string to float: 'x'\n\n"
        "During handling of the above exception, another exception occurred:\n\n"
        '  File "drpt_ray/trainer.py", line 9, in run_job\n'
        "drpt_ray.trainer.Diverged: step 3: non-finite loss nan\n"
    )
    assert _error_summary(text) == "drpt_ray.trainer.Diverged: step 3: non-finite loss nan"


class _Ingest(http.server.BaseHTTPRequestHandler):
    """A stand-in control plane: `GET /v1/ingest/{id}` -> last_seq 0, `POST` stores the batch."""

    events: list = []
    auth: list = []

    def do_GET(self):
        self._reply({"last_seq": 0})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).events += body["events"]
        type(self).auth.append(self.headers.get("Authorization"))
        self._reply({"stored": len(body["events"]), "last_seq": body["events"][-1]["seq"]})

    def _reply(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_cli_reports_trial_events_to_the_control_plane(local_ray, tmp_path, monkeypatch, capsys):
    (tmp_path / "sweep.json").write_text(json.dumps({
        "base": {**SFT_TOY, "steps": 2, "eval_every": 2}, "space": {"regularizer.tau": {"values": [1.0]}},
        "metric": METRIC, "mode": "min", "output_dir": str(tmp_path / "out"),
    }))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ingest)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DRPT_INGEST_TOKEN", "tok")
    try:
        rc = tune_main(["--spec", str(tmp_path / "sweep.json"), "--sweep-id", "sw1",
                        "--report-url", f"http://127.0.0.1:{server.server_address[1]}"])
    finally:
        server.shutdown()
    assert rc == 0, capsys.readouterr().err
    ev = _Ingest.events
    assert [e["seq"] for e in ev] == list(range(1, len(ev) + 1)) and set(_Ingest.auth) == {"Bearer tok"}
    kinds = [(e["type"], e.get("state")) for e in ev if e["type"] != "log"]
    assert kinds[0] == ("state", "RUNNING") and kinds[-2:] == [("sweep", "TERMINATED"), ("state", "SUCCEEDED")]
    trial = [e for e in ev if e["type"] == "trial"]
    assert [e["state"] for e in trial] == ["RUNNING"] * 4 + ["TERMINATED"]  # start, steps 0-2, end
    assert trial[-1]["config"] == {"regularizer.tau": 1.0} and METRIC in trial[-1]["metrics"]
    assert ev[-1]["artifacts"]["curves"].endswith("sweep.png")
    IngestBatch.model_validate({"events": ev})  # every event the driver sent passes the control plane's validation
