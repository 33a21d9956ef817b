"""Routing resilience end to end: the official SDK against the gateway, whose model has deployments on fake
OpenAI upstreams that fail in scripted ways."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from service.settings import GatewayConfig
from tests.conftest import Gateway, GatewayFactory
from tests.fakes.openai import API_KEY, FakeOpenAI

Fakes = tuple[FakeOpenAI, FakeOpenAI]
FAST_RETRY = {"attempts": 3, "backoff": 0.01, "max_backoff": 0.05, "cooldown": 30.0}


@pytest.fixture(autouse=True)
def api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_OPENAI_KEY", API_KEY)
    monkeypatch.setenv("WRONG_OPENAI_KEY", "sk-wrong-0000000000000000")


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    async with FakeOpenAI() as a, FakeOpenAI() as b:
        yield a, b


def routed_config(*upstreams: FakeOpenAI, retry: dict[str, Any] | None = None,
                  deployments: list[dict[str, Any]] | None = None, key_envs: list[str] | None = None
                  ) -> GatewayConfig:
    """Model `gpt-image-1` with one deployment per fake upstream, on providers named a, b, ... in order."""
    names = "abcdefgh"[: len(upstreams)]
    return GatewayConfig.model_validate({
        "providers": {name: {"type": "openai", "base_url": fake.base_url,
                             "api_key_env": (key_envs or [])[i] if key_envs else "FAKE_OPENAI_KEY"}
                      for i, (name, fake) in enumerate(zip(names, upstreams, strict=True))},
        "models": {"gpt-image-1": {
            "family": "gpt-image",
            "retry": retry or FAST_RETRY,
            "deployments": [{"provider": name, **((deployments or [])[i] if deployments else {})}
                            for i, name in enumerate(names)],
        }},
    })


async def generate(gateway: Gateway) -> bytes:
    client = gateway.client()
    result = await client.images.generate(model="gpt-image-1", prompt="a quiet harbour", size="1024x1024")
    assert result.data is not None
    return base64.b64decode(result.data[0].b64_json or "")


async def test_503_on_the_first_deployment_every_request_succeeds_through_the_second(
        fakes: Fakes, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = fakes
    a.fail(503, times=100)
    gateway = await gateway_factory(config=routed_config(a, b))
    with caplog.at_level(logging.INFO, logger="workers.router"):
        images = [await generate(gateway) for _ in range(10)]
    assert images == b.images
    # the first request found the first deployment down; the cooldown kept the next nine away from it
    assert (len(a.image_calls), len(b.image_calls)) == (1, 10)
    attempts = [r.getMessage() for r in caplog.records if r.name == "workers.router"]
    assert attempts[0].startswith("gpt-image-1: attempt 1/3 on gpt-image-1#0 failed after ")
    assert attempts[0].endswith("Upstream 'a' (openai, model 'gpt-image-1') failed: HTTP 503: The engine is "
                                "currently overloaded, please try again later.")
    assert attempts[1].startswith("gpt-image-1: attempt 2/3 on gpt-image-1#1 succeeded in ")
    assert len(attempts) == 11 and API_KEY not in "".join(attempts)


async def test_concurrent_requests_survive_a_failing_deployment(fakes: Fakes,
                                                                gateway_factory: GatewayFactory) -> None:
    a, b = fakes
    a.fail(500, times=100)
    gateway = await gateway_factory(config=routed_config(a, b))
    images = await asyncio.gather(*(generate(gateway) for _ in range(10)))
    assert sorted(images) == sorted(b.images) and len(b.image_calls) == 10
    assert 1 <= len(a.image_calls) < 10


async def test_a_timing_out_deployment_falls_back_to_the_second(fakes: Fakes,
                                                                gateway_factory: GatewayFactory) -> None:
    a, b = fakes
    a.delay(10, times=100)
    gateway = await gateway_factory(config=routed_config(a, b, deployments=[{"timeout": 0.4}, {}]))
    started = time.monotonic()
    images = [await generate(gateway) for _ in range(10)]
    assert images == b.images
    assert (len(a.image_calls), len(b.image_calls)) == (1, 10)
    assert time.monotonic() - started < 5  # one timeout paid, not ten


async def test_a_request_the_upstream_rejects_is_tried_exactly_once(fakes: Fakes,
                                                                    gateway_factory: GatewayFactory) -> None:
    a, b = fakes
    a.fail(400, times=5)
    b.fail(400, times=5)
    gateway = await gateway_factory(config=routed_config(a, b))
    with pytest.raises(openai.BadRequestError) as caught:
        await generate(gateway)
    assert len(a.image_calls) + len(b.image_calls) == 1
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "message": "Upstream 'a' (openai, model 'gpt-image-1') rejected the request: HTTP 400: Your request "
                   "was rejected as a result of our safety system. Your prompt may contain text that is not "
                   "allowed by our safety system. [content_policy_violation]",
        "type": "invalid_request_error", "param": "prompt", "code": "content_policy_violation"}


async def test_retry_after_of_a_429_is_honoured(fakes: Fakes, gateway_factory: GatewayFactory) -> None:
    a, _ = fakes
    a.fail(429, headers={"Retry-After": "1"})
    gateway = await gateway_factory(config=routed_config(a))
    assert await generate(gateway) == a.images[0]
    first, second = a.image_calls
    assert 1.0 <= second.at - first.at < 2.0  # the backoff alone would have waited 0.05 s at most


async def test_a_retry_after_beyond_the_model_timeout_is_not_waited_for(
        fakes: Fakes, gateway_factory: GatewayFactory
) -> None:
    a, _ = fakes
    a.fail(429, headers={"Retry-After": "60"})
    config = routed_config(a)
    config.models["gpt-image-1"].timeout = 5
    gateway = await gateway_factory(config=config)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        await generate(gateway)
    assert time.monotonic() - started < 3 and len(a.image_calls) == 1
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_rate_limited"  # type: ignore[index]


async def test_cooldown_skips_a_failed_deployment_until_it_ends(fakes: Fakes,
                                                                gateway_factory: GatewayFactory) -> None:
    a, b = fakes
    a.fail(500)  # one failure only: a is healthy again at once, yet skipped while cooling down
    gateway = await gateway_factory(config=routed_config(a, b, retry={**FAST_RETRY, "cooldown": 0.8}))
    for _ in range(4):
        await generate(gateway)
    assert (len(a.image_calls), len(b.image_calls)) == (1, 4)
    await asyncio.sleep(0.9)
    for _ in range(4):
        await generate(gateway)
    assert (len(a.image_calls), len(b.image_calls)) == (3, 6)  # equal weights share again


async def test_weights_spread_load(fakes: Fakes, gateway_factory: GatewayFactory) -> None:
    a, b = fakes
    gateway = await gateway_factory(config=routed_config(a, b, deployments=[{"weight": 3}, {"weight": 1}]))
    for _ in range(8):
        await generate(gateway)
    assert (len(a.image_calls), len(b.image_calls)) == (6, 2)


async def test_max_concurrency_limits_calls_in_flight(fakes: Fakes, gateway_factory: GatewayFactory) -> None:
    a, _ = fakes
    a.delay(0.3, times=6)
    gateway = await gateway_factory(config=routed_config(a, deployments=[{"max_concurrency": 2}]))
    images = await asyncio.gather(*(generate(gateway) for _ in range(6)))
    assert sorted(images) == sorted(a.images)
    assert a.peak == 2


async def test_when_every_upstream_fails_the_error_names_them_all(fakes: Fakes,
                                                                  gateway_factory: GatewayFactory) -> None:
    a, b = fakes
    a.fail(503, times=10)
    b.reset(times=10)
    gateway = await gateway_factory(config=routed_config(a, b))
    with pytest.raises(openai.InternalServerError) as caught:
        await generate(gateway)
    assert caught.value.status_code == 502
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["code"]) == ("upstream_error", "upstreams_failed")
    message = error["message"]
    # a, then b, then whichever backoff ends first: three attempts, each named with its reason
    assert message.startswith("No upstream could serve model 'gpt-image-1' after 3 attempts: (1) Upstream "
                              "'a' (openai, model 'gpt-image-1') failed: HTTP 503: The engine is currently "
                              "overloaded")
    assert ("(2) Upstream 'b' (openai, model 'gpt-image-1') failed: could not be reached (ClientOSError"
            in message)
    assert "; (3) Upstream '" in message
    assert len(a.image_calls) + len(b.image_calls) == 3 and API_KEY not in message


async def test_rejected_credentials_fall_back_and_are_not_retried(fakes: Fakes,
                                                                  gateway_factory: GatewayFactory) -> None:
    a, b = fakes
    config = routed_config(a, b, key_envs=["WRONG_OPENAI_KEY", "FAKE_OPENAI_KEY"])
    gateway = await gateway_factory(config=config)
    assert await generate(gateway) == b.images[0]
    assert len(a.image_calls) == 1

    alone = await gateway_factory(config=routed_config(a, key_envs=["WRONG_OPENAI_KEY"]))
    with pytest.raises(openai.InternalServerError) as caught:
        await generate(alone)
    assert len(a.image_calls) == 2  # one more call, not three: another try cannot fix a key
    assert caught.value.body == {
        "message": "Upstream 'a' (openai, model 'gpt-image-1') refused the gateway's credentials: HTTP 401; "
                   "check the key the provider's api_key_env names",
        "type": "upstream_error", "param": None, "code": "upstream_auth_failed"}
