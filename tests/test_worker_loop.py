"""The worker's own queue loop (workers/worker.py, workers/claims.py) on arq's keys, with plain job functions:
slots, claims shared between workers, abort, Retry, max tries, shutdown, cleanup. On a real Redis and on the
in-memory server embedded mode uses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from arq import Retry
from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import serialize_job
from arq.worker import func
from fakeredis import FakeServer

from service.connections import EmbeddedRedis
from service.constants import WAKE_CHANNEL
from service.jobs import json_deserializer, json_serializer
from workers.worker import ImageWorker

QUEUE = "test:queue"
Clients = Callable[[], ArqRedis]


@pytest.fixture(params=["redis", "embedded"])
def clients(request: pytest.FixtureRequest) -> Iterator[Clients]:
    """Makes clients of one server: each worker gets its own, as `running_worker` gives it."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        yield lambda: ArqRedis.from_url(url)
    else:
        server = FakeServer()
        yield lambda: EmbeddedRedis(server=server, lua_modules=set())


async def enqueue(redis: ArqRedis, function: str, job_id: str, *, payload: bool = True) -> None:
    """As the front end's JobStore.create writes a job: arq's job key, the queue entry, a wake-up."""
    now = int(time.time() * 1000)
    if payload:
        await redis.psetex(job_key_prefix + job_id, 60_000,
                           serialize_job(function, (job_id,), {}, None, now, serializer=json_serializer))
    await redis.zadd(QUEUE, {job_id: now})
    await redis.publish(WAKE_CHANNEL, b"1")


@asynccontextmanager
async def running(clients: Clients, *functions: Any, max_jobs: int = 10) -> AsyncIterator[ImageWorker]:
    worker = ImageWorker(functions=list(functions), queue_name=QUEUE, redis_pool=clients(), max_jobs=max_jobs,
                         keep_result=0, poll_delay=0.5, allow_abort_jobs=True, handle_signals=False,
                         job_serializer=json_serializer, job_deserializer=json_deserializer, lease=15)
    worker.main_task = asyncio.create_task(worker.main())
    try:
        yield worker
    finally:
        await worker.close()


async def drained(redis: ArqRedis, within: float = 10) -> None:
    """Until the queue and every arq key of its jobs (job, try counter, lease, abort entry) are gone."""
    deadline = time.monotonic() + within
    while await redis.zcard(QUEUE) or [k async for k in redis.scan_iter("arq:*")]:
        assert time.monotonic() < deadline, "the jobs did not end, or left keys behind"
        await asyncio.sleep(0.01)


async def test_runs_every_job_once_within_its_slots_and_cleans_up(clients: Clients) -> None:
    redis = clients()
    runs: list[tuple[str, int]] = []
    now_running, most = 0, 0

    async def job(ctx: dict[str, Any], job_id: str) -> None:
        nonlocal now_running, most
        now_running += 1
        most = max(most, now_running)
        await asyncio.sleep(0.005 * (int(job_id) % 4))
        runs.append((job_id, ctx["job_try"]))
        now_running -= 1

    for i in range(40):
        await enqueue(redis, "job", str(i))
    async with running(clients, func(job, name="job"), max_jobs=4):
        await drained(redis)
    assert sorted(runs) == sorted((str(i), 1) for i in range(40))
    assert most == 4


async def test_two_workers_never_run_the_same_job(clients: Clients) -> None:
    redis = clients()
    runs: list[str] = []

    async def job(ctx: dict[str, Any], job_id: str) -> None:
        await asyncio.sleep(0.002)
        runs.append(job_id)

    async with running(clients, func(job, name="job"), max_jobs=3), \
            running(clients, func(job, name="job"), max_jobs=3):
        for i in range(60):
            await enqueue(redis, "job", str(i))
        await drained(redis)
    assert sorted(runs) == sorted(str(i) for i in range(60))


async def test_abort_cancels_a_running_job_and_skips_a_queued_one(clients: Clients) -> None:
    redis = clients()
    started, calls = asyncio.Event(), []

    async def job(ctx: dict[str, Any], job_id: str) -> None:
        calls.append(job_id)
        started.set()
        await asyncio.sleep(30)

    async with running(clients, func(job, name="job"), max_jobs=1) as worker:
        await enqueue(redis, "job", "running")
        await started.wait()
        await enqueue(redis, "job", "queued")
        # what JobStore.cancel does for both: the abort entry, then a wake-up
        await redis.zadd(abort_jobs_ss, {"running": int(time.time() * 1000), "queued": int(time.time() * 1000)})
        await redis.publish(WAKE_CHANNEL, b"1")
        await drained(redis)
        assert worker.jobs_failed == 2
    assert calls == ["running"]


async def test_retry_runs_the_job_again_later_until_its_tries_are_used(clients: Clients) -> None:
    redis = clients()
    tries: list[tuple[int, float]] = []

    async def flaky(ctx: dict[str, Any], job_id: str) -> None:
        tries.append((ctx["job_try"], time.monotonic()))
        raise Retry(defer=0.2)

    async with running(clients, func(flaky, name="flaky", max_tries=3)):
        await enqueue(redis, "flaky", "1")
        await drained(redis)
    assert [t for t, _ in tries] == [1, 2, 3]
    assert all(later - earlier >= 0.19 for (_, earlier), (_, later) in zip(tries, tries[1:], strict=False))


async def test_expired_and_unknown_jobs_are_dropped(clients: Clients) -> None:
    redis = clients()
    async def job(ctx: dict[str, Any], job_id: str) -> None:
        raise AssertionError("not to be run")

    async with running(clients, func(job, name="job")) as worker:
        await enqueue(redis, "job", "expired", payload=False)
        await enqueue(redis, "nothing-by-that-name", "unknown")
        await drained(redis)
        assert worker.jobs_failed == 2


async def test_a_job_cut_short_by_shutdown_is_left_queued_for_the_next_worker(clients: Clients) -> None:
    redis = clients()
    tries: list[int] = []
    started = asyncio.Event()

    async def job(ctx: dict[str, Any], job_id: str) -> None:
        tries.append(ctx["job_try"])
        started.set()
        if ctx["job_try"] == 1:
            await asyncio.sleep(30)

    async with running(clients, func(job, name="job")):
        await enqueue(redis, "job", "1")
        await started.wait()
    # released at once (not after the lease), still queued, its try counted
    assert not await redis.exists(in_progress_key_prefix + "1")
    assert await redis.zcard(QUEUE) == 1 and await redis.get(retry_key_prefix + "1") == b"1"
    async with running(clients, func(job, name="job")):
        await drained(redis)
    assert tries == [1, 2]
