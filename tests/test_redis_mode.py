"""Redis mode with real processes: one front end, two `imagegw worker`s, a real redis-server."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from PIL import Image

from tests.conftest import Processes, free_port, wait_http
from tests.test_jobs import Subscriber, assert_monotonic_then_completed

CONFIG = """
default_model: imagegw-local
providers:
  local:
    type: local
    options: {steps: 8, step_delay: 0.01}
models:
  imagegw-local:
    deployments: [{provider: local}]
keys:
  - {name: alice, key: sk-alice}
  - {name: bob, key: sk-bob}
"""


async def start_cluster(processes: Processes, tmp_path: Path, redis_url: str, workers: int = 2) -> str:
    config = tmp_path / "imagegw.yaml"
    config.write_text(CONFIG)
    processes.env.update({"IMAGEGW_REDIS_URL": redis_url, "IMAGEGW_CONFIG": str(config)})
    port = free_port()
    processes.start("serve", "--port", str(port))
    for _ in range(workers):
        processes.start("worker")
    url = f"http://127.0.0.1:{port}"
    await wait_http(url + "/healthz")
    if not workers:
        return url
    async with aiohttp.ClientSession() as http:
        for _ in range(100):  # ready once the workers have reported in
            async with http.get(url + "/readyz") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("workers never became ready")
    return url


async def test_fifty_mixed_requests_on_two_workers(processes: Processes, tmp_path: Path, redis_url: str) -> None:
    url = await start_cluster(processes, tmp_path, redis_url)
    alice, bob = Subscriber(url, "sk-alice"), Subscriber(url, "sk-bob")
    await alice.connect()
    await bob.connect()
    try:
        async with aiohttp.ClientSession() as http:

            async def one(i: int) -> tuple[str, str]:
                key = "sk-alice" if i % 2 else "sk-bob"
                headers = {"Authorization": f"Bearer {key}"}
                if i % 3 == 0:
                    headers["Prefer"] = "respond-async"
                body = {"prompt": f"job {i}", "size": "96x64", "output_format": "jpeg" if i % 4 else "png"}
                async with http.post(url + "/v1/images/generations", json=body, headers=headers) as resp:
                    data = await resp.json()
                    if i % 3 == 0:
                        assert resp.status == 202, data
                        (alice if key == "sk-alice" else bob).finished.setdefault(data["id"], asyncio.Event())
                        await (alice if key == "sk-alice" else bob).subscribe(data["id"])
                        return key, data["id"]
                    assert resp.status == 200, data
                    image = Image.open(io.BytesIO(base64.b64decode(data["data"][0]["b64_json"])))
                    assert image.size == (96, 64)
                    return key, ""

            results = await asyncio.gather(*(one(i) for i in range(50)))
        async_jobs = [(key, job) for key, job in results if job]
        assert len(async_jobs) == 17
        for key, job in async_jobs:
            sub = alice if key == "sk-alice" else bob
            assert_monotonic_then_completed(await sub.wait(job))
        # each subscriber saw only its own key's jobs
        alice_jobs = {job for key, job in async_jobs if key == "sk-alice"}
        assert set(alice.events) == alice_jobs
        assert set(bob.events) == {job for key, job in async_jobs if key == "sk-bob"}
    finally:
        await alice.client.disconnect()
        await bob.client.disconnect()
    # nothing left behind in the queue
    client = aioredis.from_url(redis_url)
    try:
        assert await client.zcard("imagegw:queue") == 0
    finally:
        await client.aclose()


async def test_worker_started_after_enqueue_picks_up_the_backlog(processes: Processes, tmp_path: Path,
                                                                 redis_url: str) -> None:
    url = await start_cluster(processes, tmp_path, redis_url, workers=0)
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": "Bearer sk-alice", "Prefer": "respond-async"}
        ids = []
        for i in range(5):
            async with http.post(url + "/v1/images/generations", json={"prompt": str(i), "size": "32x32"},
                                 headers=headers) as resp:
                ids.append((await resp.json())["id"])
        processes.start("worker")
        for job_id in ids:
            for _ in range(300):
                async with http.get(f"{url}/v1/images/jobs/{job_id}", headers=headers) as resp:
                    job = await resp.json()
                if job["status"] == "succeeded":
                    break
                await asyncio.sleep(0.05)
            assert job["status"] == "succeeded"
