"""Render a KubeRay `RayJob` from a JobSpec, so that a job defined for the API runs as a CR too.

    drpt-ray k8s render SPEC.yaml [--image IMAGE] [--name NAME] [--namespace NS] [-o out.yaml]

writes two documents: a ConfigMap holding the JobSpec (as `job.yaml`) and a `ray.io/v1` RayJob whose
entrypoint is `python -m drpt_ray.run --spec /etc/drpt/job.yaml --address auto` and whose own
RayCluster (deleted when the job finishes) is sized from the JobSpec:

* The driver runs on the head (`num-cpus: 0`, nothing else is scheduled there); one worker pod per
  Ray actor (each learner worker, each rollout worker, the RLHF reward model), every pod of the
  largest actor's shape (CPUs and GPUs rounded up), so Ray can place any actor on any free pod.
* SFT with one learner worker: the learner runs inside the driver, so the RayJob reserves the
  learner's resources for the entrypoint (`entrypointNumCpus/Gpus`, which moves the driver to a
  worker) and one worker pod of that shape hosts it.

Every Ray pod mounts the JobSpec at /etc/drpt and the shared run volume (the PersistentVolumeClaim
`drpt-runs` of deploy/k8s/base) at /data: the driver, the learner and the vLLM workers hand each
other the model directory through it, so `output_dir` (and a local `model.path`) must lie under
/data; a relative `output_dir` (a JobSpec written for the API) is placed under /data/runs/k8s/<name>/.
The same layout as deploy/k8s/jobs/rayjob-post-training.yaml; tests/test_deploy.py validates the
output against KubeRay's CRD schema.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from drpt_ray.config import JobSpec
from drpt_ray.topology import DRIVER_ENV, plan

# Must equal the Ray in the image: pyproject.toml pins ray[default,train,tune]==2.60.0 (tested).
RAY_VERSION = "2.60.0"
PROJECT = "drpt-ray"
SPEC_DIR = "/etc/drpt"
SPEC_FILE = "job.yaml"
DATA_DIR = "/data"
DATA_PVC = "drpt-runs"
RAY_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
DASHBOARD_AGENT_PORT = 52365  # serves /api/local_raylet_healthz on every Ray node
RAY_ENV = DRIVER_ENV | {"HF_HOME": f"{DATA_DIR}/hf-cache"}
# KubeRay's limit (MaxRayJobNameLength): the RayJob name plus a 6-character suffix names its RayCluster,
# whose longest Service name must stay within 63 characters. It must also be a DNS-1035 label.
MAX_NAME = 47
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def project_version() -> str:
    try:
        return metadata.version(PROJECT)
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0.1.0"


def needs_gpu(spec: JobSpec) -> bool:
    p = plan(spec)
    return any(b.gpus for b in [p.driver, *p.actors])


def default_image(spec: JobSpec) -> str:
    """`drpt-ray:<version>-gpu` when the job asks for GPUs, else the CPU image."""
    return f"{PROJECT}:{project_version()}-{'gpu' if needs_gpu(spec) else 'cpu'}"


def pod_shapes(spec: JobSpec) -> list[tuple[float, float]]:
    """(CPUs, GPUs) of each worker pod: one per process `plan(spec)` places (the driver's own when
    the learner trains inside it); learner workers placed STRICT_PACK must share a node, so they
    count as one combined pod."""
    p = plan(spec)
    if p.learner_in_driver:
        return [(p.driver.cpus, p.driver.gpus)]
    learner = [(b.cpus, b.gpus) for b in p.learner]
    if len(learner) > 1 and p.placement_strategy == "STRICT_PACK":
        learner = [(sum(c for c, _ in learner), sum(g for _, g in learner))]
    rest = [*p.rollout, *([p.reward_model] if p.reward_model else [])]
    return learner + [(b.cpus, b.gpus) for b in rest]


def default_name(spec: JobSpec) -> str:
    """A valid RayJob name from `spec.name` (lower-cased, other characters -> '-'), else `drpt-<mode>`."""
    name = re.sub(r"[^a-z0-9-]+", "-", (spec.name or "").lower()).strip("-")
    if name and not name[0].isalpha():
        name = f"drpt-{name}"
    return name[:MAX_NAME].rstrip("-") or f"drpt-{spec.mode}"


def _check_name(name: str) -> None:
    if len(name) > MAX_NAME or not _DNS_1035.match(name):
        raise ValueError(
            f"name {name!r}: a RayJob name must be lower-case letters, digits and '-', start with a letter, end "
            f"with a letter or digit, and be at most {MAX_NAME} characters"
        )


def _check_paths(spec: JobSpec) -> None:
    def under_data(p: str) -> bool:
        return p.startswith("/") and Path(os.path.normpath(p)).is_relative_to(DATA_DIR)

    if not under_data(spec.output_dir):
        raise ValueError(
            f"output_dir {spec.output_dir!r}: on Kubernetes it must be an absolute path under {DATA_DIR} (the shared "
            f"volume every Ray pod mounts), e.g. {DATA_DIR}/runs/{spec.name or 'job'}"
        )
    if spec.model.path and spec.model.path.startswith("/") and not under_data(spec.model.path):
        raise ValueError(f"model.path {spec.model.path!r}: a local model must lie under {DATA_DIR} to be "
                         "seen by every pod")


def _quantity(x: float) -> str:
    """Kubernetes quantity of a CPU or GPU count (whole units; Ray reads limits as integers)."""
    return str(max(1, math.ceil(x)))


def _resources(cpus: str, memory: str, gpus: int = 0, cpu_request: str | None = None) -> dict:
    limits: dict[str, str] = {"cpu": cpus, "memory": memory}
    requests: dict[str, str] = {"cpu": cpu_request or cpus, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = requests["nvidia.com/gpu"] = str(gpus)
    return {"requests": requests, "limits": limits}


def _probe(path: str, port: int, failure_threshold: int, initial_delay: int) -> dict:
    return {
        "httpGet": {"path": path, "port": port},
        "initialDelaySeconds": initial_delay,
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": failure_threshold,
    }


def _pod_template(*, container: str, image: str, resources: dict, configmap: str,
                  data_pvc: str, head: bool, component: str) -> dict:
    health = (("/api/gcs_healthz", RAY_PORTS["dashboard"]) if head
              else ("/api/local_raylet_healthz", DASHBOARD_AGENT_PORT))
    c: dict[str, Any] = {"name": container, "image": image}
    if head:
        c["ports"] = [{"containerPort": port, "name": name} for name, port in RAY_PORTS.items()]
    c["env"] = [{"name": k, "value": v} for k, v in RAY_ENV.items()]
    c["resources"] = resources
    c["readinessProbe"] = _probe(*health, failure_threshold=10, initial_delay=10)
    c["livenessProbe"] = _probe(*health, failure_threshold=120, initial_delay=30)
    c["volumeMounts"] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "runs", "mountPath": DATA_DIR},
        {"name": "job-spec", "mountPath": SPEC_DIR, "readOnly": True},
    ]
    pod: dict[str, Any] = {
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
        "containers": [c],
        "volumes": [
            # Ray's object store and vLLM use shared memory (a container's default /dev/shm is 64 MiB);
            # what is written there counts against the pod's memory limit.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "runs", "persistentVolumeClaim": {"claimName": data_pvc}},
            {"name": "job-spec", "configMap": {"name": configmap}},
        ],
    }
    if any("nvidia.com/gpu" in resources[k] for k in ("limits", "requests")):
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {"app.kubernetes.io/part-of": PROJECT, "app.kubernetes.io/component": component}},
            "spec": pod}


def _labels(name: str, component: str) -> dict:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": PROJECT}


def configmap_name(name: str) -> str:
    return f"{name}-spec"


def render_spec_configmap(spec: JobSpec, name: str, namespace: str = "drpt") -> dict:
    """The ConfigMap `<name>-spec` holding the JobSpec as `job.yaml` (only fields that differ from defaults)."""
    body = yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": configmap_name(name), "namespace": namespace, "labels": _labels(name, "job-spec")},
        "data": {SPEC_FILE: f"# JobSpec of the RayJob {name} (drpt_ray/config.py)\n{body}"},
    }


def render_rayjob(
    spec: JobSpec,
    image: str | None = None,
    name: str | None = None,
    namespace: str = "drpt",
    *,
    data_pvc: str = DATA_PVC,
    head_cpus: int = 2,
    head_memory: str = "8Gi",
    worker_memory: str | None = None,
    shutdown_after_job_finishes: bool = True,
    ttl_seconds_after_finished: int = 3600,
    active_deadline_seconds: int = 7 * 24 * 3600,
    backoff_limit: int = 1,
) -> dict:
    """A `ray.io/v1` RayJob that runs `spec` once on its own RayCluster (deleted `ttl_seconds_after_finished`
    after the job ends). The JobSpec itself lives in the ConfigMap of `render_spec_configmap(spec, name)`;
    apply both (`render` returns the pair).

    Args:
        spec: The job; its `resources` and `rollout` size the worker pods.
        image: Container image of every Ray pod (default `default_image(spec)`).
        name: RayJob name (default from `spec.name`, else `drpt-<mode>`).
        namespace: Namespace of the RayJob, its ConfigMap and the `data_pvc` claim.
        data_pvc: PersistentVolumeClaim mounted at /data in every Ray pod (shared between pods).
        head_cpus, head_memory: Head pod size (GCS, dashboard, the job driver).
        worker_memory: Memory per worker pod (default 32Gi per GPU, else 4Gi per CPU, at least 4Gi).
        backoff_limit: Retries of a failed job, each on a fresh cluster; with `checkpoint.every` > 0 and
            `checkpoint.resume: auto` a retry continues from the newest checkpoint under `output_dir`.

    Raises:
        ValueError: a name Kubernetes rejects, or `output_dir` / a local `model.path` outside /data.
    """
    name = name or default_name(spec)
    _check_name(name)
    _check_paths(spec)
    image = image or default_image(spec)
    topology = plan(spec)
    shapes = pod_shapes(spec)
    cpus = max(math.ceil(c) for c, _ in shapes)
    gpus = max(math.ceil(g) for _, g in shapes)
    memory = worker_memory or (f"{32 * gpus}Gi" if gpus else f"{max(4, 4 * cpus)}Gi")
    cm = configmap_name(name)
    head = {
        # `ray start --head` arguments (strings). num-cpus 0: actors and tasks go to the worker pods.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": _pod_template(
            container="ray-head", image=image, resources=_resources(str(head_cpus), head_memory),
            configmap=cm, data_pvc=data_pvc, head=True, component="ray-head",
        ),
    }
    worker_template = _pod_template(
        container="ray-worker", image=image, resources=_resources(_quantity(cpus), memory, gpus),
        configmap=cm, data_pvc=data_pvc, head=False, component="ray-worker",
    )
    n = len(shapes)
    rayjob_spec: dict[str, Any] = {
        "entrypoint": f"python -m drpt_ray.run --spec {SPEC_DIR}/{SPEC_FILE} --address auto",
    }
    if topology.learner_in_driver:  # reserve the learner's resources for the entrypoint (driver) itself
        rayjob_spec["entrypointNumCpus"] = topology.driver.cpus
        if topology.driver.gpus:
            rayjob_spec["entrypointNumGpus"] = topology.driver.gpus
    rayjob_spec |= {
        "shutdownAfterJobFinishes": shutdown_after_job_finishes,
        "ttlSecondsAfterFinished": ttl_seconds_after_finished,
        "activeDeadlineSeconds": active_deadline_seconds,
        "backoffLimit": backoff_limit,
        "rayClusterSpec": {
            "rayVersion": RAY_VERSION,
            "headGroupSpec": head,
            "workerGroupSpecs": [
                {
                    "groupName": "gpu" if gpus else "cpu",
                    "replicas": n,
                    "minReplicas": n,
                    "maxReplicas": n,
                    "rayStartParams": {},
                    "template": worker_template,
                }
            ],
        },
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace, "labels": _labels(name, "job")},
        "spec": rayjob_spec,
    }


def on_shared_volume(spec: JobSpec, name: str) -> JobSpec:
    """`spec` with a relative `output_dir` (such as the default `runs/job`) moved to
    /data/runs/k8s/<name>/<output_dir>, as the control plane puts it under its per-run directory."""
    if spec.output_dir.startswith("/"):
        return spec
    out = spec.model_copy(deep=True)
    out.output_dir = os.path.normpath(f"{DATA_DIR}/runs/k8s/{name}/{spec.output_dir}")
    return out


def render(spec: JobSpec, image: str | None = None, name: str | None = None,
           namespace: str = "drpt", **kwargs) -> list[dict]:
    """[ConfigMap with the JobSpec, RayJob]: everything `kubectl apply -f` needs besides the `drpt-runs`
    claim. A relative `output_dir` moves to the shared volume (`on_shared_volume`)."""
    name = name or default_name(spec)
    spec = on_shared_volume(spec, name)
    return [render_spec_configmap(spec, name, namespace), render_rayjob(spec, image, name, namespace, **kwargs)]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the JobSpec in the ConfigMap) as `|` blocks, so the output reads like YAML."""


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def dump(docs: list[dict]) -> str:
    """Documents as one multi-document YAML string (what `kubectl apply -f` takes)."""
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False) for d in docs)


