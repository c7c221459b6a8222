"""What a shared server lets a token holder do (issue 22), on a real uvicorn server (dry-run
launcher), on SQLite and Postgres: a job runs only code the operator allowed and the API process
never imports what a request names; sweeps are sized without enumeration; bodies are strict JSON.

The probe module writes a marker file when it is imported; it sits on the server's PYTHONPATH, so
any import of it by the API process (validation, a registry lookup, an allow-list check) leaves the
marker behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.control_plane.conftest import ROOT, TOKEN, ingest_headers

RL = {"mode": "rlvr", "steps": 2, "progress": False}
USER_CODE = [  # each field that takes a 'module:function', with the probe and with installed stdlib callables
    ({"algorithm": {"advantage": "drpt_probe_sidefx:estimator"}}, "body.algorithm.advantage"),
    ({"algorithm": {"advantage": "os:system"}}, "body.algorithm.advantage"),
    ({"algorithm": {"policy_loss": "builtins:exec"}}, "body.algorithm.policy_loss"),
    ({"algorithm": {"kl_estimator": "os:system"}}, "body.algorithm.kl_estimator"),
    ({"algorithm": {"target_objective": "builtins:print"}}, "body.algorithm.target_objective"),
    ({"reward": {"kind": "function", "function": "shutil:move"}}, "body.reward.function"),
    ({"reward": {"kind": "function", "functions": [{"function": "os:system", "weight": 2.0}]}},
     "body.reward.functions.0.function"),
]


@pytest.fixture
def probe_dir(tmp_path: Path) -> Path:
    d = tmp_path / "probe"
    d.mkdir()
    marker = d / "IMPORTED"
    (d / "drpt_probe_sidefx.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n\n"
        "def estimator(inputs):\n    raise AssertionError('never called here')\n"
    )
    return d


def _paths(probe_dir: Path) -> str:
    return os.pathsep.join([str(ROOT), str(probe_dir)])


@pytest.mark.parametrize("body,field", USER_CODE)
def test_user_code_is_refused_by_default_and_nothing_is_imported(server_factory, probe_dir, body, field):
    s = server_factory(DRPT_LAUNCHER="dry-run", PYTHONPATH=_paths(probe_dir))
    with s.http() as c:
        r = c.post("/v1/jobs", json=RL | body)
        assert r.status_code == 422, r.text
        assert [".".join(map(str, d["loc"])) for d in r.json()["detail"]] == [field]
        assert "DRPT_USER_CODE is off" in r.json()["message"]
        sweep = c.post("/v1/sweeps",
                       json={"base": RL,
                             "space": {"algorithm.advantage": {"values": ["grpo", "drpt_probe_sidefx:estimator"]}}})
        assert sweep.status_code == 422, sweep.text
        assert [".".join(map(str, d["loc"]))
                for d in sweep.json()["detail"]] == ["body.space.algorithm.advantage.values.1"]
        assert c.get("/v1/jobs").json()["total"] == 0 and c.get("/v1/sweeps").json()["total"] == 0  # nothing recorded
    assert not (probe_dir / "IMPORTED").exists()


def test_allowed_modules_only_and_still_no_import(server_factory, probe_dir):
    s = server_factory(DRPT_LAUNCHER="dry-run", PYTHONPATH=_paths(probe_dir),
                       DRPT_USER_CODE="true", DRPT_USER_CODE_MODULES="drpt_probe_sidefx,mycompany.rl")
    with s.http() as c:
        ok = c.post("/v1/jobs", json=RL | {"algorithm": {"advantage": "drpt_probe_sidefx:estimator"}})
        assert ok.status_code == 201, ok.text
        for body, field in USER_CODE[1:]:
            r = c.post("/v1/jobs", json=RL | body)
            assert r.status_code == 422 and field in r.text and "DRPT_USER_CODE_MODULES" in r.text, r.text
        # each of several reward functions is checked: only the one outside the allow-list is refused
        several = {"kind": "function", "functions": [{"function": "drpt_probe_sidefx:estimator"},
                                                     {"function": "shutil:move", "name": "other"}]}
        r = c.post("/v1/jobs", json=RL | {"reward": several})
        assert r.status_code == 422, r.text
        assert [".".join(map(str, d["loc"])) for d in r.json()["detail"]] == ["body.reward.functions.1.function"]
        # a prefix allows its submodules, not a module that merely starts with the same letters
        assert c.post("/v1/jobs", json=RL | {"algorithm": {"advantage": "mycompany.rl.adv:f"}}).status_code == 201
        assert c.post("/v1/jobs", json=RL | {"algorithm": {"advantage": "mycompany.rlx:f"}}).status_code == 422
        # not a module path
        assert c.post("/v1/jobs", json=RL | {"algorithm": {"advantage": "os;rm:x"}}).status_code == 422
    assert not (probe_dir / "IMPORTED").exists()


def test_a_resume_path_is_a_read_path(server_factory, tmp_path):
    """`checkpoint.resume` naming a checkpoint is read like model.path: only under the operator's read
    roots and outside the runs directory (no job resumes another's run); its words are no path.
    (Every read-root case is in tests/control_plane/test_tenants.py; this is the field's own check.)"""
    root, outside = tmp_path / "shared", tmp_path / "private"
    ckpt = root / "ckpts" / "step_0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer.json").write_text("{}")
    (outside / "step_0000002").mkdir(parents=True)
    other_run = root / "runs" / "job_0000000000000001" / "checkpoints" / "step_0000002"
    other_run.mkdir(parents=True)
    s = server_factory(DRPT_LAUNCHER="dry-run", DRPT_READ_ROOTS=str(root), DRPT_RUNS_DIR=str(root / "runs"))
    sft = {"mode": "sft", "steps": 2, "progress": False}
    with s.http() as c:
        for resume in (str(ckpt), "auto", "never", True, False):
            r = c.post("/v1/jobs", json=sft | {"checkpoint": {"resume": resume}})
            assert r.status_code == 201, (resume, r.text)
        for resume in ("/etc", str(outside / "step_0000002"), str(other_run), "ckpts/step_0000002"):
            r = c.post("/v1/jobs", json=sft | {"checkpoint": {"resume": resume}})
            assert r.status_code == 422, (resume, r.text)
            assert [".".join(map(str, d["loc"])) for d in r.json()["detail"]] == ["body.checkpoint.resume"]
            assert "DRPT_READ_ROOTS" in r.json()["detail"][0]["msg"]
        sweep = c.post("/v1/sweeps", json={"base": sft, "space": {"checkpoint.resume": {
            "values": [str(ckpt), "never", "/etc"]}}})
        assert sweep.status_code == 422, sweep.text
        assert ([".".join(map(str, d["loc"])) for d in sweep.json()["detail"]]
                == ["body.space.checkpoint.resume.values.2"])


def test_a_local_ray_starts_without_the_control_planes_secrets(monkeypatch):
    """`drpt-ray serve` starts its local Ray with `ray_env()`: every job driver inherits that
    environment, so no API token, ingest secret or database URL may be in it (issue 22, item 2).
    (Checked on the function; a real driver's environment under `drpt-ray serve` is not yet tested.)"""
    from drpt_ray.local_ray import ray_env

    monkeypatch.setenv("DRPT_API_TOKENS", "secret-api-token-0123456789")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:pw@h/db")
    monkeypatch.setenv("DRPT_INGEST_SECRET", "s" * 32)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    env = ray_env()
    assert not {"DRPT_API_TOKENS", "DATABASE_URL", "DRPT_INGEST_SECRET"} & set(env)
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["PATH"] == os.environ["PATH"]  # the rest passes through


def test_a_sweep_is_sized_without_enumerating_it_and_bounded(server_factory):
    """10^9 grid points are refused at once by the schema (drpt_ray.config.MAX_SWEEP_TRIALS), a smaller sweep
    above the server's DRPT_MAX_SWEEP_TRIALS by the server (issue 22, item 5: counted, never enumerated)."""
    import time

    s = server_factory(DRPT_LAUNCHER="dry-run", DRPT_MAX_SWEEP_TRIALS="8")
    values = {"values": [float(i) / 1000 + 0.001 for i in range(1000)]}
    huge = {"base": RL, "space": {"optim.lr": values, "regularizer.tau": values, "algorithm.kl_coef": values}}
    with s.http() as c:
        t = time.perf_counter()
        r = c.post("/v1/sweeps", json=huge)
        assert r.status_code == 422 and "1000000000 trials" in r.text and "at most 100000" in r.text, r.text
        # counted, never enumerated (10^9 points would take hours): a bound, not a benchmark
        assert time.perf_counter() - t < 10
        mid = {"base": RL, "space": {"optim.lr": {"values": values["values"][:100]},
                                     "regularizer.tau": {"values": values["values"][:100]}}}
        r = c.post("/v1/sweeps", json=mid)  # 10^4 trials: a valid sweep, but above this server's limit
        assert r.status_code == 422 and "10000 trials" in r.text and "DRPT_MAX_SWEEP_TRIALS" in r.text, r.text
        small = {"base": RL, "space": {"optim.lr": {"values": [1e-3, 2e-3]}}, "num_samples": 4}
        assert c.post("/v1/sweeps", json=small).status_code == 201  # 2 x 4 = 8 trials: at the limit
        assert c.post("/v1/sweeps", json=small | {"num_samples": 5}).status_code == 422


@pytest.mark.parametrize("raw,why", [
    (b'{"mode": "sft", "steps": 10, "steps": 10000}', "duplicate key 'steps'"),
    (b'{"mode": "sft", "regularizer": {"frac": 0.5, "frac": 1.0}}', "duplicate key 'frac'"),
    ('{"mode": "sft", "steps": 10}'.encode("utf-16"), "UTF-8"),
    ('{"mode": "sft", "steps": 10}'.encode("utf-32"), "UTF-8"),
])
def test_bodies_are_utf8_json_with_each_key_once(server_factory, raw, why):
    s = server_factory(DRPT_LAUNCHER="dry-run")
    with s.http() as c:
        r = c.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and why in r.json()["message"], r.text
        assert c.post("/v1/sweeps", content=raw, headers={"Content-Type": "application/json"}).status_code == 422
        assert c.get("/v1/jobs").json()["total"] == 0
        assert c.post("/v1/jobs", content=b'{"mode": "sft", "steps": 10}',
                      headers={"Content-Type": "application/json"}).status_code == 201


def test_nul_in_text_or_ids_is_a_4xx_on_both_databases(server_factory):
    """Postgres refuses a NUL in text with an error (it was a 500 there): a body field with one is a
    422 naming it, an id path with one a 404, like any id the server never made."""
    s = server_factory(DRPT_LAUNCHER="dry-run")
    with s.http() as c:
        for body, field in (({"name": "a\u0000b"}, "body.name"),
                            ({"regularizer": {"exclude": ["mlp\u0000"]}}, "body.regularizer.exclude")):
            r = c.post("/v1/jobs", json={"mode": "sft"} | body)
            assert (r.status_code == 422
                    and [".".join(map(str, d["loc"])) for d in r.json()["detail"]] == [field]), r.text
        for path in ("/v1/jobs/job_%00", "/v1/jobs/job_%00/metrics",
                     "/v1/sweeps/swp_%00", "/v1/jobs/job_0123456789abcdeg"):
            assert c.get(path).status_code == 404, path
        # with that id's own ingest token
        assert c.get("/v1/ingest/job_%00", headers=ingest_headers("job_\x00")).status_code == 404
        assert c.post("/v1/jobs/job_%00/cancel").status_code == 404


def test_the_ui_redirect_is_relative_whatever_the_host_header(server_factory):
    s = server_factory(DRPT_LAUNCHER="dry-run")
    with s.http() as c:
        r = c.get("/ui", headers={"Host": "evil.example"}, follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/ui/"
        assert c.get("/ui/").status_code == 200


# ----------------------------------------------------------------------------------------------
# a job's working directory (issue 26, item 2)

FILES_JOB = RL | {"data": {"task": None, "general_path": "data/general.jsonl", "target_path": "data/target.jsonl"},
                  "reward": {"kind": "function", "function": "shipped_reward:score"}}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's directory: a reward module, two data files, and what is never shipped."""
    d = tmp_path / "project"
    (d / "data").mkdir(parents=True)
    (d / "shipped_reward.py").write_text("def score(prompt, response, reference):\n    return 1.0\n")
    for name in ("general", "target"):
        (d / "data" / f"{name}.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    for skipped in ("__pycache__/shipped_reward.cpython-311.pyc", ".git/config"):
        (d / skipped).parent.mkdir()
        (d / skipped).write_text("not shipped")
    return d


def test_a_working_dir_is_refused_unless_the_operator_allows_it(server_factory, project, capsys):
    import json

    from drpt_ray import cli

    s = server_factory(DRPT_LAUNCHER="dry-run", DRPT_USER_CODE="true", DRPT_USER_CODE_MODULES="shipped_reward")
    spec = project.parent / "job.yaml"
    spec.write_text(json.dumps(FILES_JOB))  # JSON is YAML
    assert cli.main(["submit", str(spec), "--working-dir", str(project), "--url", s.url, "--token", TOKEN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drpt-ray: error: POST /v1/jobs/with-working-dir: HTTP 422: body.working_dir:"), err
    assert "allows it by setting DRPT_WORKING_DIR_MAX_BYTES" in err
    assert s.client().jobs().total == 0


def test_a_working_dir_is_checked_at_submission_and_kept_in_the_run_directory(server_factory, project):
    import zipfile

    from drpt_ray.client import ApiError

    s = server_factory(DRPT_LAUNCHER="dry-run", DRPT_WORKING_DIR_MAX_BYTES="4096", DRPT_USER_CODE="true",
                       DRPT_USER_CODE_MODULES="shipped_reward")
    client = s.client()
    # a relative data path names a file of the working directory: the error names where it resolves
    missing = FILES_JOB | {"data": FILES_JOB["data"] | {"target_path": "./data/../data/missing.jsonl",
                                                        "eval_path": "../project/data/target.jsonl"}}
    with pytest.raises(ApiError) as e:
        client.submit(missing, working_dir=project)
    assert e.value.paths == ["body.spec.data.target_path", "body.spec.data.eval_path"], e.value
    assert "<working dir>/data/missing.jsonl" in e.value.fields[0].msg
    assert "<working dir>/../project/data/target.jsonl" in e.value.fields[1].msg
    # shipped code is still user code: the operator's allow-list judges the module
    with pytest.raises(ApiError) as e:
        client.submit(FILES_JOB | {"reward": {"kind": "function", "function": "other:score"}}, working_dir=project)
    assert e.value.paths == ["body.spec.reward.function"] and "DRPT_USER_CODE_MODULES" in e.value.message

    job = client.submit(FILES_JOB, working_dir=project, idempotency_key="wd-1")
    with zipfile.ZipFile(s.workdir / "runs" / job.id / "working_dir.zip") as z:
        assert sorted(z.namelist()) == ["data/general.jsonl", "data/target.jsonl", "shipped_reward.py"]
    assert client.submit(FILES_JOB, working_dir=project, idempotency_key="wd-1").id == job.id  # a retry
    (project / "shipped_reward.py").write_text("def score(prompt, response, reference):\n    return 0.0\n")
    with pytest.raises(ApiError) as e:  # the same key and spec with other code is another request
        client.submit(FILES_JOB, working_dir=project, idempotency_key="wd-1")
    assert e.value.paths == ["header.Idempotency-Key"], e.value

    (project / "data" / "big.jsonl").write_text("x" * 4000)  # 4,000 + the rest > 4,096 bytes unpacked
    with pytest.raises(ApiError) as e:
        client.submit(FILES_JOB, working_dir=project)
    assert e.value.paths == ["body.working_dir"] and "allows 4096 (DRPT_WORKING_DIR_MAX_BYTES)" in e.value.message
    assert client.jobs().total == 1


def test_a_shipped_job_runs_in_its_working_dir_and_writes_to_its_run_dir(tmp_path):
    """What the Ray Jobs API gets for a job with a working directory and for one without."""
    from services.control_plane.launcher import ray_job
    from services.control_plane.settings import Settings

    settings = Settings(api_tokens=[TOKEN], runs_dir=tmp_path / "runs")
    spec = {"mode": "sft", "output_dir": "runs/job"}
    plain = ray_job(settings, "job_a", "job", spec, "token")
    run_dir = settings.runs_dir / "job_b"
    run_dir.mkdir(parents=True)
    (run_dir / "working_dir.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    shipped = ray_job(settings, "job_b", "job", spec, "token")
    assert "working_dir" not in plain["runtime_env"] and f"cd {settings.runs_dir / 'job_a'} &&" in plain["entrypoint"]
    assert shipped["runtime_env"]["working_dir"] == str(run_dir / "working_dir.zip")
    assert " cd " not in shipped["entrypoint"]  # Ray starts the driver in its copy of the working dir: it stays
    assert shipped["entrypoint"].endswith(f"--output-dir {run_dir / 'runs/job'}")
