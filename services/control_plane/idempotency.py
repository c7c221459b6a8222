"""`Idempotency-Key` on the routes that create runs: a client that retries a submission after a
dropped connection gets the first answer back instead of a second job.

A key belongs to the API token that sent it (two callers never see each other's keys) and lives
`TTL_S`. Within that time a request with the same key and the same body (the validated spec, so
formatting and defaults spelled out make no difference; a JobSpec never equals a SweepSpec) is
answered with the stored status, body and Location, plus `Idempotent-Replayed: true`; the same key
with another body is a 422 naming the header. The row is written in the transaction that creates the run, so either
both exist or neither: a crash in between cannot leave a run without its key or the reverse.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Callable

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.control_plane.db import Database, IdempotencyRecord

TTL_S = 24 * 3600
HEADER = "Idempotency-Key"
DESCRIPTION = (
    "Makes a retry safe: a repeat with the same key and the same body within 24 h returns the first "
    "answer (same status, body and Location, header `Idempotent-Replayed: true`) and creates nothing. "
    "The same key with a different body is a 422. Keys are scoped to the API token; 1-255 visible ASCII characters."
)


@dataclass(frozen=True)
class IdempotencyKey:
    owner: str  # sha256 of the caller's API token: the token itself is never stored
    key: str

    @classmethod
    def of(cls, token: str, key: str) -> "IdempotencyKey":
        return cls(hashlib.sha256(token.encode()).hexdigest(), key)


Create = Callable[[Session], tuple[BaseModel, str]]  # add the run; its public model and Location


def create_once(db: Database, key: IdempotencyKey | None, body: dict, create: Create,
                clock: Callable[[], float] = time.time) -> JSONResponse:
    """201 with what `create` made, or the stored first answer to this key."""
    fingerprint, now = _fingerprint(body), clock()
    try:
        return _create_once(db, key, fingerprint, create, now)
    except IntegrityError:
        if key is None:
            raise
        # Another process stored this key between our read and our write (its transaction held
        # the row); ours rolled back with its run, and the stored answer is now there to replay.
        return _create_once(db, key, fingerprint, create, now)


def _create_once(db: Database, key: IdempotencyKey | None, fingerprint: str,
                 create: Create, now: float) -> JSONResponse:
    with db.write() as s:
        if key is not None:
            # Expired keys go first (this one's too, so it can be used afresh); the index on
            # created_at keeps that cheap.
            s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at <= now - TTL_S))
            stored = s.get(IdempotencyRecord, (key.owner, key.key))
            if stored is not None:
                if stored.fingerprint != fingerprint:
                    raise RequestValidationError([{
                        "loc": ("header", HEADER), "type": "value_error", "input": key.key,
                        "msg": f"this {HEADER} was used within 24 h for a different request; send a new key for "
                        "a new submission"}])
                return JSONResponse(stored.body, stored.status_code,
                                    {"Location": stored.location, "Idempotent-Replayed": "true"})
        model, location = create(s)
        body = model.model_dump(mode="json")
        if key is not None:
            s.add(IdempotencyRecord(owner=key.owner, key=key.key, fingerprint=fingerprint, status_code=201, body=body,
                                    location=location, created_at=now))
    return JSONResponse(body, 201, {"Location": location})


def _fingerprint(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
