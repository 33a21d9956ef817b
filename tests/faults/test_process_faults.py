"""Process faults beyond one job: a front end stopped with requests in flight, and a worker killed while it
holds several jobs of a batch. Nothing accepted is lost, nothing runs to a second result, usage is recorded
once per job."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.faults.harness import AUTH, CLIENT_TIMEOUT, Cluster, running_cluster

SLOW = {"steps": 10, "step_delay": 0.1}  # a job takes about a second


def slow_config() -> dict[str, Any]:
    return {
        "providers": {"slow": {"type": "local", "options": SLOW}, "local": {"type": "local", "options": {}},
                      "slower": {"type": "local", "options": {**SLOW, "steps": 100}}},
        "models": {name: {"family": "generic", "deployments": [{"provider": name}]}
                   for name in ("slow", "local", "slower")},
    }


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("processes"), slow_config(), workers=2,
                         env={"IMAGEGW_WORKER_CONCURRENCY": "4"}) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        yield session


async def generate(http: aiohttp.ClientSession, url: str, index: int) -> tuple[int, dict[str, Any]]:
    async with http.post(url + "/v1/images/generations", headers=AUTH,
                         json={"prompt": f"in flight {index}", "model": "slow", "size": "64x64"}) as resp:
        return resp.status, await resp.json()


async def running_jobs(cluster: Cluster, count: int, within: float = 20) -> set[str]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        records = cluster.job_records()
        running = {job_id for job_id, record in records.items() if record.get("status") == "running"}
        if len(running) >= count:
            return running
        await asyncio.sleep(0.02)
    raise AssertionError(f"{count} jobs never ran at once")


async def test_sigterm_to_a_front_end_finishes_its_in_flight_requests(cluster: Cluster,
                                                                      http: aiohttp.ClientSession) -> None:
    front_end = cluster.processes.procs[0]
    in_flight = [asyncio.create_task(generate(http, cluster.url, i)) for i in range(3)]
    await running_jobs(cluster, 3)
    front_end.send_signal(signal.SIGTERM)
    answers = await asyncio.gather(*in_flight)
    assert [status for status, _ in answers] == [200] * 3, answers
    assert all(body["data"][0]["b64_json"] for _, body in answers)
    assert await asyncio.to_thread(front_end.wait, 20) == 0
    ledger = await cluster.settled(set(), 3)
    assert set(ledger.statuses.values()) == {"succeeded"}
    # a front end started in its place serves the same cluster
    port = int(cluster.url.rsplit(":", 1)[1])
    cluster.processes.start("serve", "--port", str(port))
    deadline = time.monotonic() + 30
    while True:
        try:
            await cluster.still_serves(http, "local")
            break
        except aiohttp.ClientConnectionError:
            assert time.monotonic() < deadline, "the new front end never came up"
            await asyncio.sleep(0.1)


async def test_a_worker_killed_holding_several_jobs_loses_none_and_doubles_none(
        cluster: Cluster, http: aiohttp.ClientSession) -> None:
    victim = cluster.processes.procs[1]
    accepted = [await cluster.submit_async(http, "slow") for _ in range(10)]
    await running_jobs(cluster, 5)  # both workers busy: the victim holds some of them
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    for job_id in accepted:
        assert (await cluster.wait_status(http, job_id, {"succeeded", "failed", "cancelled"}))["status"] \
            == "succeeded"
    ledger = await cluster.settled(set(), 10)
    attempts = sorted(int(record["attempts"]) for record in ledger.records.values())
    # the victim's jobs (one to four of them) ran again on the surviving worker, every other job ran once
    assert attempts.count(2) >= 1 and set(attempts) <= {1, 2}, attempts
    await cluster.still_serves(http, "local")


async def test_a_job_whose_workers_keep_dying_fails_after_three_starts(cluster: Cluster,
                                                                       http: aiohttp.ClientSession) -> None:
    job_id = await cluster.submit_async(http, "slower")
    for attempt in (1, 2, 3):
        deadline = time.monotonic() + 30
        while (record := cluster.job_records()[job_id]).get("attempts") != str(attempt) \
                or record["status"] != "running":
            assert time.monotonic() < deadline, f"start {attempt} never came: {record}"
            await asyncio.sleep(0.02)
        for worker in cluster.processes.procs[1:]:  # whoever runs it, and any other worker, dies
            if worker.poll() is None:
                worker.send_signal(signal.SIGKILL)
                worker.wait()
        cluster.processes.start("worker")
    job = await cluster.wait_status(http, job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
    ledger = await cluster.settled(set(), 1)
    assert ledger.records[job_id]["attempts"] == "3"  # the fourth start only recorded the failure
    await cluster.still_serves(http, "local")
