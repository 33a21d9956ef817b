"""The ZAI / Zhipu CogView adapter against a fake Zhipu API: the exact request it sends, the download of the
image link, what the gateway answers, every failure, and edits refused before any upstream call."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import aiohttp
import openai
import pytest
from PIL import Image

from service.errors import InvalidRequest, UpstreamError, UpstreamRejected
from service.schemas import ImageSpec
from service.settings import DeploymentConfig, GatewayConfig, ProviderConfig
from tests.conftest import GatewayFactory, GatewayOpener
from tests.fakes.zai import API_KEY, FakeZai
from tests.pictures import decode
from workers.providers.base import Deployment, ImageRequest, InputImage, ProviderResult
from workers.providers.zai import ZaiProvider
from workers.router import Router

KEY_ENV = "IMAGEGW_TEST_ZAI_KEY"
MODEL = "cogview-4-250304"

@pytest.fixture
async def zai(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeZai]:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    async with FakeZai() as fake:
        yield fake


def zai_config(fake: FakeZai, attempts: int = 1, **options: Any) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "providers": {
            "zhipu": {"type": "zai", "base_url": fake.url, "api_key_env": KEY_ENV, "options": options},
        },
        "models": {"cogview": {"family": "cogview", "retry": {"attempts": attempts, "backoff": 0.01},
                               "deployments": [{"provider": "zhipu", "model": MODEL}]}},
    })


@pytest.fixture
async def open_gateway(zai: FakeZai, gateway_factory: GatewayFactory) -> AsyncIterator[GatewayOpener]:
    opener = GatewayOpener(gateway_factory, partial(zai_config, zai))
    yield opener
    await opener.close()


def picture(b64: str | None) -> Image.Image:
    return decode(b64).convert("RGB")


def input_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(out, "PNG")
    return out.getvalue()


class Progress:
    async def update(self, fraction: float, stage: str) -> None:
        pass

    async def partial_image(self, image: bytes, fmt: str) -> None:
        raise AssertionError("CogView sends no previews")


async def call_adapter(fake: FakeZai, options: dict[str, Any] | None = None, **spec: Any) -> ProviderResult:
    """The adapter on its own, with a real HTTP session against the fake: what the router would get."""
    config = ProviderConfig(type="zai", base_url=fake.url, api_key_env=KEY_ENV, options=options or {})
    deployment = Deployment.resolve("cogview", 0, "zhipu", config,
                                    DeploymentConfig(provider="zhipu", model=MODEL))
    values = {"model": "cogview", "prompt": "a paper crane", "size": "1024x1024", **spec}
    async with aiohttp.ClientSession() as http:
        provider = ZaiProvider("zhipu", config, http)
        provider.check_deployment(deployment)
        return await provider.generate(ImageRequest(spec=ImageSpec(**values)), deployment, Progress())


# --- generation through the SDK -----------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "dims"), [("1024x1024", (1024, 1024)), ("1440x720", (1440, 720)),
                                            ("1280x720", (1280, 720))])
async def test_sdk_generation_sends_cogviews_request_and_downloads_the_image(
        zai: FakeZai, open_gateway: GatewayOpener, size: str, dims: tuple[int, int]) -> None:
    _, client = await open_gateway()
    result = await client.images.generate(model="cogview", prompt="a paper crane", size=size, quality="hd",
                                          user="user-123456")
    [call] = zai.posts
    assert call.path == "/api/paas/v4/images/generations" and call.query == {}
    assert call.headers["authorization"] == f"Bearer {API_KEY}"
    assert call.headers["content-type"].startswith("application/json")
    assert call.json == {"model": MODEL, "prompt": "a paper crane", "size": size, "quality": "hd",
                         "user_id": "user-123456"}
    [download] = zai.downloads
    assert download.path == "/files/cogview-0.png" and "authorization" not in download.headers
    image = picture(result.data[0].b64_json)
    expected = Image.open(io.BytesIO(zai.files["cogview-0.png"])).convert("RGB")
    assert image.size == dims and image.tobytes() == expected.tobytes()
    assert (result.size, result.quality, result.usage) == (size, "hd", None)  # CogView reports no usage


async def test_defaults_leave_quality_to_cogview_and_hash_a_short_user(zai: FakeZai, open_gateway: GatewayOpener
                                                                        ) -> None:
    _, client = await open_gateway()
    result = await client.images.generate(model="cogview", prompt="a crane", user="bob")
    assert zai.posts[0].json == {"model": MODEL, "prompt": "a crane", "size": "1024x1024",
                                 "user_id": hashlib.sha256(b"bob").hexdigest()}
    assert result.quality == "standard"


async def test_n_fans_out_into_parallel_calls(zai: FakeZai, open_gateway: GatewayOpener) -> None:
    _, client = await open_gateway()
    result = await client.images.generate(model="cogview", prompt="three cranes", n=3)
    assert len(zai.posts) == 3 and all(call.json == zai.posts[0].json for call in zai.posts)
    assert len(zai.downloads) == 3
    assert len({picture(item.b64_json).tobytes() for item in result.data}) == 3


async def test_sdk_url_form_is_served_by_the_gateway(zai: FakeZai, open_gateway: GatewayOpener,
                                                     http: aiohttp.ClientSession) -> None:
    gateway, client = await open_gateway()
    result = await client.images.generate(model="cogview", prompt="a crane", size="768x1344",
                                          response_format="url")
    url = result.data[0].url
    assert url and url.startswith(gateway.url) and zai.url not in url
    async with http.get(url) as resp:
        assert resp.status == 200
        served = await resp.read()
    assert served == zai.files["cogview-0.png"]


@pytest.mark.parametrize(("params", "param"), [
    ({"size": "2048x2048"}, "size"),  # more than 2^21 pixels
    ({"size": "1000x1000"}, "size"),  # not divisible by 16
    ({"quality": "high"}, "quality"),
    ({"extra_body": {"seed": 1}}, "seed"),
    ({"extra_body": {"watermark": True}}, "watermark"),
])
async def test_parameters_cogview_lacks_are_refused_naming_them(zai: FakeZai, open_gateway: GatewayOpener,
                                                                 params: dict[str, Any], param: str) -> None:
    _, client = await open_gateway()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(model="cogview", prompt="a crane", **params)
    assert caught.value.body["param"] == param
    assert zai.calls == []


# --- generation only ----------------------------------------------------------------------------------------

async def test_edits_and_variations_are_refused_before_any_call(zai: FakeZai, open_gateway: GatewayOpener) -> None:
    _, client = await open_gateway()
    with pytest.raises(openai.BadRequestError) as edit:
        await client.images.edit(model="cogview", prompt="add a hat",
                                 image=("in.png", input_png(), "image/png"))
    with pytest.raises(openai.BadRequestError) as variation, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks variations deprecated
        await client.images.create_variation(model="cogview", image=("in.png", input_png(), "image/png"))
    for caught in (edit, variation):
        assert caught.value.body["param"] == "model"
        assert caught.value.body["code"] == "unsupported_operation"
        assert "cogview" in caught.value.body["message"]
    assert zai.calls == []


async def test_the_router_refuses_an_edit_for_cogview_without_calling_it(zai: FakeZai) -> None:
    spec = ImageSpec(operation="edit", model="cogview", prompt="add a hat", size="1024x1024")
    async with aiohttp.ClientSession() as http:
        router = Router(zai_config(zai), http)
        with pytest.raises(InvalidRequest) as caught:
            request = ImageRequest(spec=spec, images=[InputImage(input_png(), "png")])
            await router.generate(request, Progress())
        await router.close()
    assert caught.value.status == 400 and caught.value.code == "unsupported_operation"
    assert zai.calls == []


# --- failures -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "error_code"), [
    ("1002", "upstream_auth_failed"),
    ("1113", "upstream_account_error"),  # in arrears: 429 from Zhipu, but no retry can fix it
    ("1211", "upstream_account_error"),
    ("500", "upstream_error"),
])
async def test_adapter_maps_zhipus_failures(zai: FakeZai, code: str, error_code: str) -> None:
    zai.fail(code)
    with pytest.raises(UpstreamError) as caught:
        await call_adapter(zai)
    error = caught.value
    assert (error.status, error.code, error.retry_after) == (502, error_code, None)
    assert "Upstream 'zhipu'" in error.message and f"[{code}]" in error.message
    assert API_KEY not in error.message


async def test_adapter_passes_on_retry_after(zai: FakeZai) -> None:
    zai.fail("1302", retry_after="3")
    with pytest.raises(UpstreamError) as caught:
        await call_adapter(zai)
    assert caught.value.code == "upstream_rate_limited" and caught.value.retry_after == 3.0


async def test_an_oversized_image_is_refused(zai: FakeZai) -> None:
    with pytest.raises(UpstreamError) as caught:
        await call_adapter(zai, options={"max_image_bytes": 100})
    assert caught.value.code == "upstream_answer_too_large"


async def test_a_safety_refusal_is_a_400_with_the_reason(zai: FakeZai, open_gateway: GatewayOpener) -> None:
    zai.fail("1301", times=5)
    _, client = await open_gateway(attempts=3)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(model="cogview", prompt="something forbidden", n=2)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "content_policy_violation" and body["param"] == "prompt"
    assert "unsafe or sensitive content" in body["message"] and "[1301]" in body["message"]
    assert len(zai.posts) <= 2  # the parallel calls of this one attempt, never a retry


async def test_a_refusal_in_one_parallel_call_fails_the_request(zai: FakeZai) -> None:
    zai.fail("1301")
    with pytest.raises(UpstreamRejected):
        await call_adapter(zai, n=3)


async def test_a_bad_key_is_a_502_that_keeps_the_key_secret(zai: FakeZai, open_gateway: GatewayOpener,
                                                             http: aiohttp.ClientSession,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "ffffffffffffffffffffffffffffffff.WrongZhipuSecret"
    monkeypatch.setenv(KEY_ENV, wrong)
    gateway, _ = await open_gateway()
    request = {"model": "cogview", "prompt": "a crane"}
    async with http.post(f"{gateway.url}/v1/images/generations", json=request) as resp:
        text = await resp.text()
        assert resp.status == 502
    body = json.loads(text)["error"]
    assert body["code"] == "upstream_auth_failed" and "Upstream 'zhipu'" in body["message"]
    assert wrong not in text and API_KEY not in text
    assert zai.posts[0].headers["authorization"] == f"Bearer {wrong}"


async def test_a_server_error_is_retried(zai: FakeZai, open_gateway: GatewayOpener) -> None:
    zai.fail("500")
    _, client = await open_gateway(attempts=2)
    result = await client.images.generate(model="cogview", prompt="a crane")
    assert len(result.data) == 1 and len(zai.posts) == 2
