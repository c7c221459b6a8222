"""Admission: what a submitted job or sweep may ask of the cluster, checked before it is recorded.

Every refusal is one 422 listing each offending body field (FastAPI's validation-error shape), so a
client sees every problem at once. Nothing here imports or reads what a request names: code is
judged by its `module:function` name, paths by the filesystem's answer for the resolved path.

* where a run writes: its own directory (`refuse_escaping_paths`);
* what code it runs: the operator's allow-list (`refuse_unallowed_code`);
* what it reads: model, data, reward-model and checkpoint.resume paths (PATH_FIELDS) must resolve
  (symlinks followed) to an existing path under DRPT_READ_ROOTS and outside DRPT_RUNS_DIR (no job
  reads another's run directory); a missing path and a forbidden one get the same answer, so a
  refusal says nothing about the host;
* what it ships: a job's working directory (a zip, `admit_job(..., working_dir=)`) only where the
  operator allows it (DRPT_WORKING_DIR_MAX_BYTES > 0), at most that many bytes unpacked, entries
  relative and without '..'. The job runs in it, so its relative read paths must name a file or a
  directory in the zip (the 422 names the path they resolve to there); absolute ones follow the
  read-root rule above. Code in it is still user code: the allow-list above judges every
  `module:function` the spec names, whichever directory the module comes from;
* what it reserves: the CPUs and GPUs of its topology plan (drpt_ray.topology.plan, the driver
  included) against DRPT_MAX_RUN_CPUS / DRPT_MAX_RUN_GPUS, the KV cache over its rollout workers
  against DRPT_MAX_KV_CACHE_GIB, its batch sizes against DRPT_MAX_BATCH_SIZE; a sweep is judged by
  its largest trial and its trial count (computed, never enumerated) against DRPT_MAX_SWEEP_TRIALS.
  With DRPT_CLUSTER_CAPACITY (on by default) a job is also refused when it needs more CPUs or GPUs
  than the Ray cluster's alive nodes hold in all (the launcher asks Ray, cached for seconds; when
  Ray cannot answer, only the operator's limits apply): a trial that could never be placed is
  refused here, not left to time out on Ray.
"""

from __future__ import annotations

import io
import os
import posixpath
import zipfile
from pathlib import Path, PurePosixPath

from fastapi.exceptions import RequestValidationError

from drpt_ray.config import PATH_FIELDS, JobSpec, SweepSpec, get_path, names_path, set_path
from drpt_ray.topology import plan
from services.control_plane.launcher import Launcher
from services.control_plane.security import refuse_escaping_paths, refuse_unallowed_code
from services.control_plane.settings import Settings

# The numeric JobSpec fields that size what a job reserves: a sweep searching one is judged by its largest value.
RESOURCE_FIELDS = ("resources.", "rollout.num_workers", "rollout.num_cpus_per_worker", "rollout.num_gpus_per_worker",
                   "rollout.kv_cache_gib", "batch_size", "target_batch_size")

Error = dict


def admit_job(spec: JobSpec, settings: Settings, launcher: Launcher, working_dir: bytes | None = None) -> None:
    """422 naming every field of `spec` this server does not accept (see the module docstring). With
    `working_dir` (the zip of POST /v1/jobs/with-working-dir) the spec's fields are under `spec`."""
    at = () if working_dir is None else ("spec",)
    refuse_escaping_paths({(*at, "output_dir"): spec.output_dir})
    refuse_unallowed_code({(*at, *loc): v for loc, v in spec.user_code().items()}, settings.user_code,
                          settings.user_code_modules)
    paths = {(*at, *loc): p for loc, p in _read_paths(spec).items()}
    errors: list[Error] = []
    if working_dir is not None:  # the job runs in it: relative paths are read from it, absolute ones as without
        files = _shipped_files(working_dir, settings.working_dir_max_bytes)
        relative = {loc: p for loc, p in paths.items() if not Path(p).expanduser().is_absolute()}
        errors += _not_shipped(relative, files)
        paths = {loc: p for loc, p in paths.items() if loc not in relative}
    errors += _unreadable(paths, settings)
    _raise(errors + _oversized(spec, at, settings, _capacity(settings, launcher)))


