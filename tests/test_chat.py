"""`POST /v1/chat/completions` with image output (seed 001): images as data-URL content parts, edits from
image_url parts, and clear 400s for what only a text model could answer."""

from __future__ import annotations

import base64
import io
from typing import Any

import aiohttp
import openai
import pytest
from PIL import Image

from tests.conftest import Gateway
from tests.pictures import data_url, photo, png


def from_data_url(url: str) -> Image.Image:
    header, _, payload = url.partition(",")
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(payload)))


async def test_sdk_chat_completion_returns_images_as_data_urls(gateway: Gateway) -> None:
    completion = await gateway.client().chat.completions.create(
        model="imagegw-local",
        messages=[{"role": "user", "content": "Generate a beautiful sunset over mountains"}],
        extra_body={"modalities": ["image", "text"], "size": "96x64"})
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == "imagegw-local" and completion.choices[0].finish_reason == "stop"
    message = completion.choices[0].message
    assert message.role == "assistant"
    content: Any = message.content
    assert [part["type"] for part in content] == ["image_url"]
    image = from_data_url(content[0]["image_url"]["url"])
    assert image.size == (96, 64) and image.format == "PNG"
    assert (message.model_extra or {})["images"] == content  # OpenRouter's place for them too


async def test_image_url_parts_make_it_an_edit(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    original = photo((40, 30))
    body = {"model": "imagegw-local", "modalities": ["image", "text"], "messages": [
        {"role": "system", "content": "You draw."},
        {"role": "user", "content": [{"type": "text", "text": "add snow"},
                                     {"type": "image_url", "image_url": {"url": data_url(png((40, 30)))}}]}]}
    async with http.post(gateway.url + "/api/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        completion = await resp.json()
    parts = completion["choices"][0]["message"]["content"]
    edited = from_data_url(parts[0]["image_url"]["url"]).convert("RGB")
    assert edited.size == (40, 30)  # the input's size: an edit of it
    assert edited.tobytes() != original.tobytes()


@pytest.mark.parametrize(("change", "param", "code"), [
    ({"modalities": None}, "modalities", "unsupported_modalities"),
    ({"modalities": ["text"]}, "modalities", "unsupported_modalities"),
    ({"modalities": ["image", "audio"]}, "modalities", "unsupported_modalities"),
    ({"stream": True}, "stream", "unsupported_parameter"),
    ({"model": "gpt-4o"}, "model", "model_not_supported"),
    ({"messages": [{"role": "system", "content": "draw"}]}, "messages", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", "missing_prompt"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0]", "invalid_value"),
    ({"n": "2"}, "n", "invalid_type"),
    ({"model": "dall-e-3", "size": "64x64"}, "size", "invalid_value"),
    ({"messages": []}, "messages", "invalid_value"),
])
async def test_requests_only_a_text_model_could_answer_are_400s(
    gateway: Gateway, http: aiohttp.ClientSession, change: dict[str, Any], param: str, code: str
) -> None:
    body = {"model": "imagegw-local", "modalities": ["image", "text"],
            "messages": [{"role": "user", "content": "a cat"}], **change}
    body = {k: v for k, v in body.items() if v is not None}
    async with http.post(gateway.url + "/v1/chat/completions", json=body) as resp:
        error = (await resp.json())["error"]
        assert resp.status == 400, error
    assert error["param"] == param and error["code"] == code and error["type"] == "invalid_request_error"


async def test_sdk_without_image_modality_gets_a_bad_request(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError, match="only generates images"):
        await gateway.client().chat.completions.create(model="imagegw-local",
                                                       messages=[{"role": "user", "content": "hello"}])
