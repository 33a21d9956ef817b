"""Job records, their states and allowed transitions, and the Redis store both sides share."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, job_key_prefix
from arq.jobs import serialize_job
from pydantic import BaseModel

from service.constants import JOB_FUNCTION, JOB_KEY, WAKE_CHANNEL
from service.schemas import ImageSpec, JobStatus, WebhookDelivery

ACTIVE: frozenset[JobStatus] = frozenset({"queued", "running"})
TERMINAL: frozenset[JobStatus] = frozenset({"succeeded", "failed", "cancelled"})


class StoredImage(BaseModel):
    name: str
    revised_prompt: str | None = None


class StoredResult(BaseModel):
    """What a finished job produced: references into storage, rendered as url or b64_json on the way out."""

    created: int
    images: list[StoredImage]
    size: str | None = None
    quality: str | None = None
    background: str | None = None
    output_format: str | None = None
    usage: dict[str, Any] | None = None
    provider: str | None = None


class JobFailure(BaseModel):
    status: int
    error: dict[str, Any]


class JobRecord(BaseModel):
    """The authoritative state of a job: late subscribers and pollers read this, events are only the fast path."""

    id: str
    owner: str
    model: str
    spec: ImageSpec
    status: JobStatus = "queued"
    progress: int = 0
    stage: str | None = None
    base_url: str = ""
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    result: StoredResult | None = None
    failure: JobFailure | None = None
    webhook: WebhookDelivery | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_hash(self) -> dict[str, str]:
        data = self.model_dump(mode="json", exclude_none=True)
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> JobRecord:
        data: dict[str, Any] = {}
        for k, v in raw.items():
            key, value = k.decode(), v.decode()
            data[key] = value if key in _STRING_FIELDS else json.loads(value)
        return cls.model_validate(data)


_STRING_FIELDS = frozenset({"id", "owner", "model", "status", "stage", "base_url"})

# Moves a job between states atomically: only from one of the allowed states, and returns the record after.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0} end
if not string.find(' ' .. ARGV[1] .. ' ', ' ' .. cur .. ' ', 1, true) then
  return {0, cur}
end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[2] == 'status' and ARGV[3] == 'running' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
return {1, redis.call('HGETALL', KEYS[1])}
"""

# Raises the stored progress only while the job runs and never lowers it.
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local cur = tonumber(redis.call('HGET', KEYS[1], 'progress') or '0')
if tonumber(ARGV[1]) < cur then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1], 'stage', ARGV[2])
return 1
"""


def json_serializer(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def json_deserializer(raw: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(raw)
    return result


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    """Job records in Redis plus the arq queue they run from."""

    def __init__(self, redis: ArqRedis, queue_name: str, ttl: int) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.ttl = ttl
        self._transition = redis.register_script(_TRANSITION)
        self._progress = redis.register_script(_PROGRESS)

    def key(self, job_id: str) -> str:
        return JOB_KEY.format(job_id)

    async def create(self, record: JobRecord, *, enqueue: bool) -> None:
        """Store the record and, for queued dispatch, enqueue it and wake a worker: one round trip."""
        now_ms = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(record.id), mapping=record.to_hash())
            pipe.expire(self.key(record.id), self.ttl)
            if enqueue:
                # the arq job itself, written as arq's enqueue_job would, but in the same transaction
                payload = serialize_job(JOB_FUNCTION, (record.id,), {}, None, now_ms, serializer=json_serializer)
                pipe.psetex(job_key_prefix + record.id, self.ttl * 1000, payload)
                pipe.zadd(self.queue_name, {record.id: now_ms})
                pipe.publish(WAKE_CHANNEL, b"1")
            await pipe.execute()

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self.redis.hgetall(self.key(job_id))  # type: ignore[misc]
        return JobRecord.from_hash(raw) if raw else None

    async def transition(
        self, job_id: str, allowed: frozenset[JobStatus], fields: dict[str, Any]
    ) -> JobRecord | None:
        """Apply `fields` if the job is in one of `allowed` states; the record after, or None if not applied."""
        args: list[str] = [" ".join(sorted(allowed))]
        for name, value in fields.items():
            args += [name, value if isinstance(value, str) else json.dumps(value)]
        reply = await self._transition(keys=[self.key(job_id)], args=args)
        if not reply or reply[0] != 1:
            return None
        flat = reply[1]
        return JobRecord.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def start(self, job_id: str) -> JobRecord | None:
        """queued (or running, when arq re-runs a job after a crash) -> running."""
        return await self.transition(job_id, ACTIVE, {"status": "running", "stage": "starting",
                                                       "started_at": time.time()})

    async def succeed(self, job_id: str, result: StoredResult) -> JobRecord | None:
        return await self.transition(
            job_id,
            frozenset({"running"}),
            {
                "status": "succeeded",
                "progress": 100,
                "stage": "done",
                "finished_at": time.time(),
                "result": result.model_dump(mode="json", exclude_none=True),
            },
        )

    async def fail(self, job_id: str, failure: JobFailure, *, status: JobStatus = "failed") -> JobRecord | None:
        return await self.transition(
            job_id,
            ACTIVE,
            {
                "status": status,
                "stage": status,
                "finished_at": time.time(),
                "failure": failure.model_dump(mode="json"),
            },
        )

    async def cancel(self, job_id: str, failure: JobFailure) -> JobRecord | None:
        """Cancel a queued or running job: drop it from the queue and ask arq to abort a running one."""
        record = await self.fail(job_id, failure, status="cancelled")
        if record is not None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.queue_name, job_id)
                pipe.zadd(abort_jobs_ss, {job_id: int(time.time() * 1000)})
                pipe.publish(WAKE_CHANNEL, b"1")
                await pipe.execute()
        return record

    async def set_progress(self, job_id: str, progress: int, stage: str) -> None:
        await self._progress(keys=[self.key(job_id)], args=[progress, stage])