def admit_sweep(spec: SweepSpec, settings: Settings, launcher: Launcher) -> None:
    """`admit_job` for every trial a sweep could run, and the sweep's size."""
    refuse_escaping_paths({("output_dir",): spec.output_dir, ("base", "output_dir"): spec.base.output_dir})
    refuse_unallowed_code(spec.user_code(), settings.user_code, settings.user_code_modules)
    errors: list[Error] = []
    # counted, never enumerated: 1000^3 grid points cost nothing here
    if spec.trial_count() > settings.max_sweep_trials:
        errors.append(_error(("space",), None, f"the sweep would run {spec.trial_count()} trials; this server allows "
                                               f"at most {settings.max_sweep_trials} (DRPT_MAX_SWEEP_TRIALS)"))
    paths = {("base", *loc): p for loc, p in _read_paths(spec.base).items()}
    for field, dim in spec.space.items():
        if (loc := tuple(field.split("."))) in PATH_FIELDS:
            paths |= {("space", field, "values", i): v for i, v in enumerate(dim.values or []) if names_path(loc, v)}
    errors += _unreadable(paths, settings)
    errors += _oversized(_largest_trial(spec), ("base",), settings, _capacity(settings, launcher))
    _raise(errors)


def _capacity(settings: Settings, launcher: Launcher) -> dict[str, float] | None:
    return launcher.capacity() if settings.cluster_capacity else None


def _read_paths(spec: JobSpec) -> dict[tuple, str]:
    body = spec.model_dump()
    return {loc: v for loc in PATH_FIELDS if names_path(loc, v := get_path(body, ".".join(loc)))}


def _unreadable(paths: dict[tuple, str], settings: Settings) -> list[Error]:
    """An error for every path a server job may not read: not an existing path under a read root
    once resolved, or inside the runs directory. One message for all, whatever the reason."""
    roots, runs = settings.read_roots, Path(os.path.realpath(settings.runs_dir))

    def readable(path: str) -> bool:
        p = Path(path).expanduser()
        if not p.is_absolute():
            return False  # relative to what? the run directory, which holds nothing to read at the start
        try:
            real = Path(os.path.realpath(p))
            # under a root first: nothing outside the roots is ever looked at
            return any(real.is_relative_to(r) for r in roots) and not real.is_relative_to(runs) and real.exists()
        except OSError:  # unreadable along the way (/proc/1/root, a loop of links): the same answer
            return False

    why = (f"not readable by server jobs: name an existing absolute path under the operator's read roots "
           f"(DRPT_READ_ROOTS: {[str(r) for r in roots] or 'none configured'}), outside the runs directory")
    return [_error(loc, path, why) for loc, path in paths.items() if not readable(path)]


def _shipped_files(data: bytes, max_bytes: int) -> set[str]:
    """Every path in a working-directory zip: its files and the directories above them. 422 at
    `working_dir` when the operator allows none, or it is no zip, or an entry is absolute or climbs
    out with '..', or its files take more than `max_bytes` unpacked (the declared sizes: an entry
    never unpacks to more than it declares, so they bound what lands on the cluster's disks)."""
    loc = ("working_dir",)
    if max_bytes == 0:
        _raise([_error(loc, None, "this server does not take a job's working directory: the operator allows it by "
                                  "setting DRPT_WORKING_DIR_MAX_BYTES (0 here); submit without --working-dir and "
                                  "read data from the read roots")])
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            entries = z.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError):  # what zipfile raises on bad bytes
        _raise([_error(loc, None, "not a zip archive")])
    names = [PurePosixPath(e.filename) for e in entries]
    unsafe = [str(n) for n in names if n.is_absolute() or ".." in n.parts or "\\" in str(n)]
    if unsafe:
        _raise([_error(loc, None, f"entries must be relative paths without '..': {unsafe[:5]}")])
    size = sum(e.file_size for e in entries)
    if size > max_bytes:
        _raise([_error(loc, None, f"its files take {size} bytes unpacked; this server allows {max_bytes} "
                                  "(DRPT_WORKING_DIR_MAX_BYTES)")])
    return {str(p) for n in names for p in (n, *n.parents) if str(p) != "."}


