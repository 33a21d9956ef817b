"""Job records, their states and allowed transitions, and the Redis store both sides share."""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, job_key_prefix
from arq.jobs import serialize_job
from pydantic import BaseModel

from service.constants import JOB_FUNCTION, JOB_KEY, WAKE_CHANNEL
from service.schemas import ImageSpec, JobStatus, WebhookDelivery
from service.scripts import Chain, Step, StepCall

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
        return {k: _hash_value(v) for k, v in data.items()}

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> JobRecord:
        data: dict[str, Any] = {}
        for k, v in raw.items():
            key, value = k.decode(), v.decode()
            data[key] = value if key in _STRING_FIELDS else json.loads(value)
        return cls.model_validate(data)


_STRING_FIELDS = frozenset({"id", "owner", "model", "status", "stage", "base_url"})

# Moves a job between states atomically: only from one of the allowed states; the record after, if asked.
TRANSITION = Step("transition", """
local cur = redis.call('HGET', K[1], 'status')
if not cur then return {0} end
if not string.find(' ' .. A[1] .. ' ', ' ' .. cur .. ' ', 1, true) then
  return {0, cur}
end
if #A > 2 then redis.call('HSET', K[1], unpack(A, 3)) end
if A[3] == 'status' and A[4] == 'running' then redis.call('HINCRBY', K[1], 'attempts', 1) end
if A[2] == '1' then return {1, redis.call('HGETALL', K[1])} end
return {1}
""")

# Stores a new record; for queued dispatch also the arq job (as arq's enqueue_job writes it), its place in the
# queue and the wake-up for idle workers.
CREATE = Step("create", """
redis.call('HSET', K[1], unpack(A, 6))
redis.call('EXPIRE', K[1], A[1])
if A[3] ~= '' then
  redis.call('PSETEX', K[2], tonumber(A[1]) * 1000, A[3])
  redis.call('ZADD', K[3], A[4], A[2])
  redis.call('PUBLISH', A[5], '1')
end
return {1}
""")

# A running job's progress: stored unless lower than the stored one (a re-run after a crash starts again from
# 0), and the chain goes on (to the event) only while the job runs: no progress follows its terminal event.
PROGRESS = Step("progress", """
if redis.call('HGET', K[1], 'status') ~= 'running' then return {0} end
local cur = tonumber(redis.call('HGET', K[1], 'progress') or '0')
if tonumber(A[1]) >= cur then redis.call('HSET', K[1], 'progress', A[1], 'stage', A[2]) end
return {1}
""")


def json_serializer(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def json_deserializer(raw: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(raw)
    return result


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    """Job records in Redis plus the arq queue they run from. The moves that also touch limits, settlement or
    events are composed with those in service/lifecycle.py; this class builds the record's part of them."""

    def __init__(self, redis: ArqRedis, queue_name: str, ttl: int) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.ttl = ttl
        self._transition = Chain(redis, TRANSITION)

    def key(self, job_id: str) -> str:
        return JOB_KEY.format(job_id)

    def create_call(self, record: JobRecord, *, enqueue: bool, run_for: float) -> StepCall:
        """The CREATE step: the record, plus for queued dispatch the arq job. That carries the job's owner and
        how long it may run once started (its model's timeout): what the worker's start needs to set the limit
        lease in the same round trip, before it has read the record."""
        now_ms = int(time.time() * 1000)
        payload = b""
        if enqueue:
            payload = serialize_job(JOB_FUNCTION, (record.id, record.owner, run_for), {}, None, now_ms,
                                    serializer=json_serializer)
        fields = [item for pair in record.to_hash().items() for item in pair]
        return ([self.key(record.id), job_key_prefix + record.id, self.queue_name],
                [self.ttl, record.id, payload, now_ms, WAKE_CHANNEL, *fields])

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self.redis.hgetall(self.key(job_id))  # type: ignore[misc]
        return JobRecord.from_hash(raw) if raw else None

    def transition_call(self, job_id: str, allowed: frozenset[JobStatus], fields: dict[str, Any], *,
                        read_back: bool = True) -> StepCall:
        """The TRANSITION step: apply `fields` if the job is in one of `allowed` states; with `read_back`,
        reply with the record after (see `transitioned`)."""
        args: list[str] = [" ".join(sorted(allowed)), "1" if read_back else "0"]
        for name, value in fields.items():
            args += [name, _hash_value(value)]
        return [self.key(job_id)], args

    @staticmethod
    def transitioned(reply: list[Any]) -> JobRecord | None:
        """The record after a TRANSITION step, or None if it was not applied."""
        if not reply or reply[0] != 1:
            return None
        flat = reply[1]
        return JobRecord.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def transition(
        self, job_id: str, allowed: frozenset[JobStatus], fields: dict[str, Any]
    ) -> JobRecord | None:
        """Apply `fields` if the job is in one of `allowed` states; the record after, or None if not applied."""
        (reply,) = await self._transition(self.transition_call(job_id, allowed, fields))
        return self.transitioned(reply)

    async def fail(self, job_id: str, failure: JobFailure, *, status: JobStatus = "failed") -> JobRecord | None:
        return await self.transition(job_id, ACTIVE, failed_fields(failure, status))

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

    def progress_call(self, job_id: str, progress: int, stage: str) -> StepCall:
        """The PROGRESS step."""
        return [self.key(job_id)], [progress, stage]


def started_fields() -> dict[str, Any]:
    """queued (or running, when arq re-runs a job after a crash) -> running."""
    return {"status": "running", "stage": "starting", "started_at": time.time()}


def succeeded_fields(result: StoredResult) -> dict[str, Any]:
    return {"status": "succeeded", "progress": 100, "stage": "done", "finished_at": time.time(), "result": result}


def failed_fields(failure: JobFailure, status: JobStatus = "failed") -> dict[str, Any]:
    return {"status": status, "stage": status, "finished_at": time.time(), "failure": failure}


def _hash_value(value: Any) -> str:
    """A record field as its hash stores it: strings as they are, everything else as JSON."""
    if isinstance(value, str):
        return value
    # the numbers of every record (progress, timestamps) without the JSON encoder's cost: the same text
    if type(value) is int or (type(value) is float and math.isfinite(value)):
        return repr(value)
    if isinstance(value, BaseModel):
        return value.model_dump_json(exclude_none=True)
    return json.dumps(value)
