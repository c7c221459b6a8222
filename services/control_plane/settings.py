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
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PLACEHOLDER_TOKENS = {"changethis", "changeme", "secret", "token", "password"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    api_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("DRPT_API_TOKENS", "api_tokens"),
        description="Bearer tokens accepted by the API.",
    )
    database_url: str = Field(
        "sqlite:///./drpt-control-plane.sqlite", validation_alias=AliasChoices("DATABASE_URL", "database_url"),
        description="SQLAlchemy database URL.",
    )
    ray_address: str = Field(
        "", validation_alias=AliasChoices("RAY_ADDRESS", "ray_address"),
        description="Ray dashboard (Jobs API) URL; empty: http://127.0.0.1:8265, the local Ray `drpt-ray serve` starts.",
    )
    ray_auth_token: str | None = Field(
        None, validation_alias=AliasChoices("DRPT_RAY_AUTH_TOKEN", "ray_auth_token"),
        description="Ray token-auth token for the Jobs API (see launcher.ray_auth_token for the fallbacks).",
    )
    public_url: str = Field(
        "http://127.0.0.1:8000", validation_alias=AliasChoices("DRPT_PUBLIC_URL", "public_url"),
        description="Base URL job drivers post their events to.",
    )
    max_running_jobs: int = Field(
        1, ge=1, validation_alias=AliasChoices("DRPT_MAX_RUNNING_JOBS", "max_running_jobs"),
        description="Runs (jobs and sweeps) submitted to Ray at once.",
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, validation_alias=AliasChoices("DRPT_MAX_BODY_BYTES", "max_body_bytes"),
        description="Largest accepted request body (413 above).",
    )
    runs_dir: Path = Field(
        Path("runs/api"), validation_alias=AliasChoices("DRPT_RUNS_DIR", "runs_dir"),
        description="Parent of each run's working directory on the Ray head node.",
    )
    driver_python: str = Field(
        sys.executable, validation_alias=AliasChoices("DRPT_DRIVER_PYTHON", "driver_python"),
        description="Python interpreter the Ray job entrypoint runs.",
    )
    launcher: Literal["ray", "dry-run"] = Field(
        "ray", validation_alias=AliasChoices("DRPT_LAUNCHER", "launcher"),
        description="ray: Ray Jobs API; dry-run: record submissions, run nothing.",
    )
    ingest_secret: str | None = Field(
        None, validation_alias=AliasChoices("DRPT_INGEST_SECRET", "ingest_secret"),
        description="HMAC key of the per-run ingest tokens; None: generated once and kept in the database.",
    )
    poll_interval_s: float = Field(
        1.0, gt=0, validation_alias=AliasChoices("DRPT_POLL_INTERVAL_S", "poll_interval_s"),
        description="Supervisor tick: admit queued runs, reconcile active ones with Ray.",
    )
    sse_heartbeat_s: float = Field(
        15.0, gt=0, validation_alias=AliasChoices("DRPT_SSE_HEARTBEAT_S", "sse_heartbeat_s"),
        description="Seconds between SSE keep-alive comments.",
    )

    public_docs: bool = Field(
        False, validation_alias=AliasChoices("DRPT_PUBLIC_DOCS", "public_docs"),
        description="Serve the interactive docs and the OpenAPI schema without a token.",
    )

    @field_validator("api_tokens", mode="before")
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