def _not_shipped(paths: dict[tuple, str], files: set[str]) -> list[Error]:
    """An error for every relative read path of a job with a working directory that names nothing in
    it: the job runs there, so that is where the path resolves."""
    errors = []
    for loc, path in paths.items():
        resolved = posixpath.normpath(path)  # keeps a leading '..', which no entry has
        if resolved not in files:
            errors.append(_error(loc, path, f"a relative path resolves inside the job's working directory, to "
                                            f"<working dir>/{resolved}, and the shipped working directory holds "
                                            "no such file or directory"))
    return errors


def _largest_trial(spec: SweepSpec) -> JobSpec:
    """The base spec with every searched sizing field at its largest value: an upper bound on what
    any one trial reserves (each such field only ever adds resources as it grows)."""
    body = spec.base.model_dump()
    for field, dim in spec.space.items():
        if field.startswith(RESOURCE_FIELDS):
            numbers = [v for v in dim.probes(get_path(body, field))
                       if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if numbers:  # (a range's probes are its ends)
                body = set_path(body, field, max(numbers))
    return JobSpec.model_validate(body)


def _oversized(spec: JobSpec, prefix: tuple, settings: Settings, capacity: dict[str, float] | None) -> list[Error]:
    """An error for every limit `spec` exceeds, naming the field, the demand and the limit."""
    errors = []
    p = plan(spec)
    demand = p.total()
    for key, limit, name in (("CPU", settings.max_run_cpus, "DRPT_MAX_RUN_CPUS"),
                             ("GPU", settings.max_run_gpus, "DRPT_MAX_RUN_GPUS")):
        need = demand.get(key, 0.0)
        if limit is not None and need > limit:
            why = f"this server allows {limit:g} per job ({name})"
        elif capacity is not None and need > capacity.get(key, 0.0):
            why = f"the Ray cluster's alive nodes hold {capacity.get(key, 0.0):g} in all, so it could never start"
        else:
            continue
        errors.append(_error(prefix + ("resources",), None,
                             f"the job reserves {need:g} {key}s in all (driver {_each([p.driver], key)}, learner "
                             f"{len(p.learner)} x {_each(p.learner, key)}, rollout {len(p.rollout)} x "
                             f"{_each(p.rollout, key)}: resources.* and rollout.num_workers / num_*_per_worker); "
                             f"{why}"))
    if spec.mode != "sft":
        kv = spec.rollout.kv_cache_gib * spec.rollout.num_workers
        if kv > settings.max_kv_cache_gib:
            errors.append(_error(prefix + ("rollout", "kv_cache_gib"), spec.rollout.kv_cache_gib,
                                 f"{spec.rollout.num_workers} rollout worker(s) x {spec.rollout.kv_cache_gib} GiB = "
                                 f"{kv} GiB of KV cache; this server allows {settings.max_kv_cache_gib:g} GiB per job "
                                 "(DRPT_MAX_KV_CACHE_GIB)"))
    for field in ("batch_size", "target_batch_size"):
        if getattr(spec, field) > settings.max_batch_size:
            errors.append(_error(prefix + (field,), getattr(spec, field),
                                 f"{getattr(spec, field)} is above this server's limit {settings.max_batch_size} "
                                 "(DRPT_MAX_BATCH_SIZE)"))
    return errors


def _each(bundles, key: str) -> str:
    return f"{bundles[0].resources().get(key, 0.0):g}" if bundles else "0"


def _error(loc: tuple, value, msg: str) -> Error:
    return {"loc": ("body", *loc), "type": "value_error", "input": value, "msg": msg}


def _raise(errors: list[Error]) -> None:
    if errors:
        raise RequestValidationError(errors)
