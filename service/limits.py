"""Admission control: per-key rate, concurrency and budget limits plus the global queue cap, decided
atomically in Redis so that any number of front-end processes enforce them exactly.

Windows are sliding logs (a sorted set of admissions scored by Redis server time in ms, kept only for keys
with that limit), so "5 per minute" means at most 5 in any 60 s, never 10 across a window boundary.
Concurrent and queued jobs are leases: a job's id scored by the time its slot lapses on its own, so a front
end or worker that dies without releasing cannot hold the slot forever. A worker shortens the lease when it
starts the job (an inline job's is that short from the start); the job's settlement (service/settlement.py)
releases both slots and refunds the budget of the images not made.

The queue cap counts the same way, over every key: image jobs admitted to the queue and not started yet.
That is what makes it exact (the arq queue itself only grows after admission, so checking its length would
let concurrent requests through together); the arq queue's length is what /metrics shows as queue depth.
"""

from __future__ import annotations

import math
from typing import Any

from service.auth import Principal
from service.constants import (
    BUDGET_USED,
    LIMIT_IMAGES,
    LIMIT_JOBS,
    LIMIT_QUEUED,
    LIMIT_REQUESTS,
    QUEUE_LEASES,
)
from service.errors import InvalidRequest, RateLimited, ServiceUnavailable
from service.scripts import Step, StepCall
from service.settings import Settings

WINDOW_MS = 60_000
# when a job slot frees is unknowable; clients retrying after a second are told the truth soon enough
SLOT_RETRY_AFTER = 1
QUEUE_FULL_RETRY_AFTER = 5
START_LEASE_MARGIN = 60.0  # seconds a started job's slot outlives its model timeout

ADMIT = Step("admit", """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local job, n = A[1], tonumber(A[2])
local rpm, ipm, conc, queued = tonumber(A[3]), tonumber(A[4]), tonumber(A[5]), tonumber(A[6])
local budget, cap, lease, window = tonumber(A[7]), tonumber(A[8]), tonumber(A[9]), tonumber(A[10])
local enqueue = A[11] == '1'
redis.call('ZREMRANGEBYSCORE', K[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', K[2], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', K[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', K[4], '-inf', now)
redis.call('ZREMRANGEBYSCORE', K[6], '-inf', now)
if enqueue and cap >= 0 then
  local depth = redis.call('ZCARD', K[6])
  if depth >= cap then return {0, 'queue_full', 0, cap, depth} end
end
if rpm >= 0 then
  local count = redis.call('ZCARD', K[1])
  if count >= rpm then
    local oldest = redis.call('ZRANGE', K[1], 0, 0, 'WITHSCORES')
    return {0, 'requests', tonumber(oldest[2]) + window - now, rpm, count}
  end
end
if ipm >= 0 then
  local entries = redis.call('ZRANGE', K[2], 0, -1, 'WITHSCORES')
  local used = 0
  for i = 1, #entries, 2 do used = used + tonumber(string.match(entries[i], ':(%d+)$')) end
  if used + n > ipm then
    local freed, retry = 0, window
    for i = 1, #entries, 2 do
      freed = freed + tonumber(string.match(entries[i], ':(%d+)$'))
      if used - freed + n <= ipm then
        retry = tonumber(entries[i + 1]) + window - now
        break
      end
    end
    return {0, 'images', retry, ipm, used}
  end
end
if conc >= 0 then
  local count = redis.call('ZCARD', K[3])
  if count >= conc then return {0, 'concurrent', 0, conc, count} end
end
if enqueue and queued >= 0 then
  local count = redis.call('ZCARD', K[4])
  if count >= queued then return {0, 'queued', 0, queued, count} end
end
if budget >= 0 then
  local used = tonumber(redis.call('GET', K[5]) or '0')
  if used + n > budget then return {0, 'budget', 0, budget, used} end
end
if rpm >= 0 then
  redis.call('ZADD', K[1], now, job)
  redis.call('PEXPIRE', K[1], window)
end
if ipm >= 0 then
  redis.call('ZADD', K[2], now, job .. ':' .. n)
  redis.call('PEXPIRE', K[2], window)
end
redis.call('ZADD', K[3], now + lease, job)
redis.call('PEXPIRE', K[3], lease)
if enqueue then
  redis.call('ZADD', K[4], now + lease, job)
  redis.call('PEXPIRE', K[4], lease)
  redis.call('ZADD', K[6], now + lease, job)
end
redis.call('INCRBY', K[5], n)
return {1}
""")

