"""Control-plane settings, read from the environment once (pydantic-settings).

| env var | meaning (default) |
|---|---|
| `DRPT_API_TOKENS` | comma-separated bearer tokens accepted on every route but `/healthz` (required, each >= 16 chars) |
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
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from drpt_ray.client import DEFAULT_URL

PLACEHOLDER_TOKENS = {"changethis", "changeme", "secret", "token", "password"}


def _env(name: str, description: str, default=PydanticUndefined, **kw):
    """A setting read from the environment variable `name` (or, in code, by its field name:
    `name` lower-cased without the DRPT_ prefix)."""
    return Field(default, validation_alias=AliasChoices(name, name.lower().removeprefix("drpt_")), description=description, **kw)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    api_tokens: Annotated[list[str], NoDecode] = _env("DRPT_API_TOKENS", "Bearer tokens accepted by the API.", default_factory=list)
    database_url: str = _env("DATABASE_URL", "SQLAlchemy database URL.", "sqlite:///./drpt-control-plane.sqlite")
    ray_address: str = _env("RAY_ADDRESS", "Ray dashboard (Jobs API) URL; empty: http://127.0.0.1:8265, the local Ray `drpt-ray serve` starts.", "")
    ray_auth_token: str | None = _env("DRPT_RAY_AUTH_TOKEN", "Ray token-auth token for the Jobs API (see launcher.ray_auth_token for the fallbacks).", None)
    public_url: str = _env("DRPT_PUBLIC_URL", "Base URL job drivers post their events to.", DEFAULT_URL)
    max_running_jobs: int = _env("DRPT_MAX_RUNNING_JOBS", "Runs (jobs and sweeps) submitted to Ray at once.", 1, ge=1)
    max_body_bytes: int = _env("DRPT_MAX_BODY_BYTES", "Largest accepted request body (413 above).", 1 << 20, ge=1024)
    runs_dir: Path = _env("DRPT_RUNS_DIR", "Parent of each run's working directory on the Ray head node.", Path("runs/api"))
    driver_python: str = _env("DRPT_DRIVER_PYTHON", "Python interpreter the Ray job entrypoint runs.", sys.executable)
    launcher: Literal["ray", "dry-run"] = _env("DRPT_LAUNCHER", "ray: Ray Jobs API; dry-run: record submissions, run nothing.", "ray")
    ingest_secret: str | None = _env("DRPT_INGEST_SECRET", "HMAC key of the per-run ingest tokens; None: generated once and kept in the database.", None)
    poll_interval_s: float = _env("DRPT_POLL_INTERVAL_S", "Supervisor tick: admit queued runs, reconcile active ones with Ray.", 1.0, gt=0)
    sse_heartbeat_s: float = _env("DRPT_SSE_HEARTBEAT_S", "Seconds between SSE keep-alive comments.", 15.0, gt=0)

    public_docs: bool = _env("DRPT_PUBLIC_DOCS", "Serve the interactive docs and the OpenAPI schema without a token.", False)
    cors_origins: Annotated[list[str], NoDecode] = _env("DRPT_CORS_ORIGINS", "Origins allowed to call the API from a browser (CORS).", default_factory=list)
    user_code: bool = _env("DRPT_USER_CODE", "Accept jobs that name their own code (a 'module:function' in algorithm.advantage, "
                           "algorithm.policy_loss or reward.function), from DRPT_USER_CODE_MODULES only; off: built-in names only.", False)
    user_code_modules: Annotated[list[str], NoDecode] = _env(
        "DRPT_USER_CODE_MODULES", "Comma-separated module prefixes job code may come from when DRPT_USER_CODE is on "
        "(e.g. mycompany.rl allows mycompany.rl and mycompany.rl.*); the operator installs them on the cluster.", default_factory=list)
    max_sweep_trials: int = _env("DRPT_MAX_SWEEP_TRIALS", "Most trials one sweep may run (grid: product of the value "
                                 "counts x num_samples); a bigger sweep is refused at submission (422).", 256, ge=1)
    stream_token_ttl_s: float = _env("DRPT_STREAM_TOKEN_TTL_S", "Lifetime of a stream token (opening, or reopening, a run's stream).", 900.0, gt=0, le=86400)

    @field_validator("api_tokens", "cors_origins", "user_code_modules", mode="before")
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
        for t in v:
            if len(t) < 16 or t.lower() in PLACEHOLDER_TOKENS:
                raise ValueError(f"DRPT_API_TOKENS: token {t[:4]}... is too weak; use >= 16 random characters")
        return v

    @field_validator("user_code_modules")
    @classmethod
    def _modules(cls, v: list[str]) -> list[str]:
        for m in v:
            if not all(p.isidentifier() for p in m.split(".")):
                raise ValueError(f"DRPT_USER_CODE_MODULES: {m!r} is not a module name (dotted identifiers, e.g. mycompany.rl)")
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
            raise ValueError(f"{name} must be an http(s) URL (the Ray dashboard, e.g. http://head:8265, for RAY_ADDRESS), got {v!r}")
        return v.rstrip("/")

    @property
    def dashboard_url(self) -> str:
        return self.ray_address or "http://127.0.0.1:8265"
