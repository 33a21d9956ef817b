"""`POST /v1/images/generations`: the SDK's view, every parameter's validation, the error shape."""

from __future__ import annotations

import base64
import io
from typing import Any

import aiohttp
import openai
import pytest
from PIL import Image

from tests.conftest import Gateway, GatewayFactory


def decode(b64: str | None) -> Image.Image:
    assert b64
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize(
    ("params", "size", "fmt", "mode"),
    [
        ({"model": "gpt-image-1", "size": "1536x1024", "output_format": "jpeg", "output_compression": 50},
         (1536, 1024), "JPEG", "RGB"),
        ({"model": "gpt-image-1", "size": "1024x1024", "background": "transparent"}, (1024, 1024), "PNG", "RGBA"),
        ({"model": "gpt-image-1", "background": "transparent", "output_format": "webp"}, (1024, 1024), "WEBP", None),
        ({"model": "dall-e-3", "size": "1792x1024", "quality": "hd", "style": "natural"}, (1792, 1024), "PNG", "RGB"),
        ({"size": "640x360"}, (640, 360), "PNG", "RGB"),
    ],
)
async def test_sdk_b64_images_have_requested_size_and_format(
    gateway: Gateway, params: dict[str, Any], size: tuple[int, int], fmt: str, mode: str | None
) -> None:
    result = await gateway.client().images.generate(prompt="a lighthouse at dusk", **params)
    image = decode(result.data[0].b64_json)
    assert image.size == size and image.format == fmt
    if mode:
        assert image.mode == mode
    if params.get("background") == "transparent":
        alpha = image.convert("RGBA").getchannel("A")
        assert alpha.histogram()[0] > image.width * image.height // 10  # real alpha, not a painted background
        assert result.background == "transparent"
    assert result.created > 0 and result.size == f"{size[0]}x{size[1]}"
    assert result.output_format == fmt.lower()