# A worker took the job: it no longer waits, and its slot now lapses with the model's timeout.
STARTED = Step("started", """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', K[2], A[1])
redis.call('ZREM', K[3], A[1])
redis.call('ZADD', K[1], 'XX', now + tonumber(A[2]), A[1])
return {1}
""")


def limit_keys(owner: str) -> list[str]:
    """The Redis keys of one owner's admission state, in the order the scripts take them."""
    return [LIMIT_REQUESTS.format(owner), LIMIT_IMAGES.format(owner), LIMIT_JOBS.format(owner),
            LIMIT_QUEUED.format(owner), BUDGET_USED.format(owner)]


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def _seconds(ms: int) -> int:
    return max(1, math.ceil(ms / 1000))


class Limiter:
    """Builds the admission steps of a job's moves (service/lifecycle.py runs them) and reads their verdicts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def admit_call(self, principal: Principal, job_id: str, images: int, *, queued: bool, run_for: float
                   ) -> StepCall:
        """The ADMIT step: a request slot, `images` from the image window and budget, and a job slot (plus a
        queue slot when the job goes to the queue) for `job_id`, all or nothing. A queued job's slot lasts
        the job lifetime until a worker starts it; an inline job starts at once, so its slot lapses with its
        model's timeout (`run_for`)."""
        limits = principal.limits
        if limits.images_per_minute is not None and images > limits.images_per_minute:
            raise InvalidRequest(f"Invalid 'n': this API key may request at most {limits.images_per_minute} "
                                 "images per minute.", param="n", code="integer_above_max_value")
        lease_ms = self.settings.job_ttl * 1000 if queued else _lease_ms(run_for)
        return ([*limit_keys(principal.owner), QUEUE_LEASES],
                [job_id, images, _limit(limits.requests_per_minute), _limit(limits.images_per_minute),
                 _limit(limits.concurrent_jobs), _limit(limits.queued_jobs), _limit(principal.image_budget),
                 _limit(self.settings.max_queue_depth), lease_ms, WINDOW_MS, "1" if queued else "0"])

    @staticmethod
    def check(reply: list[Any]) -> None:
        """Raise the error saying which limit stopped an ADMIT step, if one did."""
        if reply[0] == 1:
            return
        verdict, retry_ms, limit, used = reply[1].decode(), int(reply[2]), int(reply[3]), int(reply[4])
        if verdict == "queue_full":
            raise ServiceUnavailable("The gateway is at capacity: too many jobs are waiting. Please retry "
                                     "later.", code="queue_full",
                                     headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER)})
        if verdict == "budget":
            # a spent budget does not come back by waiting: no Retry-After, as OpenAI's insufficient_quota
            raise RateLimited(f"This API key has used {used} of its budget of {limit} images.",
                              code="insufficient_quota")
        what = {"requests": "requests per minute", "images": "images per minute",
                "concurrent": "concurrent jobs", "queued": "queued jobs"}[verdict]
        retry = _seconds(retry_ms) if retry_ms > 0 else SLOT_RETRY_AFTER
        raise RateLimited(
            f"Rate limit reached for {what} on this API key: limit {limit}, in use {used}. "
            f"Please try again in {retry}s.",
            headers={"Retry-After": str(retry)},
        )

    @staticmethod
    def started_call(owner: str, job_id: str, run_for: float) -> StepCall:
        """The STARTED step: the job left the queue; its slot now lapses `run_for` seconds (its model's
        timeout) from now."""
        return [LIMIT_JOBS.format(owner), LIMIT_QUEUED.format(owner), QUEUE_LEASES], [job_id, _lease_ms(run_for)]


def _lease_ms(run_for: float) -> int:
    return int((run_for + START_LEASE_MARGIN) * 1000)
