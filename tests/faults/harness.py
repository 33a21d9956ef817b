"""What the fault scenarios share: a cluster of real `imagegw` processes that lives for a whole module, fake
upstreams served from a loop thread of their own (so they outlive each test's event loop), and the ledger
every scenario ends with: each accepted job in exactly one terminal state, accounted for once, with its
images stored intact or not at all."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import redis as redis_sync
import yaml
from PIL import Image

from service.constants import JOB_KEY
from service.storage import LocalStorage, UrlSigner
from tests.conftest import Processes, RedisServer, free_port, wait_http
from tests.faults.conftest import AUTH
from tests.faults.conftest import Cluster as ProcessCluster

T = TypeVar("T")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
KEY = AUTH["Authorization"].removeprefix("Bearer ")
# every request of the suite is bounded: a hang is a failure with a message, not the per-test timeout
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=60)


class LoopThread:
    """An event loop running in a daemon thread, for servers that must outlive one test's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fakes", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the thread's loop and wait for it (from synchronous code)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the thread's loop without blocking the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Ledger:
    """What Redis and storage say happened to a set of jobs."""

    statuses: dict[str, str]  # job id -> status
    records: dict[str, dict[str, str]]
    usage: Counter[str]  # job id -> usage records written for it


@dataclass
class Cluster(ProcessCluster):
    """A front end and workers, as real processes, on a Redis server of their own; with the ledger."""

    data_dir: Path

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.redis.port, decode_responses=True)

    def job_ids(self) -> set[str]:
        return {key.rsplit(":", 1)[-1] for key in self.client().scan_iter(JOB_KEY.format("*"))}

    def ledger(self, job_ids: set[str]) -> Ledger:
        client = self.client()
        records = {job_id: client.hgetall(JOB_KEY.format(job_id)) for job_id in job_ids}
        usage: Counter[str] = Counter()
        for key in client.scan_iter("imagegw:usage:*"):
            usage.update(json.loads(member)["job_id"] for member in client.zrange(key, 0, -1))
        statuses = {job_id: record.get("status", "") for job_id, record in records.items()}
        mine = Counter({job_id: usage[job_id] for job_id in job_ids})
        return Ledger(statuses=statuses, records=records, usage=mine)

    def result_files(self, job_id: str) -> list[Path]:
        storage = LocalStorage(self.data_dir / "files", UrlSigner(b"", 1))  # to find files, not to sign
        return [path for path in storage.files(job_id) if path.stem.removeprefix(f"{job_id}-").isdigit()]

    async def settled(self, before: set[str], expected: int, within: float = 30) -> Ledger:
        """The jobs created since `before`, once every one has ended; asserts there are `expected` of them,
        each in one terminal state, with one usage record and its images stored intact (succeeded) or no
        image at all (failed, cancelled)."""
        deadline = time.monotonic() + within
        while True:
            new = self.job_ids() - before
            ledger = self.ledger(new)
            if len(new) >= expected and set(ledger.statuses.values()) <= TERMINAL:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(new)} jobs, {expected} expected, all terminal expected: "
                                     f"{Counter(ledger.statuses.values())}")
            await asyncio.sleep(0.05)
        assert len(new) == expected, f"{len(new)} jobs were created, {expected} requests were accepted"
        # settlement may trail the terminal status by a Redis round trip
        while ledger.usage != Counter(dict.fromkeys(new, 1)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            ledger = self.ledger(new)
        assert ledger.usage == Counter(dict.fromkeys(new, 1)), f"usage records per job: {ledger.usage}"
        for job_id, record in ledger.records.items():
            files = self.result_files(job_id)
            if record["status"] != "succeeded":
                assert not files, f"{record['status']} job {job_id} left images: {files}"
                continue
            assert len(files) == len(json.loads(record["result"])["images"]) > 0
            for path in files:
                with Image.open(io.BytesIO(path.read_bytes())) as image:
                    image.load()  # stored intact, never a truncated upstream answer
        return ledger

    async def still_serves(self, http: aiohttp.ClientSession, model: str) -> None:
        """The front end answers its probes and a healthy model still makes images."""
        async with http.get(self.url + "/healthz") as resp:
            assert resp.status == 200
        async with http.post(self.url + "/v1/images/generations", headers=AUTH,
                             json={"prompt": "still here", "model": model, "size": "64x64"}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["data"][0]["b64_json"]


def rss_kib(pid: int) -> int:
    """A process's resident memory, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """`config` as YAML, with the suite's key unless it brings keys of its own."""
    path.write_text(yaml.safe_dump({"keys": [{"name": "faults", "key": KEY}], **config}))
    return path


@contextmanager
def running_cluster(tmp: Path, config: dict[str, Any], *, workers: int = 1,
                    env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """Redis, one `imagegw serve` and `workers` `imagegw worker` processes on `config`, for a `with` block."""
    redis = RedisServer(port=free_port(), dir=tmp / "redis")
    redis.dir.mkdir()
    redis.start()
    processes = Processes.in_dir(tmp)
    processes.env.update({"IMAGEGW_REDIS_URL": redis.url,
                          "IMAGEGW_CONFIG": str(write_config(tmp / "imagegw.yaml", config)),
                          "IMAGEGW_JOB_LEASE": "2", "IMAGEGW_WORKER_GRACE": "5", **(env or {})})
    try:
        port = free_port()
        processes.start("serve", "--port", str(port))
        for _ in range(workers):
            processes.start("worker")
        cluster = Cluster(url=f"http://127.0.0.1:{port}", processes=processes, redis=redis,
                          data_dir=tmp / "data")
        asyncio.run(wait_http(cluster.url + "/healthz", timeout=60))
        if workers:
            wait_for_a_worker(cluster)
        yield cluster
    finally:
        processes.stop()
        redis.stop()


def wait_for_a_worker(cluster: Cluster, within: float = 60) -> None:
    """arq workers write a health-check key once their loop runs: then jobs get picked up."""
    deadline = time.monotonic() + within
    client = cluster.client()
    while not client.exists("imagegw:queue:health-check"):
        if time.monotonic() > deadline:
            raise TimeoutError("no worker came up")
        time.sleep(0.05)
