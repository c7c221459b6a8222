"""Control-plane settings, read from the environment once (pydantic-settings).

| env var | meaning (default) |
|---|---|
| `DRPT_API_TOKENS` | comma-separated bearer tokens accepted on every route but `/healthz` (required, each >= 16 chars); `tenant:token` gives the token's tenant (a bare token: tenant `default`) |
| `DRPT_ADMIN_TENANTS` | tenants whose tokens see and cancel every tenant's runs (none) |
| `DRPT_MAX_RUNNING_PER_TENANT` | a tenant's runs on Ray at once; its other runs wait QUEUED while other tenants' start (no limit) |
| `DRPT_READ_ROOTS` | comma-separated directories server jobs may read models and data from (none: no host path) |
| `DRPT_WORKING_DIR_MAX_BYTES` | most bytes (unpacked) of the working directory a job may ship with it (`drpt-ray submit --working-dir`); the zip travels base64 in the request, so DRPT_MAX_BODY_BYTES bounds it too (0: no working directories) |
| `DRPT_MAX_RUN_CPUS`, `DRPT_MAX_RUN_GPUS` | most CPUs / GPUs one job (one sweep trial) may reserve (no limit but the cluster's) |
| `DRPT_CLUSTER_CAPACITY` | refuse a job that needs more CPUs / GPUs than the Ray cluster's alive nodes hold (true; off for an autoscaling cluster) |
| `DRPT_MAX_KV_CACHE_GIB` | most vLLM KV cache one job may ask for over its rollout workers (64) |
| `DRPT_MAX_BATCH_SIZE` | largest batch_size / target_batch_size a job may ask for (4096) |
| `DATABASE_URL` | SQLAlchemy URL (`sqlite:///./drpt-control-plane.sqlite`); Postgres in production |
| `RAY_ADDRESS` | Ray dashboard URL for the Jobs API (`http://head:8265`); empty: the local Ray `drpt-ray serve` starts |
| `DRPT_RAY_AUTH_TOKEN` | Ray token-auth token; unset: `RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token` |
| `DRPT_PUBLIC_URL` | base URL job drivers post events back to (`http://127.0.0.1:8000`) |
| `DRPT_MAX_RUNNING_JOBS` | jobs + sweeps on Ray at once; the rest wait QUEUED (1) |
| `DRPT_MAX_BODY_BYTES` | request body limit, 413 above it (1 MiB) |
| `DRPT_RUNS_DIR` | per-run working directories on the Ray head node; relative spec paths resolve there (`./runs/api`) |
| `DRPT_DRIVER_PYTHON` | interpreter for job drivers (this one's, so a local Ray runs this venv; `python` on a remote cluster) |
| `DRPT_LAUNCHER` | `ray` (default) or `dry-run` (record submissions, run nothing: API development and benchmarks) |
| `DRPT_INGEST_SECRET` | key the per-run ingest tokens are derived from; unset: a random one kept in the database |
| `DRPT_POLL_INTERVAL_S` | how often queued runs are admitted and active ones reconciled with Ray (1.0) |
| `DRPT_SSE_HEARTBEAT_S` | SSE keep-alive comment interval (15) |
| `DRPT_PUBLIC_DOCS` | serve `/docs`, `/redoc` and `/openapi.json` without a token (false: `/openapi.json` needs one, no UI) |
| `DRPT_CORS_ORIGINS` | comma-separated origins (`https://ui.example.org`) whose pages may call the API from a browser; empty: none (no CORS) |
| `DRPT_STREAM_TOKEN_TTL_S` | how long a stream token (`POST /v1/jobs/{id}/stream-token`) can open its run's stream (900) |
"""  # noqa: E501 (Markdown table rows cannot be wrapped)

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from drpt_ray.wire import DEFAULT_URL
from drpt_ray.config import MAX_SWEEP_TRIALS
from services.control_plane.db import DEFAULT_TENANT

