"""What happens once, and only once, when a job ends: its limit slots are released, the budget of images it
did not make is refunded, its usage is recorded, the cluster's job metrics count it, and its webhook
delivery is queued. All of that is one Lua script guarded by a per-job marker (SET NX), so it is exactly
once whoever gets there - the worker that finished the job, a re-run of it after a crash, or the front end
that cancelled it - and whenever a caller dies midway nothing is half done.
"""

from __future__ import annotations

import time

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job

from service.constants import (
    METRICS_JOB_SECONDS,
    METRICS_JOBS,
    QUEUE_LEASES,
    SETTLED_KEY,
    USAGE_KEYS,
    USAGE_LOG,
    WAKE_CHANNEL,
    WEBHOOK_FUNCTION,
    WEBHOOK_JOB_ID,
)
from service.jobs import JobRecord, json_serializer
from service.limits import limit_keys
from service.metrics import job_fields
from service.scripts import Chain, Step, StepCall
from service.settings import GatewayConfig, Settings
from service.usage import usage_record

# K: marker, job leases, queue leases, budget, usage log, usage key index, job counts, job durations,
#       webhook arq job, arq queue, every key's queue leases
# A: job id, marker ttl, refund, usage json, usage score, usage cutoff, key id, count field, bucket field,
#       sum field, seconds, webhook payload, webhook arq job id, payload ttl ms, enqueue score, wake channel
SETTLE = Step("settle", """
if not redis.call('SET', K[1], '1', 'NX', 'EX', A[2]) then return {1, 0} end
redis.call('ZREM', K[2], A[1])
redis.call('ZREM', K[3], A[1])
redis.call('ZREM', K[11], A[1])
if tonumber(A[3]) > 0 then redis.call('DECRBY', K[4], A[3]) end
redis.call('ZADD', K[5], A[5], A[4])
redis.call('ZREMRANGEBYSCORE', K[5], '-inf', A[6])
redis.call('SADD', K[6], A[7])
redis.call('HINCRBY', K[7], A[8], 1)
if A[9] ~= '' then
  redis.call('HINCRBY', K[8], A[9], 1)
  redis.call('HINCRBYFLOAT', K[8], A[10], A[11])
end
if A[12] ~= '' then
  redis.call('PSETEX', K[9], A[14], A[12])
  redis.call('ZADD', K[10], A[15], A[13])
  redis.call('PUBLISH', A[16], '1')
end
return {1, 1}
""")


class Settlement:
    def __init__(self, redis: ArqRedis, settings: Settings, config: GatewayConfig) -> None:
        self.settings = settings
        self.config = config
        self._settle = Chain(redis, SETTLE)

    async def settle(self, record: JobRecord) -> bool:
        """Account for a terminal job; False when that was already done."""
        (reply,) = await self._settle(self.settle_call(record))
        return bool(reply[1])

    def settle_call(self, record: JobRecord) -> StepCall:
        """The SETTLE step for a terminal job (or, in a job's finishing move, the record it is about to have)."""
        assert record.terminal, f"job {record.id} is {record.status}"
        settings = self.settings
        usage = usage_record(record, self.config)
        seconds = None
        if record.started_at is not None and record.finished_at is not None:
            seconds = max(0.0, record.finished_at - record.started_at)
        count_field, bucket_field, sum_field = job_fields(record.model, usage.provider or "none", record.status,
                                                          seconds)
        webhook = b""
        delivery_id = WEBHOOK_JOB_ID.format(record.id)
        now_ms = int(time.time() * 1000)
        if record.webhook is not None:
            webhook = serialize_job(WEBHOOK_FUNCTION, (record.id,), {}, None, now_ms, serializer=json_serializer)
        _, _, jobs, queued, budget = limit_keys(record.owner)
        return ([SETTLED_KEY.format(record.id), jobs, queued, budget, USAGE_LOG.format(usage.key), USAGE_KEYS,
                 METRICS_JOBS, METRICS_JOB_SECONDS, job_key_prefix + delivery_id, settings.queue_name,
                 QUEUE_LEASES],
                [record.id, settings.job_ttl, max(0, record.spec.n - usage.images), usage.model_dump_json(),
                 usage.finished_at, usage.finished_at - settings.usage_retention, usage.key, count_field,
                 bucket_field, sum_field, f"{seconds or 0.0:.6f}", webhook, delivery_id, settings.job_ttl * 1000,
                 now_ms, WAKE_CHANNEL])
