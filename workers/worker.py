"""The arq worker: start-up and shutdown of shared resources, and a queue loop woken by a push, not a timer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from arq import Worker
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import func
from redis.exceptions import RedisError

from service.connections import RedisFactory, open_storage
from service.constants import JOB_FUNCTION, WAKE_CHANNEL, WEBHOOK_FUNCTION
from service.jobs import json_deserializer, json_serializer
from service.progress import JobEventManager
from service.settings import GatewayConfig, Settings, load_config
from workers.resources import RESOURCES_KEY, WorkerResources, open_resources
from workers.tasks import MAX_ATTEMPTS, run_image_job
from workers.webhooks import MAX_DELIVERY_RUNS, deliver_webhook

log = logging.getLogger(__name__)

class ImageWorker(Worker):
    """arq's worker with its sleep between queue scans replaced by a wait on a Redis wake-up channel.

    Stock arq scans the queue every `poll_delay` (0.5 s by default): a job waits for the next scan. Here the
    front end publishes on `WAKE_CHANNEL` in the same transaction that enqueues, and a finishing job wakes
    the loop too, so an idle worker starts a job within a Redis round trip. The timer stays as a slow
    safety net for a wake-up lost while Redis reconnected.
    """

    def __init__(self, *args: Any, lease: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wake = asyncio.Event()
        # arq marks a started job with an "in progress" key that lives for the whole job timeout (hours for
        # long workflows), so a job of a killed worker would wait that long to be re-run. Here the key is a
        # short lease the worker keeps renewing: a dead worker's jobs are picked up again within `lease`.
        self.lease = lease
        self.in_progress_timeout_s = lease

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

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self.wake.set()  # a slot is free: look at the queue now

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
        assert worker.main_task is not None
        await asyncio.wait([worker.main_task])  # ends when a signal stops the loop
