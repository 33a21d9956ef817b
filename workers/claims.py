"""The worker's one Redis round trip per turn of its loop, on arq's queue data model.

Stock arq spends several round trips per job around the job function: a queue scan, a WATCH/EXISTS/ZSCORE/
MULTI/PSETEX transaction to mark the job in progress, a pipeline reading the job and counting the try, a
pipeline cleaning up after it, and a read of the whole abort set on every loop turn. Here one script does
all of that for every job the turn concerns: it cleans up after the jobs that ended since the last turn,
reports which running jobs were aborted, and claims up to `slots` due jobs (in-progress lease set, try
counted, job read) - the same keys arq writes, so arq's enqueue, abort and re-run after a crash still apply.
It also drops abort entries older than arq's `abort_job_max_age` (arq meant to, but its trim removes only
entries dated in the future): a cancel of a queued job, which never runs, no longer stays there for good.

The script builds key names from the job ids it reads, which Redis allows outside cluster mode (the only
mode imagegw supports, as arq itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from arq.connections import ArqRedis
from arq.constants import abort_job_max_age, abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix

# arq keeps a job's try counter this long (seconds)
RETRY_KEY_TTL = 88400
# queue entries read per scan, and at most this many scans per turn: jobs running on other workers stay in
# the queue ahead of the waiting ones, so a busy cluster needs more than one scan to reach a free job
SCAN = 100
MAX_SCANS = 10

# An ended job's outcome: gone from the queue for good, or back in it to run again, now or `n` ms later.
FINISHED = -1
RELEASED = 0

# KEYS: queue, abort set
# ARGV: now ms, slots, lease ms, abort entry max age ms, scan size, max scans, retry key ttl,
#       in-progress / job / retry key prefixes, number of ended jobs E,
#       E pairs (job id, outcome: -1 finished, 0 released, n > 0 run again n ms later), then the running job ids
# Returns {aborted running ids, claimed jobs as flat (id, score, job or false, try, aborted before start)}
_TURN = """
local now, slots, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local scan, scans, retry_ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local progress, job, retry = ARGV[8], ARGV[9], ARGV[10]
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
local i = 12
for _ = 1, tonumber(ARGV[11]) do
  local id, outcome = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  redis.call('DEL', progress .. id)
  if outcome < 0 then
    redis.call('DEL', retry .. id, job .. id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[1], id)
  elseif outcome > 0 then
    redis.call('ZINCRBY', KEYS[1], outcome, id)
  end
end
local aborted = {}
for j = i, #ARGV do
  if redis.call('ZSCORE', KEYS[2], ARGV[j]) then aborted[#aborted + 1] = ARGV[j] end
end
local claimed = {}
local offset = 0
while slots > 0 and scans > 0 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', offset, scan)
  for k = 1, #due, 2 do
    local id = due[k]
    if redis.call('EXISTS', progress .. id) == 0 then
      redis.call('PSETEX', progress .. id, lease, '1')
      local try = redis.call('INCR', retry .. id)
      redis.call('EXPIRE', retry .. id, retry_ttl)
      local n = #claimed
      claimed[n + 1], claimed[n + 2], claimed[n + 3] = id, due[k + 1], redis.call('GET', job .. id)
      claimed[n + 4], claimed[n + 5] = try, redis.call('ZREM', KEYS[2], id)
      slots = slots - 1
      if slots == 0 then break end
    end
  end
  if #due < 2 * scan then break end
  offset, scans = offset + scan, scans - 1
end
return {aborted, claimed}
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """A job this worker now holds the in-progress lease of."""

    job_id: str
    score: int
    payload: bytes | None  # None: the job key expired
    job_try: int
    aborted: bool  # cancelled before it started


class QueueTurns:
    """Runs the turn script against one queue."""

    def __init__(self, redis: ArqRedis, queue_name: str, lease: float) -> None:
        self.queue_name = queue_name
        self.lease_ms = int(lease * 1000)
        self._script = redis.register_script(_TURN)

    async def turn(self, now_ms: int, ended: Sequence[tuple[str, int]], running: Sequence[str], slots: int
                   ) -> tuple[list[str], list[Claim]]:
        """Report `ended` jobs, check `running` ones for an abort and claim up to `slots` due jobs: the ids
        to abort and the claimed jobs, oldest first."""
        args: list[str | int] = [now_ms, slots, self.lease_ms, abort_job_max_age * 1000, SCAN, MAX_SCANS,
                                 RETRY_KEY_TTL, in_progress_key_prefix, job_key_prefix, retry_key_prefix, len(ended)]
        for job_id, outcome in ended:
            args += [job_id, outcome]
        args += running
        aborted, flat = await self._script(keys=[self.queue_name, abort_jobs_ss], args=args)
        claims = [Claim(job_id=flat[k].decode(), score=int(float(flat[k + 1])), payload=flat[k + 2],
                        job_try=int(flat[k + 3]), aborted=bool(flat[k + 4]))
                  for k in range(0, len(flat), 5)]
        return [job_id.decode() for job_id in aborted], claims