# ----------------------------------------------------------------------------------------------
# CLI


def _render_cmd(args: argparse.Namespace) -> int:
    from drpt_ray.config import load_spec

    spec = load_spec(args.spec, JobSpec)
    if args.output_dir:
        spec.output_dir = args.output_dir
    text = dump(
        render(spec, image=args.image, name=args.name, namespace=args.namespace, backoff_limit=args.backoff_limit,
               active_deadline_seconds=args.active_deadline_seconds,
               ttl_seconds_after_finished=args.ttl_seconds_after_finished)
    )
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}: kubectl apply -n {args.namespace} -f {args.output}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `k8s render` to the `drpt-ray` command line (`subparsers` of `drpt_ray.cli.build_parser`)."""
    k = subparsers.add_parser("k8s", help="Kubernetes (KubeRay) manifests for a JobSpec")
    ksub = k.add_subparsers(dest="k8s_command", required=True)
    r = ksub.add_parser(
        "render", help="write a RayJob (and the ConfigMap with the JobSpec) that runs SPEC.yaml on KubeRay",
        description="Render a KubeRay RayJob for a JobSpec: `kubectl apply -f` the output in a namespace that has the "
        f"`{DATA_PVC}` claim (deploy/k8s/base).",
    )
    r.add_argument("spec", help="YAML file with a JobSpec")
    r.add_argument("--image", help="container image (default drpt-ray:<version>-gpu if the job uses GPUs, else -cpu)")
    r.add_argument("--name", help="RayJob name (default from the spec's name)")
    r.add_argument("--namespace", default="drpt", help="namespace (default drpt)")
    r.add_argument("--output-dir",
                   help=f"override output_dir (under {DATA_DIR}; a relative one goes to {DATA_DIR}/runs/k8s/NAME/)")
    r.add_argument("--backoff-limit", type=int, default=1, help="retries of a failed job, each on a fresh cluster")
    r.add_argument("--active-deadline-seconds", type=int, default=7 * 24 * 3600, help="give up after this long")
    r.add_argument("--ttl-seconds-after-finished", type=int, default=3600,
                   help="delete the cluster this long after the end")
    r.add_argument("-o", "--output", help="output file (default stdout)")
    r.set_defaults(func=_render_cmd)
