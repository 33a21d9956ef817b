"""Overload: a burst many times the cluster's capacity. The excess is refused at once with 429/503 and
Retry-After (nothing queues up in memory), every accepted job finishes, and health checks stay fast."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.faults.harness import AUTH, CLIENT_TIMEOUT, Cluster, rss_kib, running_cluster

CONCURRENCY = 2  # jobs the one worker runs at once
QUEUE_CAP = 4  # jobs allowed to wait
CAPACITY = CONCURRENCY + QUEUE_CAP
BOB = {"Authorization": "Bearer sk-bob"}
BOB_CONCURRENT_JOBS = 2


def overload_config() -> dict[str, Any]:
    return {
        "keys": [{"name": "alice", "key": AUTH["Authorization"].removeprefix("Bearer ")},
                 {"name": "bob", "key": "sk-bob", "limits": {"concurrent_jobs": BOB_CONCURRENT_JOBS}}],
        "providers": {"local": {"type": "local", "options": {"steps": 4, "step_delay": 0.05}}},
        "models": {"local": {"family": "generic", "deployments": [{"provider": "local"}]}},
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = {"IMAGEGW_WORKER_CONCURRENCY": str(CONCURRENCY), "IMAGEGW_MAX_QUEUE_DEPTH": str(QUEUE_CAP),
           "IMAGEGW_LOG_LEVEL": "WARNING"}
    with running_cluster(tmp_path_factory.mktemp("overload"), overload_config(), env=env) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # no connection cap: the burst really arrives at once
    unlimited = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT, connector=unlimited) as session:
        yield session


def probe_health(url: str, stop: threading.Event) -> list[float]:
    """Latencies of back-to-back /healthz calls until `stop` is set, from a thread and event loop of its own:
    the burst's hundreds of clients on the test's loop must not hold up the probe's reads."""
    async def probe() -> list[float]:
        latencies = []
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
            while not stop.is_set():
                started = time.perf_counter()
                async with http.get(url + "/healthz") as resp:
                    assert resp.status == 200
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.01)
        return latencies

    return asyncio.run(probe())


async def request(http: aiohttp.ClientSession, url: str, headers: dict[str, str], index: int
                  ) -> tuple[int, dict[str, Any], str | None]:
    body = {"prompt": f"burst {index} " + "x" * 2000, "model": "local", "size": "64x64"}
    async with http.post(url + "/v1/images/generations", headers=headers, json=body) as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After")


async def burst(http: aiohttp.ClientSession, cluster: Cluster, alice: int, bob: int
                ) -> list[tuple[str, int, dict[str, Any], str | None]]:
    calls = [("alice", request(http, cluster.url, AUTH, i)) for i in range(alice)]
    calls += [("bob", request(http, cluster.url, BOB, i)) for i in range(bob)]
    answers = await asyncio.gather(*(call for _, call in calls))
    return [(who, *answer) for (who, _), answer in zip(calls, answers, strict=True)]


async def test_a_burst_far_beyond_capacity_is_shed_with_retry_after_and_accepted_jobs_finish(
        cluster: Cluster, http: aiohttp.ClientSession) -> None:
    front_end = cluster.processes.procs[0]
    warm_up = await burst(http, cluster, alice=QUEUE_CAP, bob=0)  # code paths loaded, pools opened
    assert [status for _, status, _, _ in warm_up] == [200] * QUEUE_CAP
    await cluster.settled(set(), QUEUE_CAP)
    rss_before = rss_kib(front_end.pid)
    before = cluster.job_ids()

    stop = threading.Event()
    prober = asyncio.create_task(asyncio.to_thread(probe_health, cluster.url, stop))
    await asyncio.sleep(0.2)
    # bob's burst first, while the queue has room, so that his own limit is what refuses him
    answers = await burst(http, cluster, alice=0, bob=20)
    answers += await burst(http, cluster, alice=15 * CAPACITY, bob=0)
    stop.set()
    latencies = await prober

    counts = Counter((who, status) for who, status, _, _ in answers)
    assert set(counts) <= {("alice", 200), ("alice", 503), ("bob", 200), ("bob", 429), ("bob", 503)}, counts
    for who, status, body, retry_after in answers:
        if status == 200:
            assert body["data"][0]["b64_json"]
            continue
        assert retry_after is not None and int(retry_after) >= 1, (who, status, body)
        expected = "queue_full" if status == 503 else "rate_limit_exceeded"
        assert body["error"]["code"] == expected, body
    accepted = counts["alice", 200] + counts["bob", 200]
    refused = len(answers) - accepted
    # capacity 6, plus what finished while the burst was arriving: most of it must have been refused
    assert refused >= len(answers) * 3 // 4, counts
    assert counts["alice", 503] > 0 and counts["bob", 429] > 0, counts

    ledger = await cluster.settled(before, accepted)
    assert set(ledger.statuses.values()) == {"succeeded"}

    # refusals cost nothing to keep: the front end holds no queue of its own
    assert rss_kib(front_end.pid) - rss_before < 20 * 1024
    assert len(latencies) >= 5
    p95 = statistics.quantiles(latencies, n=20)[-1]
    assert p95 < 0.1, f"/healthz p95 {p95 * 1000:.0f} ms during the burst"

    # the excess retried after Retry-After gets in
    await asyncio.sleep(1)
    await cluster.still_serves(http, "local")
