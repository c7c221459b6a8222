"""Offline checks of the Kubernetes manifests in deploy/: YAML loading, a small kustomize renderer and
two validators.

* KubeRay kinds (`ray.io/*`) are checked against the `openAPIV3Schema` of KubeRay's own CRDs, read
  from $DRPT_KUBERAY_CRDS (default ../shared/kuberay-crds next to the repository; upstream
  artifacts, never copied into this repo; `bash scripts/fetch_kuberay_crds.sh` downloads them).
  The API server prunes unknown fields of a CR silently, so a misspelt field would vanish without
  error; to catch it, every schema object that lists `properties` (and neither its own
  `additionalProperties` nor `x-kubernetes-preserve-unknown-fields`) gets `additionalProperties:
  false`. CEL rules (`x-kubernetes-validations`) are not evaluated.
* Core kinds are checked with the `kubernetes-validate` package in strict mode (unknown fields
  fail). It has no schema for CRDs and would skip them with a warning, so a kind it does not know
  is an error here, never a pass.

The kustomize renderer implements exactly the features deploy/k8s uses, in kustomize's order:
`resources` (files and kustomization directories), then `patches` (JSON 6902 only, with a
`target` of group/version/kind/name/namespace), then `namespace`, then `images`. Any other
kustomization field, or a strategic-merge patch, raises instead of being rendered approximately.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"

KUBERAY_VERSION = "v1.7.0"
CRD_ENV = "DRPT_KUBERAY_CRDS"
CRD_DEFAULT = "../shared/kuberay-crds"
CRD_FETCH = "bash scripts/fetch_kuberay_crds.sh"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml",
             "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
# Kubernetes versions the core objects are validated against (kubernetes-validate ships 1.25-1.37).
K8S_VERSIONS = ("1.29", "1.37")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the 2.3 MB of CRDs parse in ~0.5 s


# ----------------------------------------------------------------------------------------------
# YAML


def load_docs(path: Path) -> list[dict]:
    """Every non-empty document of a YAML file."""
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under deploy/ (kustomization.yaml files are renderer input, not objects)."""
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


# ----------------------------------------------------------------------------------------------
# KubeRay CRD schemas


def crd_dir() -> Path:
    d = Path(os.environ.get(CRD_ENV, CRD_DEFAULT))
    return d if d.is_absolute() else (REPO / d).resolve()


def crds_missing() -> str | None:
    """None when the CRD files are present, else the reason to skip (naming version and fetch command)."""
    d = crd_dir()
    missing = [f for f in CRD_FILES.values() if not (d / f).is_file()]
    if not missing:
        return None
    return (
        f"KubeRay {KUBERAY_VERSION} CRDs not found in {d} (${CRD_ENV}, default {CRD_DEFAULT}): missing "
        f"{', '.join(missing)}; download them with `{CRD_FETCH}`"
    )


