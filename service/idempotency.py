"""`Idempotency-Key`: a client retry of a POST gets the job of the first try instead of a second job.

The key is claimed with SET NX before admission, so of two identical requests racing, exactly one creates a
job; the other waits until that job exists and answers with it (and, when synchronous, its result). The claim
says "pending" for a short while and turns "created" once the job is stored; a request that fails before that
releases it, so a retry after a 429 or a 400 is a fresh attempt, and a front end that dies before it lets it
lapse. A different request under the same key is a 409. Keys are per job owner: tenants cannot collide.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass

from aiohttp import web
from arq.connections import ArqRedis

from service.constants import IDEMPOTENCY_KEY
from service.errors import Conflict, InvalidRequest

HEADER = "Idempotency-Key"
PENDING_TTL = 60  # seconds: how long a claim whose request died keeps a retry waiting
WAIT_FOR_ORIGINAL = 10.0  # seconds a retry waits for the first try's job to be stored before giving up
POLL = 0.05

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_CONFIRM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 0
"""


@dataclass(frozen=True)
class IdempotencyClaim:
    key: str
    fingerprint: str  # of the method, path and body: what "the same request" means


async def idempotency_claim(request: web.Request) -> IdempotencyClaim | None:
    """The request's claim, or None without the header. Multipart bodies are compared without their boundary,
    which clients pick at random for every request."""
    value = request.headers.get(HEADER)
    if value is None:
        return None
    if not value.strip() or len(value) > 255:
        raise InvalidRequest(f"Invalid '{HEADER}' header: 1 to 255 characters are needed.", param=HEADER,
                             code="invalid_idempotency_key")
    body = _without_boundary(request, await request.read())
    digest = hashlib.sha256(f"{request.method}\n{request.path}\n{request.content_type}\n".encode() + body)
    return IdempotencyClaim(key=value, fingerprint=digest.hexdigest())


def _without_boundary(request: web.Request, body: bytes) -> bytes:
    if not request.content_type.startswith("multipart/"):
        return body
    for param in request.headers.get("Content-Type", "").split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary" and value:
            return body.replace(value.strip('"').encode(), b"")
    return body


class IdempotencyStore:
    def __init__(self, redis: ArqRedis, ttl: int) -> None:
        self.redis = redis
        self.ttl = ttl
        self._release = redis.register_script(_RELEASE)
        self._confirm = redis.register_script(_CONFIRM)

    @staticmethod
    def _key(owner: str, claim: IdempotencyClaim) -> str:
        return IDEMPOTENCY_KEY.format(owner, hashlib.sha256(claim.key.encode()).hexdigest())

    @staticmethod
    def _entry(claim: IdempotencyClaim, job_id: str, state: str) -> str:
        return json.dumps({"fingerprint": claim.fingerprint, "job_id": job_id, "state": state})

    async def claim(self, owner: str, claim: IdempotencyClaim, job_id: str) -> str | None:
        """None when this request may create `job_id`; else the id of the job an earlier request created."""
        key = self._key(owner, claim)
        deadline = time.monotonic() + WAIT_FOR_ORIGINAL
        while True:
            if await self.redis.set(key, self._entry(claim, job_id, "pending"), nx=True, ex=PENDING_TTL):
                return None
            raw = await self.redis.get(key)
            if raw is None:
                continue  # released by a first try that failed: claim it ourselves
            entry = json.loads(raw)
            if entry["fingerprint"] != claim.fingerprint:
                raise Conflict(f"This {HEADER} was already used for a different request.", param=HEADER,
                               code="idempotency_key_reused")
            if entry["state"] == "created":
                return str(entry["job_id"])
            if time.monotonic() > deadline:
                raise Conflict(f"A request with this {HEADER} is still being processed; retry later.",
                               param=HEADER, code="idempotency_key_in_use")
            await asyncio.sleep(POLL)

    async def created(self, owner: str, claim: IdempotencyClaim, job_id: str) -> None:
        """The job exists: retries may have it, for as long as jobs are kept."""
        pending, created = self._entry(claim, job_id, "pending"), self._entry(claim, job_id, "created")
        await self._confirm(keys=[self._key(owner, claim)], args=[pending, created, self.ttl])

    async def release(self, owner: str, claim: IdempotencyClaim, job_id: str) -> None:
        await self._release(keys=[self._key(owner, claim)], args=[self._entry(claim, job_id, "pending")])
