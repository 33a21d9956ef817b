"""Redis restarts under the gateway: queued jobs survive (AOF), nothing needs a restart, outages fail fast."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from tests.conftest import Processes, RedisServer
from tests.faults.conftest import AUTH, start_cluster


async def test_queued_jobs_survive_a_redis_restart(processes: Processes, own_redis: RedisServer,
                                                   tmp_path: Path) -> None:
    cluster = await start_cluster(processes, own_redis, tmp_path, workers=0)
    async with aiohttp.ClientSession() as http:
        accepted = [await cluster.submit_async(http, "fast") for _ in range(5)]
        own_redis.stop()  # SIGTERM: redis writes its AOF and exits

        started = time.monotonic()
        async with http.post(cluster.url + "/v1/images/generations", headers=AUTH,
                             json={"prompt": "during outage", "size": "64x64"}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"]
            assert (await resp.json())["error"]["code"] == "service_unavailable"
        assert time.monotonic() - started < 5  # fails fast, does not hang
        async with http.get(cluster.url + "/healthz") as resp:
            assert resp.status == 200  # the process itself is fine
        async with http.get(cluster.url + "/readyz") as resp:
            assert resp.status == 503

        own_redis.start()
        cluster.worker()
        for job_id in accepted:
            assert (await cluster.wait_status(http, job_id, {"succeeded", "failed", "cancelled"}))["status"] \
                == "succeeded"
        # the same front end serves synchronous requests again without a restart
        async with http.post(cluster.url + "/v1/images/generations", headers=AUTH,
                             json={"prompt": "after", "size": "64x64", "model": "fast"}) as resp:
            assert resp.status == 200, await resp.text()
    assert {r["status"] for r in cluster.job_records().values()} == {"succeeded"}
    assert len(cluster.job_records()) == 6


async def test_worker_survives_a_redis_restart(processes: Processes, own_redis: RedisServer,
                                               tmp_path: Path) -> None:
    cluster = await start_cluster(processes, own_redis, tmp_path, workers=1)
    worker = processes.procs[-1]
    async with aiohttp.ClientSession() as http:
        first = await cluster.submit_async(http, "fast")
        await cluster.wait_status(http, first, {"succeeded"})
        own_redis.stop()
        await asyncio.sleep(1.5)
        own_redis.start()
        assert worker.poll() is None  # still alive
        for _ in range(50):
            try:
                job_id = await cluster.submit_async(http, "fast")
                break
            except AssertionError:
                await asyncio.sleep(0.2)
        assert (await cluster.wait_status(http, job_id, {"succeeded", "failed"}))["status"] == "succeeded"
