"""Worker faults: SIGKILL mid-job and graceful SIGTERM. Every accepted job ends in exactly one terminal state."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp

from tests.conftest import Processes, RedisServer
from tests.faults.conftest import AUTH, start_cluster


async def test_killed_worker_job_is_rerun_and_sync_client_gets_answer(
    processes: Processes, own_redis: RedisServer, tmp_path: Path
) -> None:
    cluster = await start_cluster(processes, own_redis, tmp_path, workers=1)
    victim = processes.procs[-1]
    async with aiohttp.ClientSession() as http:
        sync = asyncio.create_task(http.post(cluster.url + "/v1/images/generations", headers=AUTH,
                                             json={"prompt": "survive", "size": "64x64"}))
        for _ in range(200):  # wait until the victim is running the job
            records = cluster.job_records()
            if records and next(iter(records.values())).get("status") == "running":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the job never started")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        cluster.worker()
        resp = await asyncio.wait_for(sync, 60)
        body = await resp.json()
        assert resp.status == 200, body
        assert body["data"][0]["b64_json"]
        (job_id, record), = cluster.job_records().items()
        assert record["status"] == "succeeded" and record["attempts"] == "2"
        # the service keeps serving
        assert (await cluster.wait_status(http, await cluster.submit_async(http, "fast"), {"succeeded"}))


async def test_sigterm_lets_the_running_job_finish_and_takes_no_new_one(
    processes: Processes, own_redis: RedisServer, tmp_path: Path
) -> None:
    cluster = await start_cluster(processes, own_redis, tmp_path, workers=1)
    worker = processes.procs[-1]
    async with aiohttp.ClientSession() as http:
        running = await cluster.submit_async(http)
        await cluster.wait_status(http, running, {"running"})
        worker.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        later = await cluster.submit_async(http, "fast")
        assert (await cluster.wait_status(http, running, {"succeeded", "failed", "cancelled"}))["status"] == "succeeded"
        assert await asyncio.to_thread(worker.wait, 30) == 0
        await asyncio.sleep(0.5)
        assert (await cluster.job(http, later))["status"] == "queued"  # the stopping worker did not take it
        cluster.worker()
        assert (await cluster.wait_status(http, later, {"succeeded"}))["status"] == "succeeded"
