"""Bearer-token auth, per-run ingest tokens and the request body limit.

* API tokens (`DRPT_API_TOKENS`) guard every route but `/healthz`: no `Authorization: Bearer`
  header -> 401 (with `WWW-Authenticate: Bearer`), a token that is not one of them -> 403. Each
  token belongs to a tenant; a `Caller` sees and cancels its tenant's runs only (another tenant's
  run is a 404, as if it did not exist), unless its tenant is in DRPT_ADMIN_TENANTS.
* A run's ingest token is `HMAC-SHA256(secret, run_id)`: the job driver gets it in its runtime
  env and may only post events for its own run. Nothing per run needs storing, and a restarted
  control plane (same database, hence same secret) still recognises it.
* A stream token (`StreamTokens`) opens one run's event stream for DRPT_STREAM_TOKEN_TTL_S: a
  browser's EventSource cannot send a header, and the API token must never sit in a URL (URLs end
  up in proxy logs and browser history), so an authenticated POST mints a token that can only read
  that one run, for minutes. It is `<expiry>.<HMAC(secret, "stream:<run_id>:<expiry>")>`: nothing is
  stored, and it cannot be taken for an ingest token (whose message is the bare run id) or reverse.
* `BodyLimitMiddleware` answers 413 before a handler sees a body over `DRPT_MAX_BODY_BYTES`,
  whether or not the client sent `Content-Length`.
* `refuse_escaping_paths`: where a run writes is the control plane's choice (its own directory
  DRPT_RUNS_DIR/<id>), not the submitter's.
* `refuse_unallowed_code`: a job runs only code the operator allowed. A `module:function` a spec
  names is checked against DRPT_USER_CODE / DRPT_USER_CODE_MODULES by its name alone: nothing a
  request names is ever imported in this process (the spec's own validation imports nothing either).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import PurePosixPath

from fastapi import HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select

from services.control_plane.db import Database, Meta
from services.control_plane.errors import error_response

bearer = HTTPBearer(auto_error=False, description="An API token from DRPT_API_TOKENS.")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the tenant of its API token; `scope` is what it may see (None: every tenant)."""

    tenant: str
    admin: bool = False

    @property
    def scope(self) -> str | None:
        return None if self.admin else self.tenant


def tenant_of(given: str, tokens: list[tuple[str, str]]) -> str | None:
    """The tenant of the API token `given` among (token, tenant) pairs, or None; constant time in
    which one matches (every candidate is compared)."""
    found = None
    for token, tenant in tokens:
        if hmac.compare_digest(given.encode(), token.encode()):
            found = tenant
    return found


def bearer_token(creds: HTTPAuthorizationCredentials | None) -> str:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    return creds.credentials


class IngestKeys:
    """Derives and checks per-run ingest tokens."""

    def __init__(self, secret: str):
        self._key = secret.encode()

    @classmethod
    def load(cls, db: Database, configured: str | None) -> "IngestKeys":
        """Use `configured`, else the secret kept in the database (created on first start)."""
        if configured:
            return cls(configured)
        with db.write() as s:
            row = s.scalar(select(Meta).where(Meta.key == "ingest_secret"))
            if row is None:
                row = Meta(key="ingest_secret", value=secrets.token_hex(32))
                s.add(row)
            return cls(row.value)

    def token(self, run_id: str) -> str:
        return hmac.new(self._key, run_id.encode(), hashlib.sha256).hexdigest()

    def check(self, run_id: str, given: str) -> bool:
        return hmac.compare_digest(self.token(run_id), given)


class StreamTokens:
    """Mints and checks stream tokens (see the module docstring)."""

    def __init__(self, keys: IngestKeys, ttl_s: float):
        self._keys, self.ttl_s = keys, ttl_s

    def mint(self, run_id: str, now: float) -> tuple[str, int]:
        """A token for `run_id` and its expiry (unix seconds)."""
        expires = int(now + self.ttl_s)
        return f"{expires}.{self._mac(run_id, expires)}", expires

    def check(self, run_id: str, token: str, now: float) -> bool:
        expires, _, mac = token.partition(".")
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 12) or int(expires) < now:
            return False
        return hmac.compare_digest(self._mac(run_id, int(expires)), mac)

    def _mac(self, run_id: str, expires: int) -> str:
        return self._keys.token(f"stream:{run_id}:{expires}")


def require_api_token(request: Request, creds: HTTPAuthorizationCredentials | None) -> Caller:
    settings = request.app.state.settings
    tenant = tenant_of(bearer_token(creds), settings.token_tenants())
    if tenant is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid bearer token")
    return Caller(tenant, admin=tenant in settings.admin_tenants)


def refuse_escaping_paths(paths: dict[tuple[str, ...], str]) -> None:
    """422 naming every body field (dotted location -> path) whose path could leave the run's own
    directory. A run works in DRPT_RUNS_DIR/<id> and relative paths resolve there, so only an
    absolute path or a '..' gets out: with one a submitter would choose where on the cluster's
    filesystem a job writes."""
    errors = [
        {"loc": ("body", *loc), "type": "value_error", "input": path,
         "msg": "must be a relative path inside the run's own directory (DRPT_RUNS_DIR/<id>): no "
         "absolute path, no '..'"}
        for loc, path in paths.items() if PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts
    ]
    if errors:
        raise RequestValidationError(errors)


def refuse_unallowed_code(code: dict[tuple[str | int, ...], str], allowed: bool, modules: list[str]) -> None:
    """422 naming every body field (location -> 'module:function') whose code the operator did not
    allow: any, when `allowed` (DRPT_USER_CODE) is off; else a module outside the `modules` prefixes."""
    def permitted(path: str) -> bool:
        module = path.partition(":")[0]
        return allowed and any(module == m or module.startswith(m + ".") for m in modules)

    why = ("this server runs built-in code only: a job may not name its own 'module:function' (the operator's "
           "DRPT_USER_CODE is off); use a registered name") if not allowed else (
           f"module not allowed: job code must come from the operator's DRPT_USER_CODE_MODULES {modules}")
    errors = [{"loc": ("body", *loc), "type": "value_error", "input": path, "msg": why}
              for loc, path in code.items() if not permitted(path)]
    if errors:
        raise RequestValidationError(errors)


class _TooLarge(HTTPException):
    """Raised from `receive`; an HTTPException so FastAPI's body parsing passes it through as 413."""

    def __init__(self, max_bytes: int):
        super().__init__(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, _too_large_detail(max_bytes))


def _too_large_detail(max_bytes: int) -> str:
    return f"request body exceeds the {max_bytes}-byte limit (DRPT_MAX_BODY_BYTES)"


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for bodies over `max_bytes` (declared or streamed)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(scope, receive, send)

    async def _reject(self, scope, receive, send) -> None:
        await error_response(413, _too_large_detail(self.max_bytes))(scope, receive, send)
