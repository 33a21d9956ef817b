"""The OpenRouter adapter against a fake OpenRouter: the exact requests it sends, what the gateway answers."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from PIL import Image

from service.errors import UpstreamError, UpstreamRejected
from service.schemas import ImageSpec
from service.settings import DeploymentConfig, GatewayConfig, ProviderConfig
from tests.conftest import GatewayFactory
from tests.fakes.openrouter import (
    API_KEY,
    COMPLETION_TOKENS,
    COST_PER_IMAGE,
    PROMPT_TOKENS_PER_IMAGE,
    TEXT_ANSWER,
    FakeOpenRouter,
)
from tests.fakes.recording import TRANSPORT_HEADERS, RecordingProgress, image_dimensions, png
from workers.providers.base import Deployment, ImageRequest, InputImage, ProviderResult
from workers.providers.openrouter import OpenRouterProvider
from workers.providers.translation import MASK_INSTRUCTION

KEY_ENV = "IMAGEGW_TEST_OPENROUTER_KEY"
MODEL = "google/gemini-2.5-flash-image"
PROMPT = "a lighthouse at dusk"
WORDS = len(PROMPT.split())


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeOpenRouter]:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    async with FakeOpenRouter() as server:
        yield server


def spec(**fields: Any) -> ImageSpec:
    return ImageSpec(**{"model": "banana", "prompt": PROMPT, "size": "auto", **fields})


async def generate(http: aiohttp.ClientSession, base_url: str, request: ImageRequest | ImageSpec,
                   model: str = MODEL, progress: RecordingProgress | None = None, **options: Any
                   ) -> ProviderResult:
    config = ProviderConfig(type="openrouter", base_url=base_url, api_key_env=KEY_ENV)
    deployment = Deployment.resolve("banana", 0, "router", config, DeploymentConfig(
        provider="router", model=model, options=options))
    provider = OpenRouterProvider("router", config, http)
    provider.check_deployment(deployment)
    if isinstance(request, ImageSpec):
        request = ImageRequest(spec=request)
    return await provider.generate(request, deployment, progress or RecordingProgress())


async def test_generation_sends_the_documented_request(fake: FakeOpenRouter,
                                                       http: aiohttp.ClientSession) -> None:
    progress = RecordingProgress()
    result = await generate(http, fake.base_url, spec(size="1792x1024", user="user-7"), progress=progress,
                            app_url="https://example.test/app", app_title="Example App")

    [call] = fake.calls
    assert (call.method, call.path, call.query) == ("POST", "/api/v1/chat/completions", {})
    assert set(call.headers) == TRANSPORT_HEADERS | {"content-type", "authorization", "http-referer",
                                                     "x-title"}
    assert call.headers["authorization"] == f"Bearer {API_KEY}"
    assert call.headers["content-type"] == "application/json"
    assert call.headers["http-referer"] == "https://example.test/app"
    assert call.headers["x-title"] == "Example App"
    assert call.json == {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "modalities": ["image", "text"],
        "image_config": {"aspect_ratio": "16:9"},
        "user": "user-7",
    }
    [image] = result.images
    assert image.data == fake.images[0] and image.format == "png" and image.revised_prompt == TEXT_ANSWER
    assert image_dimensions(image.data) == (1344, 768) and result.size == "1344x768"
    assert result.usage == {"input_tokens": WORDS, "output_tokens": COMPLETION_TOKENS,
                            "total_tokens": WORDS + COMPLETION_TOKENS, "cost": COST_PER_IMAGE}
    assert progress.updates[-1] == (1.0, "received 1/1 images") and progress.partials == []


async def test_n_fans_out_and_adds_up_usage_and_cost(fake: FakeOpenRouter,
                                                      http: aiohttp.ClientSession) -> None:
    result = await generate(http, fake.base_url, spec(n=4, seed=10))

    assert len(fake.calls) == 4 and sorted(call.json["seed"] for call in fake.calls) == [10, 11, 12, 13]
    assert all("image_config" not in call.json for call in fake.calls)  # size auto: the model decides
    assert sorted(image.data for image in result.images) == sorted(fake.images) and len(set(fake.images)) == 4
    assert result.usage is not None
    assert (result.usage["input_tokens"], result.usage["output_tokens"]) == (4 * WORDS, 4 * COMPLETION_TOKENS)
    assert result.usage["cost"] == pytest.approx(4 * COST_PER_IMAGE)


@pytest.mark.parametrize(("size", "ratio"), [
    ("1024x1024", "1:1"), ("1024x1536", "2:3"), ("1536x1024", "3:2"), ("1080x1920", "9:16"),
    ("2520x1080", "21:9"), ("1024x1280", "4:5"),
])
async def test_size_becomes_the_nearest_aspect_ratio(fake: FakeOpenRouter, http: aiohttp.ClientSession,
                                                     size: str, ratio: str) -> None:
    await generate(http, fake.base_url, spec(size=size), image_size="2K")
    assert fake.calls[0].json["image_config"] == {"aspect_ratio": ratio, "image_size": "2K"}


async def test_a_deployment_without_ratios_sends_no_image_config(fake: FakeOpenRouter,
                                                                 http: aiohttp.ClientSession) -> None:
    await generate(http, fake.base_url, spec(size="1024x1536"), model="openai/gpt-5-image", aspect_ratios=[],
                   modalities=["image"])
    assert fake.calls[0].json == {"model": "openai/gpt-5-image", "modalities": ["image"],
                                  "messages": [{"role": "user", "content": PROMPT}]}


async def test_edit_sends_images_as_data_url_parts(fake: FakeOpenRouter, http: aiohttp.ClientSession) -> None:
    photo, mask = png(500, 300, "photo"), png(500, 300, "mask")
    request = ImageRequest(spec=spec(operation="edit", prompt="make it night"),
                           images=[InputImage(photo, "png")], mask=InputImage(mask, "png"))
    result = await generate(http, fake.base_url, request)

    def part(data: bytes) -> dict[str, Any]:
        url = f"data:image/png;base64,{base64.b64encode(data).decode()}"
        return {"type": "image_url", "image_url": {"url": url}}

    assert fake.calls[0].json["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "make it night"}, part(photo), part(mask),
        {"type": "text", "text": MASK_INSTRUCTION},
    ]}]
    assert result.size == "500x300"
    words = len("make it night".split()) + len(MASK_INSTRUCTION.split())
    assert result.usage is not None and result.usage["input_tokens"] == words + 2 * PROMPT_TOKENS_PER_IMAGE


@pytest.mark.parametrize(("fields", "param"), [
    ({"style": "natural"}, "style"), ({"negative_prompt": "fog"}, "negative_prompt"),
    ({"background": "transparent"}, "background"),
])
async def test_parameters_openrouter_lacks_are_refused(fake: FakeOpenRouter, http: aiohttp.ClientSession,
                                                       fields: dict[str, Any], param: str) -> None:
    with pytest.raises(UpstreamRejected) as refused:
        await generate(http, fake.base_url, spec(**fields))
    assert refused.value.param == param and refused.value.code == "unsupported_parameter"
    assert fake.calls == []


async def test_bad_key_is_a_502_naming_the_upstream(fake: FakeOpenRouter, http: aiohttp.ClientSession,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-or-v1-wrong")
    with pytest.raises(UpstreamError) as failed:
        await generate(http, fake.base_url, spec())
    assert failed.value.status == 502 and failed.value.code == "upstream_auth_failed"
    assert failed.value.message == (f"Upstream 'router' (openrouter, model '{MODEL}') refused the gateway's "
                                    "credentials: HTTP 401: User not found.")


@pytest.mark.parametrize(("kind", "code", "text"), [
    ("credits", "upstream_error", "HTTP 402: Insufficient credits"),
    ("server_error", "upstream_error", "HTTP 500: Internal Server Error"),
    ("provider_error", "upstream_error", "HTTP 502: Provider returned error (provider Google)"),
    ("error_in_body", "upstream_error", "HTTP 502: Provider returned error (provider Google)"),
])
async def test_upstream_failures_are_502s(fake: FakeOpenRouter, http: aiohttp.ClientSession, kind: str,
                                          code: str, text: str) -> None:
    fake.fail_next(kind)
    with pytest.raises(UpstreamError) as failed:
        await generate(http, fake.base_url, spec())
    assert type(failed.value) is UpstreamError and failed.value.code == code
    assert text in failed.value.message and failed.value.retry_after is None


async def test_429_keeps_retry_after(fake: FakeOpenRouter, http: aiohttp.ClientSession) -> None:
    fake.fail_next("rate_limit", retry_after="4")
    with pytest.raises(UpstreamError) as failed:
        await generate(http, fake.base_url, spec())
    assert failed.value.code == "upstream_rate_limited" and failed.value.retry_after == 4.0
    assert "HTTP 429: Rate limit exceeded: free-models-per-min." in failed.value.message


async def test_an_echoed_key_is_redacted(fake: FakeOpenRouter, http: aiohttp.ClientSession) -> None:
    fake.fail_next("server_error", message=f"bad upstream credentials {API_KEY}")
    with pytest.raises(UpstreamError) as failed:
        await generate(http, fake.base_url, spec())
    assert API_KEY not in failed.value.message and "credentials [redacted]" in failed.value.message


@pytest.mark.parametrize(("kind", "reason"), [
    ("moderation", "Input was flagged for moderation (provider OpenAI); flagged for: violence, harassment"),
    ("safety", "generation stopped: content_filter (IMAGE_SAFETY)"),
    ("no_image", "the model returned no image; it said: I'm not able to create that image."),
])
async def test_refusals_are_400s_with_the_reason(fake: FakeOpenRouter, http: aiohttp.ClientSession, kind: str,
                                                 reason: str) -> None:
    fake.fail_next(kind)
    with pytest.raises(UpstreamRejected) as rejected:
        await generate(http, fake.base_url, spec())
    assert rejected.value.status == 400 and rejected.value.param == "prompt"
    assert reason in rejected.value.message


async def test_a_bad_model_id_is_rejected(fake: FakeOpenRouter, http: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamRejected) as rejected:
        await generate(http, fake.base_url, spec(), model="acme/no-such-model")
    assert "HTTP 400: acme/no-such-model is not a valid model ID" in rejected.value.message


# End to end: the official SDK against the gateway, the gateway against the fake.

def gateway_config(base_url: str) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "providers": {"router": {"type": "openrouter", "base_url": base_url, "api_key_env": KEY_ENV,
                                 "options": {"app_title": "imagegw tests"}}},
        "models": {"banana": {"family": "gemini", "deployments": [{"provider": "router", "model": MODEL}]}},
    })


async def test_sdk_gets_b64_and_url_images(fake: FakeOpenRouter, gateway_factory: GatewayFactory,
                                           http: aiohttp.ClientSession) -> None:
    gateway = await gateway_factory(config=gateway_config(fake.base_url))
    client = gateway.client()

    result = await client.images.generate(model="banana", prompt=PROMPT, size="1536x1024", n=3,
                                          response_format="b64_json")
    assert len(result.data) == 3 and len(fake.calls) == 3
    assert {call.json["image_config"]["aspect_ratio"] for call in fake.calls} == {"3:2"}
    assert all(call.headers["x-title"] == "imagegw tests" for call in fake.calls)
    assert sorted(base64.b64decode(d.b64_json or "") for d in result.data) == sorted(fake.images)
    assert result.size == "1248x832" and result.data[0].revised_prompt == TEXT_ANSWER
    assert result.usage is not None and result.usage.output_tokens == 3 * COMPLETION_TOKENS

    result = await client.images.generate(model="banana", prompt=PROMPT, response_format="url",
                                          output_format="jpeg")
    async with http.get(result.data[0].url or "") as resp:
        assert resp.status == 200
        image = Image.open(io.BytesIO(await resp.read()))
    assert image.format == "JPEG" and image.size == (1024, 1024)


async def test_sdk_sees_a_content_filter_as_400_with_the_reason(fake: FakeOpenRouter,
                                                                gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(config=gateway_config(fake.base_url))
    fake.fail_next("safety")
    with pytest.raises(openai.BadRequestError) as rejected:
        await gateway.client().images.generate(model="banana", prompt=PROMPT)
    assert rejected.value.body is not None
    assert "content_filter (IMAGE_SAFETY)" in rejected.value.body["message"]
    assert rejected.value.body["code"] == "content_policy_violation"
    assert len(fake.calls) == 1  # a refusal is never retried


async def test_sdk_sees_a_bad_key_as_502_without_the_key(fake: FakeOpenRouter,
                                                         gateway_factory: GatewayFactory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-or-v1-secret-but-wrong")
    gateway = await gateway_factory(config=gateway_config(fake.base_url))
    with pytest.raises(openai.APIStatusError) as failed:
        await gateway.client().images.generate(model="banana", prompt=PROMPT)
    assert failed.value.status_code == 502
    assert "sk-or-v1-secret-but-wrong" not in failed.value.response.text
    assert "User not found." in failed.value.response.text
