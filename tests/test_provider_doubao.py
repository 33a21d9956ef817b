"""The Doubao Seedream adapter against a fake Volcengine Ark: the exact request it sends, what the gateway
answers, and every failure Ark can give, both through the OpenAI SDK and at the adapter itself."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import aiohttp
import openai
import pytest
from PIL import Image

from service.errors import UpstreamError, UpstreamRejected
from service.schemas import ImageSpec
from service.settings import DeploymentConfig, GatewayConfig, ProviderConfig
from tests.conftest import GatewayFactory, GatewayOpener
from tests.fakes.doubao import API_KEY, SEEDREAM_3, SEEDREAM_4, FakeArk
from tests.pictures import decode
from workers.providers.base import Deployment, ImageRequest, InputImage, ProviderResult
from workers.providers.doubao import DoubaoProvider

KEY_ENV = "IMAGEGW_TEST_ARK_KEY"
WHITE = (255, 255, 255)


@pytest.fixture
async def ark(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeArk]:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    async with FakeArk() as fake:
        yield fake


def ark_config(fake: FakeArk, attempts: int = 1, **options: Any) -> GatewayConfig:
    retry = {"attempts": attempts, "backoff": 0.01}
    return GatewayConfig.model_validate({
        "providers": {
            "ark": {"type": "doubao", "base_url": fake.url, "api_key_env": KEY_ENV, "options": options},
            "local": {"type": "local"},
        },
        "models": {
            "seedream-4": {"family": "seedream", "retry": retry,
                           "deployments": [{"provider": "ark", "model": SEEDREAM_4}]},
            "seedream-3": {"family": "seedream", "retry": retry,
                           "deployments": [{"provider": "ark", "model": SEEDREAM_3,
                                            "options": {"sequential": False}}]},
            "local": {"deployments": [{"provider": "local"}]},
        },
    })


@pytest.fixture
async def open_gateway(ark: FakeArk, gateway_factory: GatewayFactory) -> AsyncIterator[GatewayOpener]:
    opener = GatewayOpener(gateway_factory, partial(ark_config, ark))
    yield opener
    await opener.close()


def picture(b64: str | None) -> Image.Image:
    return decode(b64).convert("RGB")


def input_png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


class Progress:
    def __init__(self) -> None:
        self.updates: list[tuple[float, str]] = []

    async def update(self, fraction: float, stage: str) -> None:
        self.updates.append((fraction, stage))

    async def partial_image(self, image: bytes, fmt: str) -> None:
        raise AssertionError("Ark sends no previews")


async def call_adapter(fake: FakeArk, *, model: str = SEEDREAM_4, options: dict[str, Any] | None = None,
                       images: list[InputImage] | None = None, mask: InputImage | None = None, **spec: Any
                       ) -> ProviderResult:
    """The adapter on its own, with a real HTTP session against the fake: what the router would get."""
    config = ProviderConfig(type="doubao", base_url=fake.url, api_key_env=KEY_ENV, options=options or {})
    deployment = Deployment.resolve("seedream", 0, "ark", config, DeploymentConfig(provider="ark",
                                                                                   model=model))
    values = {"model": "seedream", "prompt": "a red fox", "size": "1K", **spec}
    async with aiohttp.ClientSession() as http:
        provider = DoubaoProvider("ark", config, http)
        provider.check_deployment(deployment)
        request = ImageRequest(spec=ImageSpec(**values), images=images or [], mask=mask)
        return await provider.generate(request, deployment, Progress())


# --- generation through the SDK -----------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "dims"), [("1K", (1024, 1024)), ("2K", (2048, 2048)), ("4K", (4096, 4096)),
                                            ("2560x1440", (2560, 1440)), ("1280x720", (1280, 720))])
async def test_sdk_generation_sends_arks_request_and_gets_the_image(
        ark: FakeArk, open_gateway: GatewayOpener, size: str, dims: tuple[int, int]) -> None:
    gateway, client = await open_gateway()
    result = await client.images.generate(model="seedream-4", prompt="a red fox in snow", size=size,
                                                    extra_body={"seed": 42, "watermark": True})
    [call] = ark.posts
    assert call.path == "/api/v3/images/generations" and call.query == {}
    assert call.headers["authorization"] == f"Bearer {API_KEY}"
    assert call.headers["content-type"].startswith("application/json")
    assert call.json == {"model": SEEDREAM_4, "prompt": "a red fox in snow", "size": size,
                         "response_format": "b64_json", "watermark": True, "stream": False, "seed": 42,
                         "sequential_image_generation": "disabled"}
    image = picture(result.data[0].b64_json)
    assert image.size == dims
    assert image.getpixel((dims[0] - 1, dims[1] - 1)) == WHITE  # the watermark the request asked for
    assert image.getpixel((0, 0)) != WHITE
    tokens = dims[0] * dims[1] // 256
    assert result.size == f"{dims[0]}x{dims[1]}"
    assert result.usage is not None and result.usage.model_dump(exclude_none=True) == {
        "generated_images": 1, "output_tokens": tokens, "total_tokens": tokens, "input_tokens": 0}
    assert not ark.downloads


async def test_watermark_defaults_to_the_deployment_option(ark: FakeArk, open_gateway: GatewayOpener) -> None:
    _, client = await open_gateway()
    plain = await client.images.generate(model="seedream-4", prompt="a lake", size="1K")
    _, client = await open_gateway(watermark=True)
    marked = await client.images.generate(model="seedream-4", prompt="a lake", size="1K")
    assert [call.json["watermark"] for call in ark.posts] == [False, True]
    assert "seed" not in ark.posts[0].json
    assert picture(plain.data[0].b64_json).getpixel((1023, 1023)) != WHITE
    assert picture(marked.data[0].b64_json).getpixel((1023, 1023)) == WHITE


async def test_n_images_come_from_one_sequential_call(ark: FakeArk, open_gateway: GatewayOpener) -> None:
    _, client = await open_gateway()
    result = await client.images.generate(model="seedream-4", prompt="four seasons", size="1K", n=3)
    [call] = ark.posts
    assert call.json["sequential_image_generation"] == "auto"
    assert call.json["sequential_image_generation_options"] == {"max_images": 3}
    colors = {picture(item.b64_json).getpixel((0, 0)) for item in result.data}
    assert len(result.data) == 3 and len(colors) == 3
    assert result.usage is not None and result.usage.model_dump(exclude_none=True)["generated_images"] == 3


async def test_a_sequential_shortfall_is_made_up_by_single_calls(ark: FakeArk, open_gateway: GatewayOpener
                                                                 ) -> None:
    ark.sequential_limit = 1  # the model drew one picture where three were allowed
    _, client = await open_gateway()
    result = await client.images.generate(model="seedream-4", prompt="three cats", size="1K", n=3,
                                          extra_body={"seed": 7})
    first, *rest = ark.posts
    assert first.json["sequential_image_generation_options"] == {"max_images": 3} and first.json["seed"] == 7
    assert [call.json["sequential_image_generation"] for call in rest] == ["disabled", "disabled"]
    assert sorted(call.json["seed"] for call in rest) == [8, 9]  # distinct seeds, so distinct pictures
    assert len({picture(item.b64_json).getpixel((0, 0)) for item in result.data}) == 3
    assert result.usage is not None
    assert result.usage.model_dump(exclude_none=True) == {"generated_images": 3, "output_tokens": 3 * 4096,
                                                          "total_tokens": 3 * 4096, "input_tokens": 0}


async def test_a_model_without_sequential_mode_fans_out(ark: FakeArk, open_gateway: GatewayOpener) -> None:
    _, client = await open_gateway()
    result = await client.images.generate(model="seedream-3", prompt="two boats", size="1280x720", n=2,
                                          extra_body={"seed": 5})
    assert len(ark.posts) == 2 and len(result.data) == 2
    for call in ark.posts:
        assert call.json["model"] == SEEDREAM_3 and "sequential_image_generation" not in call.json
    assert sorted(call.json["seed"] for call in ark.posts) == [5, 6]
    first, second = (picture(item.b64_json).getpixel((0, 0)) for item in result.data)
    assert first != second


async def test_url_answers_are_downloaded_and_served_by_the_gateway(
        ark: FakeArk, open_gateway: GatewayOpener, http: aiohttp.ClientSession) -> None:
    gateway, client = await open_gateway(response_format="url")
    result = await client.images.generate(model="seedream-4", prompt="a kite", size="1K", n=2,
                                                    response_format="url")
    [call] = ark.posts
    assert call.json["response_format"] == "url"
    assert [d.path for d in ark.downloads] == [f"/files/seedream-{i}.png" for i in range(2)]
    assert all("authorization" not in d.headers for d in ark.downloads)  # the key never goes to the link
    served = []
    for item in result.data:
        assert item.url and item.url.startswith(gateway.url)  # re-served from the gateway's own storage
        async with http.get(item.url) as resp:
            assert resp.status == 200
            served.append(await resp.read())
    assert sorted(served) == sorted(ark.files.values())


async def test_an_oversized_image_link_is_refused(ark: FakeArk, open_gateway: GatewayOpener) -> None:
    _, client = await open_gateway(response_format="url", max_image_bytes=200)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.images.generate(model="seedream-4", prompt="a kite", size="1K")
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_answer_too_large"


# --- edits --------------------------------------------------------------------------------------------------

async def test_sdk_edit_sends_the_inputs_as_data_urls(ark: FakeArk, open_gateway: GatewayOpener) -> None:
    first, second = input_png((10, 120, 200)), input_png((200, 30, 40), (30, 40))
    _, client = await open_gateway()
    result = await client.images.edit(model="seedream-4", prompt="make it dusk", size="1K",
                                      image=[("a.png", first, "image/png"), ("b.png", second, "image/png")])
    [call] = ark.posts
    assert call.json["image"] == [f"data:image/png;base64,{base64.b64encode(data).decode()}"
                                  for data in (first, second)]
    assert call.json["prompt"] == "make it dusk" and call.json["size"] == "1K"
    assert picture(result.data[0].b64_json).getpixel((0, 0)) == (10, 120, 200)  # drawn from the first input


async def test_adapter_sends_one_input_as_a_single_data_url(ark: FakeArk) -> None:
    data = input_png((1, 2, 3))
    result = await call_adapter(ark, images=[InputImage(data=data, format="png")], operation="edit")
    assert ark.posts[0].json["image"] == f"data:image/png;base64,{base64.b64encode(data).decode()}"
    assert Image.open(io.BytesIO(result.images[0].data)).convert("RGB").getpixel((5, 5)) == (1, 2, 3)


async def test_an_edit_with_a_mask_is_refused_before_any_call(ark: FakeArk) -> None:
    image = InputImage(data=input_png((1, 2, 3)), format="png")
    with pytest.raises(UpstreamRejected) as caught:
        await call_adapter(ark, images=[image], mask=image, operation="edit")
    assert caught.value.param == "mask" and caught.value.status == 400
    assert ark.calls == []


# --- validation before any call -----------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "param"), [
    ({"size": "1024x768"}, "size"),  # fewer than 1280x720 pixels
    ({"size": "4160x256"}, "size"),  # wider than 16:1
    ({"size": "auto"}, "size"),
    ({"quality": "hd"}, "quality"),
    ({"extra_body": {"negative_prompt": "blur"}}, "negative_prompt"),
])
async def test_parameters_seedream_lacks_are_refused_naming_them(
        ark: FakeArk, open_gateway: GatewayOpener, params: dict[str, Any], param: str) -> None:
    _, client = await open_gateway()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(model="seedream-4", prompt="a fox", **params)
    assert caught.value.body["param"] == param
    assert ark.calls == []


async def test_other_families_refuse_watermark(ark: FakeArk, open_gateway: GatewayOpener) -> None:
    _, client = await open_gateway()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(model="local", prompt="a fox", extra_body={"watermark": False})
    assert caught.value.body == {"message": "'watermark' is not supported by model 'local'.",
                                 "type": "invalid_request_error", "param": "watermark",
                                 "code": "unsupported_parameter"}


# --- failures -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "status", "error_code"), [
    ("AuthenticationError", 502, "upstream_auth_failed"),
    ("InternalServiceError", 502, "upstream_error"),
    ("InvalidEndpointOrModel.NotFound", 502, "upstream_account_error"),
])
async def test_adapter_maps_arks_failures(ark: FakeArk, code: str, status: int, error_code: str) -> None:
    ark.fail(code)
    with pytest.raises(UpstreamError) as caught:
        await call_adapter(ark)
    error = caught.value
    assert (error.status, error.code, error.retry_after) == (status, error_code, None)
    assert "Upstream 'ark'" in error.message and code in error.message and API_KEY not in error.message


@pytest.mark.parametrize("code", ["RateLimitExceeded", "ServerOverloaded"])
async def test_adapter_passes_on_retry_after(ark: FakeArk, code: str) -> None:
    ark.fail(code, retry_after="7")
    with pytest.raises(UpstreamError) as caught:
        await call_adapter(ark)
    assert caught.value.code == "upstream_rate_limited" and caught.value.retry_after == 7.0


async def test_a_safety_refusal_is_a_400_with_the_reason(ark: FakeArk, open_gateway: GatewayOpener) -> None:
    ark.fail("InputTextSensitiveContentDetected", times=5)
    _, client = await open_gateway(attempts=3)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(model="seedream-4", prompt="something forbidden", size="1K")
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "content_policy_violation" and body["param"] == "prompt"
    assert "input text may contain sensitive information" in body["message"]
    assert "InputTextSensitiveContentDetected" in body["message"]
    assert len(ark.posts) == 1  # a refusal is never retried


async def test_images_refused_one_by_one_are_a_safety_refusal(ark: FakeArk) -> None:
    ark.refuse_outputs = 2
    with pytest.raises(UpstreamRejected) as caught:
        await call_adapter(ark, n=2)
    assert caught.value.code == "content_policy_violation"
    assert "output image may contain sensitive information" in caught.value.message


async def test_a_partly_refused_batch_is_made_up(ark: FakeArk) -> None:
    ark.refuse_outputs = 1
    result = await call_adapter(ark, n=3)
    assert len(result.images) == 3 and len(ark.posts) == 2
    assert ark.posts[1].json["sequential_image_generation"] == "disabled"


async def test_a_bad_key_is_a_502_that_keeps_the_key_secret(ark: FakeArk, open_gateway: GatewayOpener,
                                                             http: aiohttp.ClientSession,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "ark-wrong-key-that-must-not-leak-0000"
    monkeypatch.setenv(KEY_ENV, wrong)
    gateway, _ = await open_gateway()
    async with http.post(f"{gateway.url}/v1/images/generations",
                         json={"model": "seedream-4", "prompt": "a fox", "size": "1K"}) as resp:
        text = await resp.text()
        assert resp.status == 502
    body = json.loads(text)["error"]
    assert body["code"] == "upstream_auth_failed" and body["type"] == "upstream_error"
    assert "Upstream 'ark'" in body["message"]
    assert wrong not in text and API_KEY not in text
    assert ark.posts[0].headers["authorization"] == f"Bearer {wrong}"


async def test_a_rate_limit_is_retried_after_retry_after(ark: FakeArk, open_gateway: GatewayOpener) -> None:
    ark.fail("RateLimitExceeded", retry_after="1")
    _, client = await open_gateway(attempts=2)
    result = await client.images.generate(model="seedream-4", prompt="a fox", size="1K")
    assert len(result.data) == 1
    first, second = ark.posts
    assert second.at - first.at >= 1.0
    assert second.json == first.json
