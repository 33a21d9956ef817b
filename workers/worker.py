"""The arq worker: start-up and shutdown of shared resources, and a queue loop woken by a push, not a timer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from arq import Retry, Worker
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, retry_key_prefix
from arq.jobs import SerializationError, deserialize_job_raw
from arq.utils import timestamp_ms
from arq.worker import func
from redis.exceptions import RedisError

from service.connections import RedisFactory, open_storage
from service.constants import JOB_FUNCTION, WAKE_CHANNEL, WEBHOOK_FUNCTION
from service.heap import settle_heap
from service.jobs import json_deserializer, json_serializer
from service.progress import JobEventManager
from service.settings import GatewayConfig, Settings, load_config
from workers.claims import FINISHED, RELEASED, RETRY_KEY_TTL, Claim, QueueTurns
from workers.resources import RESOURCES_KEY, WorkerResources, open_resources
from workers.tasks import MAX_ATTEMPTS, run_image_job
from workers.webhooks import MAX_DELIVERY_RUNS, deliver_webhook

log = logging.getLogger(__name__)

class ImageWorker(Worker):
    """arq's worker with its queue loop replaced: one Redis round trip per turn, woken by a push, not a timer.

    Stock arq scans the queue every `poll_delay` (0.5 s by default), so a job waits for the next scan, and
    spends several round trips per job around the job function. Here the front end publishes on
    `WAKE_CHANNEL` in the same transaction that enqueues, and a job ending wakes the loop too; each turn is
    one script (workers/claims.py) that cleans up after the jobs that ended since the last turn, finds the
    running jobs to abort and claims as many due jobs as there are free slots. The timer stays as a slow
    safety net for a wake-up lost while Redis reconnected, and for jobs deferred by `Retry`.

    Jobs run as arq runs them (same keys, `job_try` counting, `max_tries`, timeout, abort, `Retry`, re-run
    when cancelled by a shutdown), without arq's per-job hooks, result keys, cron jobs or the ctx entries
    besides `job_id` and `job_try`, none of which imagegw uses.
    """

    def __init__(self, *args: Any, lease: float, **kwargs: Any) -> None:
        # arq calls on_shutdown once every job task is done, before it closes the pool: the last endings
        # are reported there
        super().__init__(*args, on_shutdown=self._report_last_endings, **kwargs)
        self.wake = asyncio.Event()
        # arq marks a started job with an "in progress" key that lives for the whole job timeout (hours for
        # long workflows), so a job of a killed worker would wait that long to be re-run. Here the key is a
        # short lease the worker keeps renewing: a dead worker's jobs are picked up again within `lease`.
        self.lease = lease
        self.turns = QueueTurns(self.pool, self.queue_name, lease)
        self.ended: list[tuple[str, int]] = []  # (job id, outcome) not yet reported to Redis

    async def main(self) -> None:
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        background = [asyncio.create_task(self._listen_for_wakeups()), asyncio.create_task(self._renew_leases())]
        delay = 0.1
        try:
            while True:
                self.wake.clear()
                try:
                    await self._poll_iteration()
                    delay = 0.1
                except (RedisError, OSError) as exc:
                    # Redis is away: keep running jobs going and try again, rather than dying
                    log.warning("queue scan failed (%s); retrying in %.1f s", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races the event
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_delay_s):
                        await self.wake.wait()
        finally:
            for task in background:
                task.cancel()

    async def _poll_iteration(self) -> None:
        await self._turn()
        await self.record_health()

    async def _turn(self) -> None:
        ended, self.ended = self.ended, []
        running = [job_id for job_id in self.tasks if job_id not in self.aborting_tasks]
        slots = self.max_jobs - len(self.tasks) if self.allow_pick_jobs else 0
        try:
            aborted, claims = await self.turns.turn(timestamp_ms(), ended, running, slots)
        except BaseException:
            self.ended[:0] = ended  # not reported: the next turn does it
            raise
        for job_id in aborted:
            task = self.tasks.get(job_id)
            if task is not None and not task.done():
                self.aborting_tasks.add(job_id)
                task.cancel()
        for claim in claims:
            task = asyncio.create_task(self._run_claimed(claim))
            task.add_done_callback(partial(self._job_done, claim.job_id))
            self.tasks[claim.job_id] = task

    def _job_done(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self.tasks.get(job_id) is task:  # not a new run of the same job claimed meanwhile
            del self.tasks[job_id]
        self.wake.set()  # a slot is free and an ending is to be reported: take a turn now

    async def _run_claimed(self, claim: Claim) -> None:
        outcome = FINISHED
        try:
            outcome = await self._run(claim)
        except asyncio.CancelledError:  # swallowed, as arq does: the outcome says what the cancel was for
            if claim.job_id in self.aborting_tasks:
                self.jobs_failed += 1
                log.info("job %s aborted", claim.job_id)
            else:  # a shutdown: another worker (or this one's next start) runs it again
                self.jobs_retried += 1
                outcome = RELEASED
                log.info("job %s cancelled, will be run again", claim.job_id)
        finally:
            self.aborting_tasks.discard(claim.job_id)
            self.ended.append((claim.job_id, outcome))

    async def _run(self, claim: Claim) -> int:
        """The job's function, run as arq's run_job runs it; returns the outcome to report."""
        job_id = claim.job_id
        if claim.payload is None:
            return self._gave_up(job_id, "expired")
        try:
            name, args, kwargs, enqueue_try, _ = deserialize_job_raw(
                claim.payload, deserializer=self.job_deserializer)
        except SerializationError:
            return self._gave_up(job_id, "could not be deserialized", exc_info=True)
        if claim.aborted:
            return self._gave_up(job_id, "aborted before start")
        function = self.functions.get(name)
        if function is None:
            return self._gave_up(job_id, f"names an unknown function {name!r}")
        job_try = claim.job_try
        if enqueue_try and enqueue_try > job_try:  # enqueued as a later try than the counter says
            job_try = enqueue_try
            await self.pool.setex(retry_key_prefix + job_id, RETRY_KEY_TTL, str(job_try))
        max_tries = self.max_tries if function.max_tries is None else function.max_tries
        if job_try > max_tries:
            return self._gave_up(job_id, f"exceeded its {max_tries} tries")
        ctx = {**self.ctx, "job_id": job_id, "job_try": job_try}
        try:
            async with asyncio.timeout(self.job_timeout_s if function.timeout_s is None else function.timeout_s):
                await function.coroutine(ctx, *args, **kwargs)
        except Retry as retry:
            self.jobs_retried += 1
            # the queue score moves by the delay plus the time since the job was due, as arq does
            return retry.defer_score + timestamp_ms() - claim.score if retry.defer_score else RELEASED
        except Exception:
            log.exception("job %s (%s) failed", job_id, name)
            self.jobs_failed += 1
            return FINISHED
        self.jobs_complete += 1
        return FINISHED

    def _gave_up(self, job_id: str, why: str, *, exc_info: bool = False) -> int:
        log.warning("job %s %s", job_id, why, exc_info=exc_info)
        self.jobs_failed += 1
        return FINISHED

    async def _report_last_endings(self, ctx: dict[Any, Any]) -> None:
        self.allow_pick_jobs = False  # a closing worker takes no new job
        try:
            await self._turn()
        except (RedisError, OSError) as exc:  # the leases lapse instead: the jobs run again, to no effect
            log.warning("could not report the last job endings: %s", exc)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            running = [job_id for job_id, task in self.tasks.items() if not task.done()]
            if not running:
                continue
            try:
                async with self.pool.pipeline(transaction=False) as pipe:
                    for job_id in running:
                        pipe.pexpire(in_progress_key_prefix + job_id, int(self.lease * 1000))
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("could not renew job leases: %s", exc)

    async def _listen_for_wakeups(self) -> None:
        delay = 0.1
        while True:
            try:
                async with self.pool.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(WAKE_CHANNEL)
                    self.wake.set()  # anything enqueued while we were not listening
                    delay = 0.1
                    async for _ in pubsub.listen():
                        self.wake.set()
            except Exception as exc:  # any Redis failure: reconnect; cancellation still propagates
                log.warning("wake-up channel lost (%s); retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def build_worker(
    settings: Settings, config: GatewayConfig, redis: ArqRedis, res: WorkerResources, *, handle_signals: bool
) -> ImageWorker:
    job_timeout = max((m.timeout for m in config.models.values()), default=600.0) + 60
    return ImageWorker(
        functions=[func(run_image_job, name=JOB_FUNCTION, max_tries=MAX_ATTEMPTS + 1),
                   func(deliver_webhook, name=WEBHOOK_FUNCTION, max_tries=MAX_DELIVERY_RUNS)],
        queue_name=settings.queue_name,
        redis_pool=redis,
        ctx={RESOURCES_KEY: res},
        max_jobs=settings.worker_concurrency,
        job_timeout=job_timeout,
        keep_result=0,
        poll_delay=settings.worker_poll_fallback,
        health_check_interval=5,
        allow_abort_jobs=True,
        handle_signals=handle_signals,
        job_completion_wait=int(settings.worker_grace) if handle_signals else 0,
        job_serializer=json_serializer,
        job_deserializer=json_deserializer,
        log_results=False,
        lease=settings.job_lease,
    )


@asynccontextmanager
async def running_worker(
    settings: Settings, config: GatewayConfig, factory: RedisFactory, *, handle_signals: bool
) -> AsyncIterator[ImageWorker]:
    """A worker with its own connections and resources, running until the block exits."""
    redis = factory()
    manager = JobEventManager(factory, write_only=True)
    async with (open_storage(settings, redis) as storage,
                open_resources(settings, config, redis, storage, manager) as res):
        worker = build_worker(settings, config, redis, res, handle_signals=handle_signals)
        worker.main_task = asyncio.create_task(worker.main())
        try:
            yield worker
        finally:
            worker.main_task.cancel()
            await worker.close()
            await manager.close()


async def serve_worker(settings: Settings) -> None:
    """`imagegw worker`: run until SIGTERM/SIGINT, letting running jobs finish within the grace period."""
    config = load_config(settings.config)
    async with running_worker(settings, config, RedisFactory(settings), handle_signals=True) as worker:
        log.info("worker started on queue %s", settings.queue_name)
        settle_heap()  # as `serve` does
        assert worker.main_task is not None
        await asyncio.wait([worker.main_task])  # ends when a signal stops the loop
