"""Typed dependencies shared by the routes (FastAPI template style: `DbDep`, `ApiAuth`, ...)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials

from drpt_ray.config import INT64_MAX
from services.control_plane.db import Database
from services.control_plane.idempotency import (DESCRIPTION as IDEMPOTENCY_DESCRIPTION, HEADER as IDEMPOTENCY_HEADER,
                                                IdempotencyKey)
from services.control_plane.launcher import Launcher
from services.control_plane.notify import Hub
from services.control_plane.security import Caller, bearer, bearer_token, require_api_token
from services.control_plane.settings import Settings
from services.control_plane.supervisor import Supervisor


def _api_token(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    return require_api_token(request, creds)


def _idempotency_key(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    key: Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER, min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$",
                                      description=IDEMPOTENCY_DESCRIPTION)] = None,
) -> IdempotencyKey | None:
    return None if key is None else IdempotencyKey.of(bearer_token(creds), key)


def _db(request: Request) -> Database:
    return request.app.state.db


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _launcher(request: Request) -> Launcher:
    return request.app.state.launcher


def _hub(request: Request) -> Hub:
    return request.app.state.hub


def _supervisor(request: Request) -> Supervisor:
    return request.app.state.supervisor


ApiAuth = Depends(_api_token)
CallerDep = Annotated[Caller, Depends(_api_token)]  # the same dependency: FastAPI runs it once per request
DbDep = Annotated[Database, Depends(_db)]
SettingsDep = Annotated[Settings, Depends(_settings)]
LauncherDep = Annotated[Launcher, Depends(_launcher)]
HubDep = Annotated[Hub, Depends(_hub)]
SupervisorDep = Annotated[Supervisor, Depends(_supervisor)]
IdempotencyKeyDep = Annotated[IdempotencyKey | None, Depends(_idempotency_key)]
# Paging: SQLite's OFFSET is a signed 64-bit integer, so a larger one would be a 500, not a 422.
OffsetQuery = Annotated[int, Query(ge=0, le=INT64_MAX, description="Items to skip.")]
