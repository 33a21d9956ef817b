"""Usage and cost: priced like upstreams bill, recorded once per job whatever happens to the job function,
reported per key (admins: all keys) with filters."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from arq.constants import job_key_prefix
from arq.jobs import serialize_job

from service.constants import JOB_FUNCTION, WAKE_CHANNEL
from service.jobs import JobRecord, StoredImage, StoredResult, json_serializer
from service.schemas import ImageSpec
from service.settings import GatewayConfig, ModelPrice
from service.state import REDIS, STORE
from service.usage import Tokens, estimate_cost, token_counts
from tests.conftest import Gateway, GatewayFactory, local_config
from tests.fakes.openai import API_KEY, FakeOpenAI

PRICING = {
    "imagegw-local": {"per_image": {"64x64": {"*": 0.01}, "*": {"*": 0.02}}},
    "dall-e-3": {"per_image": {"1024x1024": {"standard": 0.04, "hd": 0.08}}},
}


def priced_config(**options: Any) -> GatewayConfig:
    return GatewayConfig.model_validate({**local_config(**options).model_dump(), "pricing": PRICING, "keys": [
        {"name": "alice", "key": "sk-alice"}, {"name": "bob", "key": "sk-bob"}]})


def test_prices_follow_how_upstreams_bill() -> None:
    price = ModelPrice.model_validate({
        "per_million_tokens": {"text_input": 5, "image_input": 10, "image_output": 40},
        "per_image": {"1024x1024": {"low": 0.011, "*": 0.042}, "*": {"high": 0.25}},
    })
    # gpt-image-1's usage: input split into text and image tokens, output all image tokens
    tokens = token_counts({"input_tokens": 150, "output_tokens": 4160, "total_tokens": 4310,
                           "input_tokens_details": {"text_tokens": 50, "image_tokens": 100}})
    assert tokens == Tokens(text_input_tokens=50, image_input_tokens=100, image_output_tokens=4160)
    assert estimate_cost(price, 1, "1024x1024", "high", tokens) == pytest.approx(
        (50 * 5 + 100 * 10 + 4160 * 40) / 1e6)
    # without token usage: per image, by size then quality, "*" matching the rest
    assert estimate_cost(price, 3, "1024x1024", "low", Tokens()) == pytest.approx(0.033)
    assert estimate_cost(price, 2, "1024x1024", "medium", Tokens()) == pytest.approx(0.084)
    assert estimate_cost(price, 1, "1536x1024", "high", Tokens()) == pytest.approx(0.25)
    assert estimate_cost(price, 1, "1536x1024", "low", Tokens()) is None  # no price for it: unknown, not free
    assert estimate_cost(None, 1, "1024x1024", "low", Tokens()) is None
    assert estimate_cost(price, 0, "1024x1024", "low", Tokens()) == 0.0
    # chat-style names, and output with its own breakdown
    assert token_counts({"prompt_tokens": 7, "completion_tokens": 9}) == Tokens(text_input_tokens=7,
                                                                                image_output_tokens=9)
    assert token_counts({"input_tokens": 3, "output_tokens": 10, "output_tokens_details": {
        "text_tokens": 4, "image_tokens": 6}}) == Tokens(text_input_tokens=3, text_output_tokens=4,
                                                         image_output_tokens=6)


async def generate(http: aiohttp.ClientSession, gw: Gateway, key: str, **body: Any) -> None:
    async with http.post(gw.url + "/v1/images/generations", json={"prompt": "usage", **body},
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200, await resp.text()


async def usage(http: aiohttp.ClientSession, gw: Gateway, caller: str, **params: Any) -> dict[str, Any]:
    async with http.get(gw.url + "/v1/usage", params=params, headers={"Authorization": f"Bearer {caller}"}) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body


async def test_usage_report_per_key_and_for_admins(gateway_factory: GatewayFactory,
                                                   http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=priced_config(), admin_token="usage-admin")
    await generate(http, gw, "sk-alice", size="64x64", n=3)
    await generate(http, gw, "sk-alice", size="96x64")
    await generate(http, gw, "sk-alice", model="dall-e-3", size="1024x1024", quality="hd")
    await generate(http, gw, "sk-bob", size="64x64", n=2)

    mine = await usage(http, gw, "sk-alice")
    today = dt.datetime.now(dt.UTC).date().isoformat()
    expected = {"jobs": 3, "images": 5, "pixels": 3 * 64 * 64 + 96 * 64 + 1024 * 1024,
                "cost": pytest.approx(0.03 + 0.02 + 0.08), "text_input_tokens": 0, "image_input_tokens": 0,
                "image_output_tokens": 0, "text_output_tokens": 0}
    assert mine["key"] == "alice" and mine["totals"] == expected
    assert mine["data"] == [{"date": today, **expected}]
    only_dalle = await usage(http, gw, "sk-alice", model="dall-e-3")
    assert only_dalle["totals"]["images"] == 1 and only_dalle["totals"]["cost"] == pytest.approx(0.08)
    later = await usage(http, gw, "sk-alice", start=time.time() + 60)
    assert later["totals"]["jobs"] == 0 and later["data"] == []
    earlier = await usage(http, gw, "sk-alice", end=(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat())
    assert earlier["totals"]["jobs"] == 0
    window = await usage(http, gw, "sk-alice", start=today, end=time.time() + 1)
    assert window["totals"]["jobs"] == 3

    everyone = await usage(http, gw, "usage-admin")
    assert "key" not in everyone and everyone["totals"]["jobs"] == 4 and everyone["totals"]["images"] == 7
    assert everyone["totals"]["cost"] == pytest.approx(0.13 + 0.02)
    bobs = await usage(http, gw, "usage-admin", key="bob")
    assert bobs["totals"]["images"] == 2 and bobs["totals"]["cost"] == pytest.approx(0.02)
    async with http.get(gw.url + "/v1/usage", params={"start": "yesterday"},
                        headers={"Authorization": "Bearer sk-bob"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "start"
    await gw.idle()


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


async def test_token_usage_from_the_upstream_is_priced_per_token(gateway_factory: GatewayFactory,
                                                                 http: aiohttp.ClientSession, fake: FakeOpenAI,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USAGE_TEST_OPENAI_KEY", API_KEY)
    config = GatewayConfig.model_validate({
        "providers": {"oa": {"type": "openai", "base_url": fake.base_url, "api_key_env": "USAGE_TEST_OPENAI_KEY"}},
        "models": {"gpt-image-1": {"family": "gpt-image", "deployments": [{"provider": "oa"}]}},
        "pricing": {"gpt-image-1": {"per_million_tokens": {"text_input": 5, "image_input": 10,
                                                           "image_output": 40}}},
        "keys": [{"name": "alice", "key": "sk-alice"}],
    })
    gw = await gateway_factory(config=config)
    await generate(http, gw, "sk-alice", model="gpt-image-1", prompt="four words of prompt", n=2,
                   size="1024x1024", quality="low")
    report = await usage(http, gw, "sk-alice")
    # the fake bills a token per prompt word and 272 image tokens per image, as gpt-image-1 at low quality
    assert report["totals"] == {"jobs": 1, "images": 2, "pixels": 2 * 1024 * 1024, "text_input_tokens": 4,
                                "image_input_tokens": 0, "image_output_tokens": 544, "text_output_tokens": 0,
                                "cost": pytest.approx((4 * 5 + 544 * 40) / 1e6)}
    assert len(fake.image_calls) == 1
    await gw.idle()


async def rerun(gw: Gateway, job_id: str, owner: str = "key:alice") -> None:
    """What arq does with a job whose worker died: run the job function again, then wait until it ran."""
    redis, now = gw.app[REDIS], int(time.time() * 1000)
    payload = serialize_job(JOB_FUNCTION, (job_id, owner, 600.0), {}, None, now, serializer=json_serializer)
    await redis.psetex(job_key_prefix + job_id, 60_000, payload)
    await redis.zadd(gw.settings.queue_name, {job_id: now})
    await redis.publish(WAKE_CHANNEL, b"1")
    for _ in range(500):
        if not await redis.exists(job_key_prefix + job_id):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} was not run again")


async def test_usage_is_recorded_once_even_when_the_job_function_runs_again(
        gateway_factory: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=priced_config())
    async with http.post(gw.url + "/v1/images/generations", json={"prompt": "once", "size": "64x64", "n": 2},
                         headers={"Authorization": "Bearer sk-alice", "Prefer": "respond-async"}) as resp:
        job_id = (await resp.json())["id"]
    for _ in range(500):
        record = await gw.app[STORE].get(job_id)
        if record is not None and record.terminal:
            break
        await asyncio.sleep(0.01)
    await rerun(gw, job_id)
    await rerun(gw, job_id)
    report = await usage(http, gw, "sk-alice")
    assert (report["totals"]["jobs"], report["totals"]["images"]) == (1, 2)

    # a job that ended without being settled (a front end that died between cancelling a job and settling
    # it): a re-run settles it, once
    store = gw.app[STORE]
    spec = ImageSpec(model="imagegw-local", prompt="orphan", size="64x64", n=3)
    now = time.time()
    orphan = JobRecord(id="f" * 32, owner="key:alice", model="imagegw-local", spec=spec, created_at=now,
                       status="succeeded", started_at=now, finished_at=now, result=StoredResult(
                           created=int(now), size="64x64", provider="local",
                           images=[StoredImage(name="f" * 32 + "/0.png")]))
    await gw.app[REDIS].hset(store.key(orphan.id), mapping=orphan.to_hash())  # type: ignore[misc]
    await rerun(gw, orphan.id)
    await rerun(gw, orphan.id)
    report = await usage(http, gw, "sk-alice")
    assert (report["totals"]["jobs"], report["totals"]["images"]) == (2, 3)
    assert report["totals"]["cost"] == pytest.approx(0.03)
    await gw.idle()