async def test_sdk_url_images_download_through_signed_links(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    result = await gateway.client().images.generate(prompt="two moons", n=3, size="256x256", response_format="url")
    assert len(result.data) == 3
    bodies = set()
    for item in result.data:
        assert item.url and item.url.startswith(gateway.url + "/v1/files/")
        async with http.get(item.url) as resp:
            assert resp.status == 200 and resp.content_type == "image/png"
            body = await resp.read()
        assert Image.open(io.BytesIO(body)).size == (256, 256)
        bodies.add(body)
    assert len(bodies) == 3  # n images are n different pictures

    tampered = result.data[0].url.replace("signature=", "signature=0")
    async with http.get(tampered) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "invalid_signature"
    expired = result.data[0].url.split("?")[0] + "?expires=1000&signature=" + "0" * 64
    async with http.get(expired) as resp:
        assert resp.status == 403
    async with http.get(gateway.url + "/v1/files/..%2F..%2Fetc/passwd?expires=9999999999&signature=x") as resp:
        assert resp.status == 404


async def test_api_alias_defaults_to_url(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.post(gateway.url + "/api/images/generations", json={"prompt": "cat", "size": "64x64"}) as resp:
        body = await resp.json()
    assert resp.status == 200 and "url" in body["data"][0] and "b64_json" not in body["data"][0]
    async with http.post(gateway.url + "/v1/images/generations", json={"prompt": "cat", "size": "64x64"}) as resp:
        body = await resp.json()
    assert "b64_json" in body["data"][0]


async def test_same_prompt_same_picture(gateway: Gateway) -> None:
    client = gateway.client()
    a = await client.images.generate(prompt="stable", size="128x128")
    b = await client.images.generate(prompt="stable", size="128x128")
    c = await client.images.generate(prompt="different", size="128x128")
    assert a.data[0].b64_json == b.data[0].b64_json != c.data[0].b64_json


# Each row: a request body that breaks one rule of the seed documents, and the parameter the 400 must name.
BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x" * 1001, "model": "dall-e-2"}, "prompt"),
    ({"prompt": "x" * 4001, "model": "dall-e-3"}, "prompt"),
    ({"prompt": "x" * 32001, "model": "gpt-image-1"}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "n": "2"}, "n"),
    ({"prompt": "x", "n": 1.5}, "n"),
    ({"prompt": "x", "n": 2, "model": "dall-e-3"}, "n"),
    ({"prompt": "x", "quality": "ultra"}, "quality"),
    ({"prompt": "x", "quality": "hd", "model": "gpt-image-1"}, "quality"),
    ({"prompt": "x", "quality": "high", "model": "dall-e-3"}, "quality"),
    ({"prompt": "x", "quality": "hd", "model": "dall-e-2"}, "quality"),
    ({"prompt": "x", "response_format": "png"}, "response_format"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": 1024}, "size"),
    ({"prompt": "x", "size": "1792x1024", "model": "dall-e-2"}, "size"),
    ({"prompt": "x", "size": "512x512", "model": "dall-e-3"}, "size"),
    ({"prompt": "x", "size": "1792x1024", "model": "gpt-image-1"}, "size"),
    ({"prompt": "x", "size": "99999x99999"}, "size"),
    ({"prompt": "x", "style": "cartoon"}, "style"),
    ({"prompt": "x", "style": "vivid", "model": "gpt-image-1"}, "style"),
    ({"prompt": "x", "user": 42}, "user"),
    ({"prompt": "x", "background": "green"}, "background"),
    ({"prompt": "x", "background": "transparent", "output_format": "jpeg"}, "background"),
    ({"prompt": "x", "background": "transparent", "model": "dall-e-3"}, "background"),
    ({"prompt": "x", "output_format": "gif"}, "output_format"),
    ({"prompt": "x", "output_format": "png", "model": "dall-e-3"}, "output_format"),
    ({"prompt": "x", "output_compression": 101, "output_format": "jpeg"}, "output_compression"),
    ({"prompt": "x", "output_compression": -1, "output_format": "jpeg"}, "output_compression"),
    ({"prompt": "x", "output_compression": 50}, "output_compression"),
    ({"prompt": "x", "output_compression": "50", "output_format": "webp"}, "output_compression"),
    ({"prompt": "x", "moderation": "strict"}, "moderation"),
    ({"prompt": "x", "moderation": "low", "model": "dall-e-3"}, "moderation"),
    ({"prompt": "x", "partial_images": 4}, "partial_images"),
    ({"prompt": "x", "partial_images": -1}, "partial_images"),
    ({"prompt": "x", "partial_images": 1, "model": "dall-e-3"}, "partial_images"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
]


@pytest.mark.parametrize(("body", "param"), BAD_INPUTS)
async def test_bad_input_is_a_400_naming_the_parameter(
    gateway: Gateway, http: aiohttp.ClientSession, body: dict[str, Any], param: str
) -> None:
    async with http.post(gateway.url + "/v1/images/generations", json=body) as resp:
        assert resp.status == 400, await resp.text()
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


async def test_sdk_raises_bad_request_with_param(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await gateway.client().images.generate(prompt="x", model="dall-e-3", n=2)
    assert info.value.param == "n"


async def test_error_shapes_for_transport_failures(gateway_factory: GatewayFactory,
                                                   http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(max_body_bytes=1024)
    url = gw.url + "/v1/images/generations"
    cases = [
        (http.post(url, data=b"{not json", headers={"Content-Type": "application/json"}), 400, "invalid_json"),
        (http.post(url, data=b"[1, 2]", headers={"Content-Type": "application/json"}), 400, "invalid_json"),
        (http.post(url, json={"prompt": "x", "model": "no-such-model"}), 404, "model_not_found"),
        (http.post(url, json={"prompt": "x" * 5000}), 413, "payload_too_large"),
        (http.get(url), 405, None),
        (http.get(gw.url + "/v1/nothing-here"), 404, None),
        (http.get(gw.url + "/v1/images/jobs/0123456789abcdef0123456789abcdef"), 404, "job_not_found"),
    ]
    for request, status, code in cases:
        async with request as resp:
            assert resp.status == status
            assert resp.content_type == "application/json"
            error = (await resp.json())["error"]
            assert set(error) == {"message", "type", "param", "code"}
            if code:
                assert error["code"] == code


async def test_models_list_with_capabilities(gateway: Gateway) -> None:
    models = await gateway.client().models.list()
    ids = {m.id for m in models.data}
    assert {"imagegw-local", "dall-e-3", "gpt-image-1"} <= ids
    card = next(m for m in models.data if m.id == "imagegw-local")
    assert card.model_extra and card.model_extra["capabilities"]["generation"] is True
    assert card.model_extra["capabilities"]["progress"] is True
    assert (await gateway.client().models.retrieve("dall-e-3")).id == "dall-e-3"
    with pytest.raises(openai.NotFoundError):
        await gateway.client().models.retrieve("nope")
