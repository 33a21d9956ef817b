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
from service.settings import GatewayConfig, Settings
from service.usage import usage_record

# KEYS: marker, job leases, queue leases, budget, usage log, usage key index, job counts, job durations,
#       webhook arq job, arq queue, every key's queue leases
# ARGV: job id, marker ttl, refund, usage json, usage score, usage cutoff, key id, count field, bucket field,
#       sum field, seconds, webhook payload, webhook arq job id, payload ttl ms, enqueue score, wake channel
_SETTLE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[11], ARGV[1])
if tonumber(ARGV[3]) > 0 then redis.call('DECRBY', KEYS[4], ARGV[3]) end
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[5], ARGV[5], ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[6])
  redis.call('SADD', KEYS[6], ARGV[7])
end
if ARGV[8] ~= '' then redis.call('HINCRBY', KEYS[7], ARGV[8], 1) end
if ARGV[9] ~= '' then
  redis.call('HINCRBY', KEYS[8], ARGV[9], 1)
  redis.call('HINCRBYFLOAT', KEYS[8], ARGV[10], ARGV[11])
end
if ARGV[12] ~= '' then
  redis.call('PSETEX', KEYS[9], ARGV[14], ARGV[12])
  redis.call('ZADD', KEYS[10], ARGV[15], ARGV[13])
  redis.call('PUBLISH', ARGV[16], '1')
end
return 1
"""


class Settlement:
    def __init__(self, redis: ArqRedis, settings: Settings, config: GatewayConfig) -> None:
        self.settings = settings
        self.config = config
        self._settle = redis.register_script(_SETTLE)

    async def settle(self, record: JobRecord) -> bool:
        """Account for a terminal job; False when that was already done."""
        assert record.terminal, f"job {record.id} is {record.status}"
        usage = usage_record(record, self.config)
        seconds = None
        if record.started_at is not None and record.finished_at is not None:
            seconds = max(0.0, record.finished_at - record.started_at)
        webhook = b""
        if record.webhook is not None:
            webhook = serialize_job(WEBHOOK_FUNCTION, (record.id,), {}, None, int(time.time() * 1000),
                                    serializer=json_serializer)
        return await self._run(record, refund=max(0, record.spec.n - usage.images),
                               usage=usage.model_dump_json(), score=usage.finished_at, key=usage.key,
                               metric_fields=job_fields(record.model, usage.provider or "none", record.status,
                                                        seconds),
                               seconds=seconds or 0.0, webhook=webhook)

    async def abandon(self, record: JobRecord) -> None:
        """Give back what admission took for a job that was never created (its creation failed)."""
        await self._run(record, refund=record.spec.n, usage="", score=0.0, key="", metric_fields=["", "", ""],
                        seconds=0.0, webhook=b"")

    async def _run(self, record: JobRecord, *, refund: int, usage: str, score: float, key: str,
                   metric_fields: list[str], seconds: float, webhook: bytes) -> bool:
        settings = self.settings
        delivery_id = WEBHOOK_JOB_ID.format(record.id)
        count_field, bucket_field, sum_field = metric_fields
        _, _, jobs, queued, budget = limit_keys(record.owner)
        done = await self._settle(
            keys=[SETTLED_KEY.format(record.id), jobs, queued, budget, USAGE_LOG.format(key), USAGE_KEYS,
                  METRICS_JOBS, METRICS_JOB_SECONDS, job_key_prefix + delivery_id, settings.queue_name,
                  QUEUE_LEASES],
            args=[record.id, settings.job_ttl, refund, usage, score, score - settings.usage_retention, key,
                  count_field, bucket_field, sum_field, f"{seconds:.6f}", webhook, delivery_id,
                  settings.job_ttl * 1000, int(time.time() * 1000), WAKE_CHANNEL],
        )
        return bool(done)