def strictify(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema in which objects with `properties` reject unknown fields, and
    `nullable: true` admits null (Draft 7 has no `nullable`)."""
    if isinstance(schema, list):
        return [strictify(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "properties" and isinstance(v, dict):  # a map of field names, each a schema
            out[k] = {name: strictify(sub) for name, sub in v.items()}
        elif k in ("enum", "default", "example", "required"):  # values, not schemas
            out[k] = v
        else:
            out[k] = strictify(v)
    if (isinstance(out.get("properties"), dict) and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=None)
def _raw_schema(kind: str, path: Path) -> dict:
    crd = yaml.load(path.read_text(), Loader=_Loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind, crd["metadata"]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@functools.lru_cache(maxsize=None)
def _strict_schema(kind: str, path: Path) -> dict:
    return strictify(_raw_schema(kind, path))


def crd_schema(kind: str, strict: bool = True) -> dict:
    """The `v1` openAPIV3Schema of a KubeRay kind, strictified unless `strict` is False; parsed and
    converted once per test session (per CRD file)."""
    path = crd_dir() / CRD_FILES[kind]
    return _strict_schema(kind, path) if strict else _raw_schema(kind, path)


def crd_validator(kind: str, strict: bool = True) -> jsonschema.Draft7Validator:
    return _validator(kind, crd_dir() / CRD_FILES[kind], strict)


@functools.lru_cache(maxsize=None)
def _validator(kind: str, path: Path, strict: bool) -> jsonschema.Draft7Validator:
    schema = crd_schema(kind, strict)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _fmt(e: jsonschema.ValidationError) -> str:
    return f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"


def crd_errors(doc: dict, strict: bool = True) -> list[str]:
    """Schema violations of a `ray.io/v1` object (its metadata is checked as core ObjectMeta)."""
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion {doc.get('apiVersion')!r}: only ray.io/v1 is validated"]
    if doc.get("kind") not in CRD_FILES:
        return [f"kind {doc.get('kind')!r}: no KubeRay CRD"]
    errors = [_fmt(e) for e in sorted(crd_validator(doc["kind"], strict).iter_errors(doc), key=str)]
    # The CRD types metadata as a bare object; validate it as the ObjectMeta of a core kind.
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}
    errors += [f"(ObjectMeta) {e}" for e in core_errors(meta)]
    return errors


# ----------------------------------------------------------------------------------------------
# core kinds: kubernetes-validate


def core_errors(doc: dict, versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    """Strict schema violations of a core object; a kind without a schema is an error (never skipped)."""
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError
    except ImportError as e:  # a test dependency: pyproject.toml [project.optional-dependencies] test
        raise AssertionError("kubernetes-validate is not installed: pip install -e '.[test]'") from e
    errors = []
    for v in versions:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except SchemaNotFoundError as e:
            errors.append(f"k8s {v}: {e.message} (kubernetes-validate skips such kinds; not validated)")
        except kubernetes_validate.ValidationError as e:
            errors.append(f"k8s {v}: {'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}")
    return errors


def validate(doc: dict) -> list[str]:
    """Errors of any manifest: KubeRay kinds against the CRDs, everything else with kubernetes-validate."""
    if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= doc.keys():
        return ["not a Kubernetes object (apiVersion, kind and metadata required)"]
    if doc["apiVersion"].split("/")[0] == "ray.io":
        return crd_errors(doc)
    return core_errors(doc)


# ----------------------------------------------------------------------------------------------
# kustomize (the subset deploy/k8s uses)

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass", "IngressClass"}


def kustomize_build(path: Path) -> list[dict]:
    """`kustomize build path` for the supported subset (see the module docstring)."""
    path = Path(path)
    kfile = path / "kustomization.yaml"
    k = yaml.load(kfile.read_text(), Loader=_Loader) or {}
    unknown = set(k) - KUSTOMIZATION_FIELDS
    if unknown:
        raise NotImplementedError(f"{kfile}: kustomization fields {sorted(unknown)} are not rendered by this helper")
    if (k.get("apiVersion"), k.get("kind")) != ("kustomize.config.k8s.io/v1beta1", "Kustomization"):
        raise ValueError(f"{kfile}: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    docs: list[dict] = []
    for ref in k.get("resources", []):
        target = (path / ref).resolve()
        if target.is_dir():
            docs += kustomize_build(target)
        elif target.is_file():
            docs += [copy.deepcopy(d) for d in load_docs(target)]
        else:
            raise FileNotFoundError(f"{kfile}: resource {ref!r} not found")
    ids = [_resid(d) for d in docs]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"{kfile}: duplicate resources {sorted(dup)}")
    for p in k.get("patches", []):
        _apply_patch(docs, p, path, kfile)
    if "namespace" in k:
        for d in docs:
            if d["kind"] == "Namespace":
                if d["metadata"]["name"] != k["namespace"]:
                    raise NotImplementedError(f"{kfile}: a Namespace other than `namespace:` ({d['metadata']['name']})")
            elif d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = k["namespace"]
    for img in k.get("images", []):
        if not set(img) <= {"name", "newName", "newTag", "digest"}:
            raise NotImplementedError(f"{kfile}: image fields {sorted(img)}")
        for d in docs:
            _set_images(d, img)
    return docs


def _resid(d: dict) -> tuple:
    return (d["apiVersion"].split("/")[0] if "/" in d["apiVersion"] else "",
            d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])


def _matches(d: dict, target: dict) -> bool:
    group, _, version = d["apiVersion"].rpartition("/")
    checks = {"group": group, "version": version, "kind": d["kind"], "name": d["metadata"]["name"],
              "namespace": d["metadata"].get("namespace", "")}
    unknown = set(target) - checks.keys()
    if unknown:
        raise NotImplementedError(f"patch target fields {sorted(unknown)}")
    # kustomize matches each given field as an anchored regular expression
    return all(re.fullmatch(str(v), checks[f]) for f, v in target.items())


def _apply_patch(docs: list[dict], p: dict, base: Path, kfile: Path) -> None:
    if not set(p) <= {"target", "patch", "path"} or "target" not in p or ("patch" in p) == ("path" in p):
        raise NotImplementedError(f"{kfile}: patch entries need `target` and one of `patch` / `path`: {p}")
    text = p["patch"] if "patch" in p else (base / p["path"]).read_text()
    ops = yaml.load(text, Loader=_Loader)
    if not isinstance(ops, list):
        raise NotImplementedError(f"{kfile}: strategic-merge patches are not rendered by this helper; use JSON 6902")
    hits = [d for d in docs if _matches(d, p["target"])]
    if not hits:
        raise ValueError(f"{kfile}: patch target {p['target']} matches no resource")
    for d in hits:
        for op in ops:
            json6902(d, op)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with '/'")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _walk(doc: Any, tokens: list[str], path: str) -> Any:
    for t in tokens:
        if isinstance(doc, list):
            if not t.isdigit() or int(t) >= len(doc):
                raise KeyError(f"{path}: no list item {t!r}")
            doc = doc[int(t)]
        elif isinstance(doc, dict):
            if t not in doc:
                raise KeyError(f"{path}: no key {t!r}")
            doc = doc[t]
        else:
            raise KeyError(f"{path}: {t!r} below a scalar")
    return doc


def json6902(doc: dict, op: dict) -> None:
    """Apply one RFC 6902 operation (add, remove, replace, test) in place; a missing path raises, as in kustomize."""
    kind, path = op.get("op"), op.get("path")
    tokens = _pointer(path)
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if kind == "test":
        if _walk(doc, tokens, path) != op["value"]:
            raise ValueError(f"{path}: test failed")
        return
    if kind not in ("add", "remove", "replace"):
        raise NotImplementedError(f"JSON patch op {kind!r}")
    if isinstance(parent, list):
        if kind == "add":
            idx = len(parent) if last == "-" else int(last)
            if not 0 <= idx <= len(parent):
                raise KeyError(f"{path}: index out of range")
            parent.insert(idx, copy.deepcopy(op["value"]))
            return
        _walk(parent, [last], path)  # must exist
        if kind == "remove":
            del parent[int(last)]
        else:
            parent[int(last)] = copy.deepcopy(op["value"])
        return
    if not isinstance(parent, dict):
        raise KeyError(f"{path}: parent is a scalar")
    if kind in ("remove", "replace") and last not in parent:
        raise KeyError(f"{path}: no key {last!r} to {kind}")
    if kind == "remove":
        del parent[last]
    else:
        parent[last] = copy.deepcopy(op["value"])


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry port is part of the name."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest or None


def _set_images(node: Any, img: dict) -> None:
    """kustomize's images transformer: every `image` of an item of any `containers` / `initContainers` list."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and isinstance(c.get("image"), str):
                        name, tag, digest = split_image(c["image"])
                        if name == img["name"]:
                            new = img.get("newName", name)
                            if img.get("digest"):
                                c["image"] = f"{new}@{img['digest']}"
                            else:
                                t = img.get("newTag", tag)
                                c["image"] = (new + (f":{t}" if t else "")
                                              + (f"@{digest}" if digest and "newTag" not in img else ""))
            _set_images(value, img)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, img)


# ----------------------------------------------------------------------------------------------
# small accessors used by the consistency tests


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(role, pod spec) of every pod an object starts: Deployment, RayCluster head/workers, RayJob's cluster."""
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [("pod", doc["spec"]["template"]["spec"])]
    if doc["kind"] == "RayCluster":
        cluster = doc["spec"]
    elif doc["kind"] == "RayJob":
        cluster = doc["spec"].get("rayClusterSpec")
        if cluster is None:
            return []
    else:
        return []
    out = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    out += [(f"worker:{g['groupName']}", g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    return out


def env_of(container: dict, docs: list[dict]) -> dict[str, str]:
    """A container's environment, with `envFrom` ConfigMaps and `valueFrom` refs resolved against `docs`
    (a secretKeyRef resolves to '<secret:NAME/KEY>', since a Secret need not be among the documents)."""
    env: dict[str, str] = {}
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            cm = by.get(("ConfigMap", src["configMapRef"]["name"]))
            assert cm is not None, f"envFrom ConfigMap {src['configMapRef']['name']} is not in the manifests"
            env.update(cm.get("data", {}))
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = f"<secret:{ref['name']}/{ref['key']}>"
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = by[("ConfigMap", ref["name"])]["data"][ref["key"]]
    return env
