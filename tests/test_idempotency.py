"""`Idempotency-Key`: one job per key and body, whatever the timing of the retries."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from service.constants import JOB_KEY
from service.settings import GatewayConfig
from service.state import REDIS
from tests.conftest import Gateway, GatewayFactory, local_config


def keyed_config(**options: Any) -> GatewayConfig:
    return GatewayConfig.model_validate({**local_config(**options).model_dump(), "keys": [
        {"name": "alice", "key": "sk-alice"}, {"name": "bob", "key": "sk-bob"},
        {"name": "tight", "key": "sk-tight", "limits": {"concurrent_jobs": 1}}]})


async def post(http: aiohttp.ClientSession, gw: Gateway, body: dict[str, Any], key: str = "sk-alice",
               idempotency: str | None = "retry-1", asynchronous: bool = True) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency is not None:
        headers["Idempotency-Key"] = idempotency
    if asynchronous:
        headers["Prefer"] = "respond-async"
    async with http.post(gw.url + "/v1/images/generations", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def job_count(gw: Gateway) -> int:
    return len([k async for k in gw.app[REDIS].scan_iter(JOB_KEY.format("*"))])


async def test_concurrent_identical_requests_make_one_job(gateway_factory: GatewayFactory,
                                                          http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=keyed_config(steps=4, step_delay=0.05))
    body = {"prompt": "a lantern", "size": "64x64"}
    answers = await asyncio.gather(*(post(http, gw, body) for _ in range(8)))
    assert {status for status, _ in answers} == {202}
    assert len({job["id"] for _, job in answers}) == 1
    assert await job_count(gw) == 1

    # synchronous retries race too, and all get the same images of that one job
    sync = await asyncio.gather(*(post(http, gw, body, idempotency="retry-2", asynchronous=False) for _ in range(4)))
    assert {status for status, _ in sync} == {200}
    assert len({answer["data"][0]["b64_json"] for _, answer in sync}) == 1
    assert await job_count(gw) == 2
    # and a later retry, once the job is long done, gets the same again without a new job
    status, again = await post(http, gw, body, idempotency="retry-2", asynchronous=False)
    assert status == 200 and again == sync[0][1]
    status, job = await post(http, gw, body, idempotency="retry-2")
    assert status == 202 and job["status"] == "succeeded" and job["result"] == again
    assert await job_count(gw) == 2
    await gw.idle()


async def test_same_key_other_body_is_a_conflict_and_keys_are_per_caller(gateway_factory: GatewayFactory,
                                                                         http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=keyed_config())
    status, first = await post(http, gw, {"prompt": "one", "size": "64x64"})
    assert status == 202
    status, body = await post(http, gw, {"prompt": "two", "size": "64x64"})
    assert status == 409 and body["error"]["code"] == "idempotency_key_reused"
    assert body["error"]["param"] == "Idempotency-Key"
    # the same key from another caller is another request entirely
    status, bobs = await post(http, gw, {"prompt": "one", "size": "64x64"}, key="sk-bob")
    assert status == 202 and bobs["id"] != first["id"]
    # no header, no deduplication
    ids = {(await post(http, gw, {"prompt": "one", "size": "64x64"}, idempotency=None))[1]["id"] for _ in range(2)}
    assert len(ids) == 2 and await job_count(gw) == 4
    status, body = await post(http, gw, {"prompt": "one", "size": "64x64"}, idempotency="x" * 256)
    assert status == 400 and body["error"]["code"] == "invalid_idempotency_key"
    await gw.idle()


async def test_a_refused_first_try_leaves_the_key_free(gateway_factory: GatewayFactory,
                                                       http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=keyed_config(steps=10, step_delay=0.05))
    status, busy = await post(http, gw, {"prompt": "busy", "size": "64x64"}, key="sk-tight", idempotency=None)
    assert status == 202
    body = {"prompt": "next", "size": "64x64"}
    status, refused = await post(http, gw, body, key="sk-tight", idempotency="after-429")
    assert status == 429 and refused["error"]["code"] == "rate_limit_exceeded"
    for _ in range(200):  # the busy job ends and gives its slot back
        status, retried = await post(http, gw, body, key="sk-tight", idempotency="after-429")
        if status == 202:
            break
        await asyncio.sleep(0.05)
    assert status == 202 and retried["id"] != busy["id"]
    status, replay = await post(http, gw, body, key="sk-tight", idempotency="after-429")
    assert status == 202 and replay["id"] == retried["id"]
    await gw.idle()