PLACEHOLDER_TOKENS = {"changethis", "changeme", "secret", "token", "password"}
TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def _env(name: str, description: str, default=PydanticUndefined, **kw):
    """A setting read from the environment variable `name` (or, in code, by its field name:
    `name` lower-cased without the DRPT_ prefix)."""
    return Field(default, validation_alias=AliasChoices(name, name.lower().removeprefix("drpt_")),
                 description=description, **kw)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    api_tokens: Annotated[list[str], NoDecode] = _env("DRPT_API_TOKENS", "Bearer tokens accepted by the API, each "
                                                      "`token` (tenant 'default') or `tenant:token`.",
                                                      default_factory=list)
    admin_tenants: Annotated[list[str], NoDecode] = _env("DRPT_ADMIN_TENANTS",
                                                         "Tenants whose tokens see and cancel every tenant's runs.",
                                                         default_factory=list)
    max_running_per_tenant: int | None = _env("DRPT_MAX_RUNNING_PER_TENANT", "Runs of one tenant on Ray at once (None: "
                                              "only DRPT_MAX_RUNNING_JOBS).", None, ge=1)
    read_roots: Annotated[list[Path], NoDecode] = _env("DRPT_READ_ROOTS", "Directories server jobs may read models, "
                                                       "data and reward models from (symlinks resolved); empty: none.",
                                                       default_factory=list)
    working_dir_max_bytes: int = _env("DRPT_WORKING_DIR_MAX_BYTES", "Most bytes (its files unpacked) of the working "
                                      "directory a job may ship (POST /v1/jobs/with-working-dir); 0: refused.",
                                      0, ge=0)
    max_run_cpus: float | None = _env("DRPT_MAX_RUN_CPUS",
                                      "Most CPUs one job or sweep trial may reserve (None: the cluster's).", None, gt=0)
    max_run_gpus: float | None = _env("DRPT_MAX_RUN_GPUS",
                                      "Most GPUs one job or sweep trial may reserve (None: the cluster's).", None, ge=0)
    cluster_capacity: bool = _env("DRPT_CLUSTER_CAPACITY", "Refuse at submission a job (a sweep trial) that needs more "
                                  "CPUs or GPUs than the Ray cluster's alive nodes hold; off for an "
                                  "autoscaling cluster.", True)
    max_kv_cache_gib: float = _env("DRPT_MAX_KV_CACHE_GIB",
                                   "Most vLLM KV cache (GiB, over its rollout workers) one job may ask for.",
                                   64.0, gt=0)
    max_batch_size: int = _env("DRPT_MAX_BATCH_SIZE",
                               "Largest batch_size and target_batch_size a job may ask for.", 4096, ge=1)
    database_url: str = _env("DATABASE_URL", "SQLAlchemy database URL.", "sqlite:///./drpt-control-plane.sqlite")
    ray_address: str = _env("RAY_ADDRESS",
                            "Ray dashboard (Jobs API) URL; empty: http://127.0.0.1:8265, the local Ray "
                            "`drpt-ray serve` starts.", "")
    ray_auth_token: str | None = _env("DRPT_RAY_AUTH_TOKEN",
                                      "Ray token-auth token for the Jobs API (see launcher.ray_auth_token for "
                                      "the fallbacks).", None)
    public_url: str = _env("DRPT_PUBLIC_URL", "Base URL job drivers post their events to.", DEFAULT_URL)
    max_running_jobs: int = _env("DRPT_MAX_RUNNING_JOBS", "Runs (jobs and sweeps) submitted to Ray at once.", 1, ge=1)
    max_body_bytes: int = _env("DRPT_MAX_BODY_BYTES", "Largest accepted request body (413 above).", 1 << 20, ge=1024)
    runs_dir: Path = _env("DRPT_RUNS_DIR", "Parent of each run's working directory on the Ray head node.",
                          Path("runs/api"))
    driver_python: str = _env("DRPT_DRIVER_PYTHON", "Python interpreter the Ray job entrypoint runs.", sys.executable)
    launcher: Literal["ray", "dry-run"] = _env("DRPT_LAUNCHER",
                                               "ray: Ray Jobs API; dry-run: record submissions, run nothing.", "ray")
    ingest_secret: str | None = _env("DRPT_INGEST_SECRET",
                                     "HMAC key of the per-run ingest tokens; None: generated once and kept "
                                     "in the database.", None)
    poll_interval_s: float = _env("DRPT_POLL_INTERVAL_S",
                                  "Supervisor tick: admit queued runs, reconcile active ones with Ray.", 1.0, gt=0)
    sse_heartbeat_s: float = _env("DRPT_SSE_HEARTBEAT_S", "Seconds between SSE keep-alive comments.", 15.0, gt=0)

    public_docs: bool = _env("DRPT_PUBLIC_DOCS",
                             "Serve the interactive docs and the OpenAPI schema without a token.", False)
    cors_origins: Annotated[list[str], NoDecode] = _env("DRPT_CORS_ORIGINS",
                                                        "Origins allowed to call the API from a browser (CORS).",
                                                        default_factory=list)
    user_code: bool = _env("DRPT_USER_CODE", "Accept jobs that name their own code (a 'module:function' in "
                           "algorithm.advantage, algorithm.policy_loss or reward.function), from "
                           "DRPT_USER_CODE_MODULES only; off: built-in names only.", False)
    user_code_modules: Annotated[list[str], NoDecode] = _env(
        "DRPT_USER_CODE_MODULES", "Comma-separated module prefixes job code may come from when DRPT_USER_CODE is on "
        "(e.g. mycompany.rl allows mycompany.rl and mycompany.rl.*); the operator installs them on the cluster.",
        default_factory=list)
    max_sweep_trials: int = _env("DRPT_MAX_SWEEP_TRIALS", "Most trials one sweep may run (grid: product of the value "
                                 "counts x num_samples); a bigger sweep is refused at submission (422).",
                                 256, ge=1, le=MAX_SWEEP_TRIALS)
    stream_token_ttl_s: float = _env("DRPT_STREAM_TOKEN_TTL_S",
                                     "Lifetime of a stream token (opening, or reopening, a run's stream).",
                                     900.0, gt=0, le=86400)

    @field_validator("api_tokens", "admin_tenants", "cors_origins", "user_code_modules", "read_roots", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            v = [t.strip() for t in v.split(",")]
        return [t for t in v if t]

    @field_validator("api_tokens")
    @classmethod
    def _strong(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("DRPT_API_TOKENS is empty: set at least one bearer token (e.g. `openssl rand -hex 24`)")
        for entry in v:
            tenant, t = _split_token(entry)
            if not TENANT.fullmatch(tenant):
                raise ValueError(f"DRPT_API_TOKENS: tenant {tenant!r} is not a tenant name (lower-case letters, "
                                 "digits, '_', '-')")
            if len(t) < 16 or t.lower() in PLACEHOLDER_TOKENS:
                raise ValueError(f"DRPT_API_TOKENS: token {t[:4]}... is too weak; use >= 16 random characters")
        return v

    @field_validator("admin_tenants")
    @classmethod
    def _tenant_names(cls, v: list[str]) -> list[str]:
        for t in v:
            if not TENANT.fullmatch(t):
                raise ValueError(f"DRPT_ADMIN_TENANTS: {t!r} is not a tenant name (lower-case letters, "
                                 "digits, '_', '-')")
        return v

    @field_validator("read_roots")
    @classmethod
    def _real_dirs(cls, v: list[Path]) -> list[Path]:
        return [Path(os.path.realpath(Path(p).expanduser())) for p in v]

    def token_tenants(self) -> list[tuple[str, str]]:
        """(token, tenant) of every configured API token."""
        return [_split_token(e)[::-1] for e in self.api_tokens]

    @field_validator("user_code_modules")
    @classmethod
    def _modules(cls, v: list[str]) -> list[str]:
        for m in v:
            if not all(p.isidentifier() for p in m.split(".")):
                raise ValueError(f"DRPT_USER_CODE_MODULES: {m!r} is not a module name (dotted identifiers, "
                                 "e.g. mycompany.rl)")
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        # An origin is scheme://host[:port], exactly as a browser sends it: a path, a trailing slash
        # or a wildcard would never match (or, for '*', would open the API to every page).
        for o in v:
            if not re.fullmatch(r"https?://[^/\s*]+", o):
                raise ValueError(f"DRPT_CORS_ORIGINS: {o!r} is not an origin; write scheme://host[:port], e.g. https://ui.example.org")
        return v

    @field_validator("runs_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("public_url", "ray_address")
    @classmethod
    def _http_url(cls, v: str, info) -> str:
        if v and not v.startswith(("http://", "https://")):
            name = "RAY_ADDRESS" if info.field_name == "ray_address" else "DRPT_PUBLIC_URL"
            raise ValueError(f"{name} must be an http(s) URL (the Ray dashboard, e.g. http://head:8265, for "
                             f"RAY_ADDRESS), got {v!r}")
        return v.rstrip("/")

    @property
    def dashboard_url(self) -> str:
        return self.ray_address or "http://127.0.0.1:8265"


def _split_token(entry: str) -> tuple[str, str]:
    """`tenant:token` -> (tenant, token); a bare token belongs to DEFAULT_TENANT."""
    tenant, sep, token = entry.partition(":")
    return (tenant, token) if sep else (DEFAULT_TENANT, entry)
