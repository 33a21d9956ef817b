"""Per-key limits and the queue cap, enforced in Redis: exact across several real front-end processes."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import GatewayFactory, Processes, free_port, local_config, wait_http

ADMIN = "limits-admin"
CONFIG = """
default_model: imagegw-local
providers:
  local: {type: local, options: {steps: 10, step_delay: 0.08}}
models:
  imagegw-local: {deployments: [{provider: local}]}
"""


async def start_front_ends(processes: Processes, tmp_path: Path, redis_url: str, count: int,
                           **env: str) -> list[str]:
    config = tmp_path / "limits.yaml"
    config.write_text(CONFIG)
    processes.env.update({"IMAGEGW_REDIS_URL": redis_url, "IMAGEGW_CONFIG": str(config),
                          "IMAGEGW_ADMIN_TOKEN": ADMIN, **env})
    urls = []
    for _ in range(count):
        port = free_port()
        processes.start("serve", "--port", str(port))
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        await wait_http(url + "/healthz")
    return urls


async def new_key(http: aiohttp.ClientSession, url: str, **fields: Any) -> str:
    async with http.post(url + "/admin/keys", json={"name": "limited", **fields},
                         headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
        assert resp.status == 201
        key: str = (await resp.json())["key"]
        return key


async def submit(http: aiohttp.ClientSession, url: str, key: str, n: int = 1) -> tuple[int, dict[str, Any],
                                                                                        dict[str, str]]:
    async with http.post(url + "/v1/images/generations", json={"prompt": "limit", "size": "64x64", "n": n},
                         headers={"Authorization": f"Bearer {key}", "Prefer": "respond-async"}) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def hammer(http: aiohttp.ClientSession, urls: list[str], key: str, count: int,
                 n: int = 1) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
    """`count` concurrent requests spread over every front end."""
    spread = itertools.cycle(urls)
    return await asyncio.gather(*(submit(http, next(spread), key, n) for _ in range(count)))


def assert_rate_limited(answers: list[tuple[int, dict[str, Any], dict[str, str]]], max_wait: int) -> None:
    for status, body, headers in answers:
        assert status == 429, body
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(headers["Retry-After"]) <= max_wait, headers


async def wait_done(http: aiohttp.ClientSession, url: str, key: str, job_ids: list[str]) -> None:
    for job_id in job_ids:
        for _ in range(600):
            async with http.get(url + f"/v1/images/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}) as r:
                if (await r.json())["status"] == "succeeded":
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"job {job_id} did not succeed")


async def test_two_keys_hammered_across_front_ends_get_exactly_their_limits(
        processes: Processes, tmp_path: Path, redis_url: str, http: aiohttp.ClientSession) -> None:
    urls = await start_front_ends(processes, tmp_path, redis_url, 3)
    processes.start("worker")
    five, eight = await new_key(http, urls[0], limits={"requests_per_minute": 5}), \
        await new_key(http, urls[1], limits={"requests_per_minute": 8})
    answers = await asyncio.gather(hammer(http, urls, five, 24), hammer(http, urls, eight, 24))
    for answered, limit in zip(answers, (5, 8), strict=True):
        accepted = [a for a in answered if a[0] == 202]
        assert len(accepted) == limit, [a[0] for a in answered]
        assert_rate_limited([a for a in answered if a[0] != 202], max_wait=60)

    # images per minute counts n; a request that could never fit is a 400 on n
    images = await new_key(http, urls[0], limits={"images_per_minute": 5})
    answered = await hammer(http, urls, images, 9, n=2)
    assert sorted(a[0] for a in answered) == [202] * 2 + [429] * 7
    assert_rate_limited([a for a in answered if a[0] == 429], max_wait=60)
    assert (await submit(http, urls[2], images, n=1))[0] == 202
    assert_rate_limited([await submit(http, urls[1], images, n=1)], max_wait=60)
    status, body, _ = await submit(http, urls[0], images, n=6)
    assert status == 400 and body["error"]["param"] == "n"

    # concurrent jobs: slots come back when the worker ends the jobs
    two = await new_key(http, urls[0], limits={"concurrent_jobs": 2})
    answered = await hammer(http, urls, two, 10)
    accepted = [body["id"] for status, body, _ in answered if status == 202]
    assert len(accepted) == 2
    assert all(headers["Retry-After"] == "1" for status, _, headers in answered if status == 429)
    assert_rate_limited([a for a in answered if a[0] == 429], max_wait=1)
    await wait_done(http, urls[2], two, accepted)
    answered = await hammer(http, urls, two, 4)
    assert sorted(a[0] for a in answered) == [202, 202, 429, 429]


async def test_queue_cap_answers_503_and_drops_nothing_accepted(
        processes: Processes, tmp_path: Path, redis_url: str, http: aiohttp.ClientSession) -> None:
    urls = await start_front_ends(processes, tmp_path, redis_url, 2, IMAGEGW_MAX_QUEUE_DEPTH="3")
    key = await new_key(http, urls[0])
    answered = await hammer(http, urls, key, 8)
    accepted = [body["id"] for status, body, _ in answered if status == 202]
    assert len(accepted) == 3, [a[0] for a in answered]
    for status, body, headers in answered:
        if status != 202:
            assert status == 503 and body["error"]["code"] == "queue_full" and int(headers["Retry-After"]) >= 1
    processes.start("worker")  # the backlog drains: every accepted job runs
    await wait_done(http, urls[1], key, accepted)
    assert (await submit(http, urls[0], key))[0] == 202


async def test_queued_jobs_and_image_budget(gateway_factory: GatewayFactory, redis_url: str,
                                            http: aiohttp.ClientSession) -> None:
    # Redis mode without a worker: jobs stay queued
    gw = await gateway_factory(config=local_config(), redis_url=redis_url, admin_token=ADMIN)
    queued = await new_key(http, gw.url, limits={"queued_jobs": 2})
    first = [await submit(http, gw.url, queued) for _ in range(3)]
    assert [a[0] for a in first] == [202, 202, 429]
    async with http.delete(gw.url + f"/v1/images/jobs/{first[0][1]['id']}",
                           headers={"Authorization": f"Bearer {queued}"}) as resp:
        assert resp.status == 200
    assert (await submit(http, gw.url, queued))[0] == 202  # the cancelled job's slot is free again

    budget = await new_key(http, gw.url, image_budget=3)
    status, job, _ = await submit(http, gw.url, budget, n=2)
    assert status == 202
    status, body, headers = await submit(http, gw.url, budget, n=2)
    assert status == 429 and body["error"]["code"] == "insufficient_quota" and "Retry-After" not in headers
    async with http.delete(gw.url + f"/v1/images/jobs/{job['id']}",
                           headers={"Authorization": f"Bearer {budget}"}) as resp:
        assert resp.status == 200
    assert (await submit(http, gw.url, budget, n=3))[0] == 202  # a job that made nothing costs nothing
    status, body, _ = await submit(http, gw.url, budget, n=1)
    assert status == 429 and body["error"]["code"] == "insufficient_quota"


@pytest.mark.parametrize("limit", ["requests_per_minute", "images_per_minute", "concurrent_jobs", "queued_jobs"])
async def test_limits_are_validated(gateway_factory: GatewayFactory, http: aiohttp.ClientSession,
                                    limit: str) -> None:
    gw = await gateway_factory(admin_token=ADMIN)
    async with http.post(gw.url + "/admin/keys", json={"name": "x", "limits": {limit: -1}},
                         headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["param"] == f"limits.{limit}"
