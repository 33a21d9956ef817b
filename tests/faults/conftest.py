"""Fault-suite fixtures: a cluster of real processes on a Redis server the test owns and may stop."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as redis_sync

from tests.conftest import Processes, RedisServer, free_port, wait_http

SLOW_CONFIG = """
default_model: slow
providers:
  local:
    type: local
    options: {steps: 20, step_delay: 0.1}
models:
  slow:
    deployments: [{provider: local}]
  fast:
    deployments: [{provider: local}]
keys:
  - {name: alice, key: sk-alice}
"""
AUTH = {"Authorization": "Bearer sk-alice"}
ASYNC = {**AUTH, "Prefer": "respond-async"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with AOF on, that this test alone may stop and restart."""
    server = RedisServer(port=free_port(), dir=tmp_path / "redis", appendonly=True)
    server.dir.mkdir()
    server.start()
    yield server
    server.stop()


@dataclass
class Cluster:
    url: str
    processes: Processes
    redis: RedisServer

    def worker(self) -> Any:
        return self.processes.start("worker")

    def job_records(self) -> dict[str, dict[str, str]]:
        client = redis_sync.Redis(port=self.redis.port, decode_responses=True)
        return {key.split(":")[-1]: client.hgetall(key) for key in client.scan_iter("imagegw:job:*")}

    async def job(self, http: aiohttp.ClientSession, job_id: str) -> dict[str, Any]:
        async with http.get(f"{self.url}/v1/images/jobs/{job_id}", headers=AUTH) as resp:
            assert resp.status == 200
            return await resp.json()  # type: ignore[no-any-return]

    async def submit_async(self, http: aiohttp.ClientSession, model: str = "slow") -> str:
        async with http.post(self.url + "/v1/images/generations", headers=ASYNC,
                             json={"prompt": "fault", "size": "64x64", "model": model}) as resp:
            assert resp.status == 202, await resp.text()
            return (await resp.json())["id"]  # type: ignore[no-any-return]

    async def wait_status(self, http: aiohttp.ClientSession, job_id: str, statuses: set[str],
                          timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = await self.job(http, job_id)
            if job["status"] in statuses:
                return job
            await asyncio.sleep(0.05)
        raise AssertionError(f"job {job_id} never reached {statuses}: {json.dumps(job)[:300]}")


async def start_cluster(processes: Processes, redis: RedisServer, tmp_path: Path, *, workers: int,
                        env: dict[str, str] | None = None) -> Cluster:
    config = tmp_path / "imagegw.yaml"
    config.write_text(SLOW_CONFIG)
    processes.env.update({"IMAGEGW_REDIS_URL": redis.url, "IMAGEGW_CONFIG": str(config),
                          "IMAGEGW_JOB_LEASE": "2", "IMAGEGW_WORKER_GRACE": "20", **(env or {})})
    port = free_port()
    processes.start("serve", "--port", str(port))
    cluster = Cluster(url=f"http://127.0.0.1:{port}", processes=processes, redis=redis)
    for _ in range(workers):
        cluster.worker()
    await wait_http(cluster.url + "/healthz")
    return cluster
