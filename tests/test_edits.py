"""`POST /v1/images/edits` and `/v1/images/variations`: the SDK's multipart, JSON references, every input
check, and what the offline renderer makes of the inputs."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import warnings
import zlib
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from PIL import Image, ImageChops

from service.settings import GatewayConfig
from tests.conftest import Gateway, GatewayFactory
from tests.pictures import data_url, decode, encode, mask_png, photo, png

HOLE = (16, 20, 47, 35)  # inclusive box of the mask's transparent area


def inside(x: int, y: int) -> bool:
    return HOLE[0] <= x <= HOLE[2] and HOLE[1] <= y <= HOLE[3]


async def test_sdk_edit_repaints_only_where_the_mask_is_transparent(gateway: Gateway) -> None:
    original = photo((64, 64))
    result = await gateway.client().images.edit(
        image=("photo.png", encode(original), "image/png"),
        mask=("mask.png", mask_png((64, 64), HOLE), "image/png"),
        prompt="a red balloon", model="imagegw-local")
    edited = decode(result.data[0].b64_json).convert("RGB")
    assert edited.size == (64, 64) and result.size == "64x64"  # an edit keeps the input's size by default
    changed = {(x, y) for y in range(64) for x in range(64)
               if edited.getpixel((x, y)) != original.getpixel((x, y))}
    hole = {(x, y) for y in range(64) for x in range(64) if inside(x, y)}
    assert changed <= hole  # nothing outside the transparent area moved
    assert len(changed) > 0.9 * len(hole)  # and the area itself was really painted


async def test_sdk_edit_without_mask_paints_over_the_whole_image(gateway: Gateway) -> None:
    original = photo((48, 32))
    result = await gateway.client().images.edit(image=("photo.png", encode(original), "image/png"),
                                                prompt="fog", size="96x64")
    edited = decode(result.data[0].b64_json).convert("RGB")
    assert edited.size == (96, 64)
    difference = ImageChops.difference(edited, original.resize((96, 64))).tobytes()
    changed = sum(1 for i in range(0, len(difference), 3) if difference[i:i + 3] != b"\0\0\0")
    assert changed > 0.9 * 96 * 64


async def test_sdk_edit_takes_a_flat_picture(gateway: Gateway) -> None:
    """A large single-colour upload compresses a thousandfold: it is whole, not corrupt."""
    flat = Image.new("RGB", (1024, 1024), "teal")
    result = await gateway.client().images.edit(image=("flat.png", encode(flat), "image/png"), prompt="a moon",
                                                size="1024x1024")
    assert decode(result.data[0].b64_json).size == (1024, 1024)


async def test_sdk_edit_with_several_images_uses_them_all(gateway: Gateway) -> None:
    client = gateway.client()
    first, second = png((64, 64), seed=1), encode(photo((32, 32), seed=99), "JPEG")
    one = await client.images.edit(image=[("a.png", first, "image/png")], prompt="a collage", n=1)
    both = await client.images.edit(image=[("a.png", first, "image/png"), ("b.jpg", second, "image/jpeg")],
                                    prompt="a collage", n=2)
    assert len(both.data) == 2
    assert decode(both.data[0].b64_json).size == (64, 64)  # the first image sets the size
    assert both.data[0].b64_json != one.data[0].b64_json  # the second image is in the picture


async def test_json_edit_takes_data_urls_and_bare_base64(gateway: Gateway, http: aiohttp.ClientSession
                                                         ) -> None:
    body = {"prompt": "snow", "image": [data_url(png((40, 40))), base64.b64encode(png((20, 20))).decode()],
            "mask": data_url(mask_png((40, 40), (0, 0, 9, 9)))}
    async with http.post(gateway.url + "/v1/images/edits", json=body) as resp:
        assert resp.status == 200, await resp.text()
        edited = decode((await resp.json())["data"][0]["b64_json"]).convert("RGB")
    original = photo((40, 40))
    changed = [(x, y) for y in range(40) for x in range(40)
               if edited.getpixel((x, y)) != original.getpixel((x, y))]
    assert changed and all(x <= 9 and y <= 9 for x, y in changed)


@pytest.mark.parametrize(("path", "key"), [("/v1/images/generations", "b64_json"),
                                           ("/api/images/generations", "url")])
async def test_image_on_the_generations_endpoint_makes_an_edit(
    gateway: Gateway, http: aiohttp.ClientSession, path: str, key: str
) -> None:
    body = {"prompt": "make it night", "image": base64.b64encode(png((72, 40))).decode()}
    async with http.post(gateway.url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        item = (await resp.json())["data"][0]
    assert set(item) == {key}  # /api keeps seed 002's default response_format url, /v1 keeps b64_json
    if key == "url":
        async with http.get(item["url"]) as resp:
            raw = await resp.read()
    else:
        raw = base64.b64decode(item["b64_json"])
    assert Image.open(io.BytesIO(raw)).size == (72, 40)  # the input's size: it was an edit, not a generation


async def test_sdk_variations(gateway: Gateway) -> None:
    original = photo((64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks the endpoint deprecated
        client = gateway.client()
        result = await client.images.create_variation(image=("p.png", encode(original), "image/png"), n=2)
    first, second = (decode(item.b64_json).convert("RGB") for item in result.data)
    assert first.size == second.size == (64, 64)
    assert first.tobytes() != second.tobytes()
    assert first.tobytes() != original.tobytes()


def truncated_png() -> bytes:
    data = png((64, 64))
    return data[: len(data) // 2]


def corrupt_png() -> bytes:
    """Every chunk's CRC right, but a byte of the compressed pixels changed: only decoding them tells."""
    data = bytearray(png((64, 64)))
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8:start - 4])[0]
    data[start + length // 2] ^= 0xFF
    data[start + length:start + length + 4] = struct.pack(">I", zlib.crc32(data[start - 4:start + length]))
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encode(photo(), "JPEG")
    return data[: len(data) // 2]


def bomb_png() -> bytes:
    """A valid PNG header declaring 100000 x 100000 pixels: refused before any decoding."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def rgb_mask() -> bytes:
    return png((64, 64))  # PNG, right size, but no alpha channel


@pytest.mark.parametrize(("files", "fields", "param", "code"), [
    ({"image": truncated_png()}, {}, "image", "invalid_image"),
    ({"image": corrupt_png()}, {}, "image", "invalid_image"),
    ({"image": truncated_jpeg()}, {}, "image", "invalid_image"),
    ({"image": b"just some text, named like a picture"}, {}, "image", "invalid_image_format"),
    ({"image": bomb_png()}, {}, "image", "image_too_large"),
    ({"image[]": [png(), truncated_png()]}, {}, "image[1]", "invalid_image"),
    ({"image": png(), "mask": rgb_mask()}, {}, "mask", "invalid_mask"),
    ({"image": png(), "mask": mask_png((32, 32), (0, 0, 4, 4))}, {}, "mask", "invalid_mask"),
    ({"image": png(), "mask": encode(photo(), "JPEG")}, {}, "mask", "invalid_image_format"),
    ({"image": png(), "mask": b"\x89PNG\r\n\x1a\n garbage"}, {}, "mask", "invalid_image_format"),
    ({}, {}, "image", "missing_required_parameter"),
    ({"image": png()}, {"n": "two"}, "n", "invalid_type"),
    ({"image": png()}, {"stream": "maybe"}, "stream", "invalid_type"),
    ({"image": png()}, {"n": "11"}, "n", "invalid_value"),
    ({"image": png()}, {"colour": "red"}, "colour", "unknown_parameter"),
    ({"image": png()}, {"size": "10x10"}, "size", "invalid_value"),
    ({"image": png()}, {"model": "dall-e-3", "stream": "true"}, "stream", "unsupported_parameter"),
])
async def test_bad_uploads_are_400s_naming_the_field(
    gateway: Gateway, http: aiohttp.ClientSession, files: dict[str, Any], fields: dict[str, str], param: str,
    code: str
) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("prompt", "a cat")
    for name, value in fields.items():
        form.add_field(name, value)
    for name, value in files.items():
        for data in value if isinstance(value, list) else [value]:
            form.add_field(name, data, filename="upload.png", content_type="image/png")
    async with http.post(gateway.url + "/v1/images/edits", data=form) as resp:
        body = await resp.json()
        assert resp.status == 400, body
    assert body["error"]["param"] == param and body["error"]["code"] == code
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


async def test_sdk_sees_truncated_png_as_bad_request(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().images.edit(image=("broken.png", truncated_png(), "image/png"), prompt="x")
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "image"


async def test_fifty_megabyte_upload_is_refused(gateway: Gateway) -> None:
    # sent over a raw socket to the end: HTTP clients stop sending at an early answer, and the server would
    # then linger 10 s for the rest of the body
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"huge.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = len(head) + 50 * 1024 * 1024 + len(tail)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.settings.port)
    writer.write(f"POST /v1/images/edits HTTP/1.1\r\nHost: gateway\r\nContent-Length: {size}\r\nConnection: "
                 f"close\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode())
    writer.write(head + b"\0" * (50 * 1024 * 1024) + tail)
    _, answer = await asyncio.gather(writer.drain(), reader.read())
    writer.close()
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413 ")
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "payload_too_large"


async def test_image_over_the_per_image_limit_is_refused(gateway_factory: GatewayFactory,
                                                         http: aiohttp.ClientSession) -> None:
    gateway = await gateway_factory(max_input_image_bytes=10_000)
    form = aiohttp.FormData()
    form.add_field("prompt", "big")
    form.add_field("image", png((64, 64)), filename="ok.png", content_type="image/png")
    form.add_field("mask", png((256, 256)), filename="big.png", content_type="image/png")
    async with http.post(gateway.url + "/v1/images/edits", data=form) as resp:
        body = await resp.json()
        assert resp.status == 400
    assert body["error"]["param"] == "mask" and body["error"]["code"] == "file_too_large"


def config_with(provider_type: str) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "providers": {"up": {"type": provider_type, "base_url": "http://127.0.0.1:9", "api_key_env": "NONE"}},
        "models": {"text-to-image": {"deployments": [{"provider": "up"}]}},
    })


@pytest.mark.parametrize(("provider_type", "path", "operation"), [
    ("zai", "/v1/images/edits", "edit"),
    ("gemini", "/v1/images/variations", "variation"),
])
async def test_models_that_cannot_edit_refuse_before_anything_is_queued(
    gateway_factory: GatewayFactory, redis_url: str, http: aiohttp.ClientSession, provider_type: str,
    path: str, operation: str
) -> None:
    # Redis mode with no worker: whatever got queued would stay visible in Redis
    gateway = await gateway_factory(config=config_with(provider_type), redis_url=redis_url)
    form = aiohttp.FormData()
    if operation == "edit":
        form.add_field("prompt", "x")
    form.add_field("model", "text-to-image")
    form.add_field("image", png(), filename="a.png", content_type="image/png")
    async with http.post(gateway.url + path, data=form) as resp:
        body = await resp.json()
        assert resp.status == 400
    assert body["error"] == {"message": f"Model 'text-to-image' cannot {operation} images.", "param": "model",
                             "type": "invalid_request_error", "code": "unsupported_operation"}
    client = aioredis.from_url(redis_url)
    try:
        assert await client.keys("imagegw:job:*") == []
        assert await client.zcard(gateway.settings.queue_name) == 0
    finally:
        await client.aclose()
    files = gateway.settings.data_dir / "files"
    assert not files.exists() or not any(files.iterdir())  # no input image stored either
