"""The Gemini adapter against a fake Gemini API: the exact requests it sends and what the gateway answers."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from PIL import Image

from service.errors import GatewayError, UpstreamError, UpstreamRejected, UpstreamTimeout
from service.models import FAMILIES, resolve_spec
from service.schemas import ImageGenerationRequest, ImageSpec
from service.settings import DeploymentConfig, GatewayConfig, ProviderConfig
from tests.conftest import GatewayFactory, free_port
from tests.fakes.gemini import (
    API_KEY,
    GEMINI_SIZES,
    IMAGE_OUTPUT_TOKENS,
    IMAGE_PROMPT_TOKENS,
    TEXT_ANSWER,
    FakeGemini,
)
from tests.fakes.recording import TRANSPORT_HEADERS, RecordingProgress, image_dimensions, png
from workers.providers.base import Deployment, ImageRequest, InputImage, ProviderResult
from workers.providers.gemini import GeminiProvider
from workers.providers.translation import MASK_INSTRUCTION

KEY_ENV = "IMAGEGW_TEST_GEMINI_KEY"
MODEL = "gemini-2.5-flash-image"
IMAGEN = "imagen-4.0-generate-001"
PROMPT = "a red fox in fresh snow"


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeGemini]:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    async with FakeGemini() as server:
        yield server


def spec(**fields: Any) -> ImageSpec:
    return ImageSpec(**{"model": "nano", "prompt": PROMPT, "size": "auto", **fields})


async def generate(http: aiohttp.ClientSession, base_url: str, request: ImageRequest | ImageSpec,
                   model: str = MODEL, deadline: float | None = None,
                   progress: RecordingProgress | None = None, **options: Any) -> ProviderResult:
    config = ProviderConfig(type="gemini", base_url=base_url, api_key_env=KEY_ENV)
    deployment = Deployment.resolve("nano", 0, "google", config, DeploymentConfig(
        provider="google", model=model, timeout=deadline, options=options))
    provider = GeminiProvider("google", config, http)
    provider.check_deployment(deployment)
    if isinstance(request, ImageSpec):
        request = ImageRequest(spec=request)
    return await provider.generate(request, deployment, progress or RecordingProgress())


async def test_generation_sends_the_documented_request(fake: FakeGemini, http: aiohttp.ClientSession) -> None:
    progress = RecordingProgress()
    result = await generate(http, fake.url, spec(size="1792x1024"), progress=progress)

    [call] = fake.calls
    assert (call.method, call.path, call.query) == ("POST", f"/v1beta/models/{MODEL}:generateContent", {})
    assert set(call.headers) == TRANSPORT_HEADERS | {"content-type", "x-goog-api-key"}
    assert call.headers["x-goog-api-key"] == API_KEY
    assert call.headers["content-type"] == "application/json"
    assert call.json == {
        "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
        "generationConfig": {"responseModalities": ["TEXT", "IMAGE"], "imageConfig": {"aspectRatio": "16:9"}},
    }
    [image] = result.images
    assert image.data == fake.images[0] and image.format == "png"
    assert image_dimensions(image.data) == (1344, 768) and result.size == "1344x768"
    assert image.revised_prompt == TEXT_ANSWER
    words = len(PROMPT.split())
    assert result.usage == {"input_tokens": words, "output_tokens": IMAGE_OUTPUT_TOKENS,
                            "total_tokens": words + IMAGE_OUTPUT_TOKENS,
                            "input_tokens_details": {"text_tokens": words, "image_tokens": 0}}
    assert progress.updates[0][0] == 0.0 and progress.updates[-1] == (1.0, "received 1/1 images")
    assert progress.partials == []


async def test_n_fans_out_into_parallel_calls_with_distinct_seeds(fake: FakeGemini,
                                                                  http: aiohttp.ClientSession) -> None:
    result = await generate(http, fake.url, spec(n=3, seed=41, size="1024x1024"))

    assert len(fake.calls) == 3
    assert sorted(call.json["generationConfig"]["seed"] for call in fake.calls) == [41, 42, 43]
    assert all(call.json["generationConfig"]["imageConfig"] == {"aspectRatio": "1:1"} for call in fake.calls)
    assert sorted(image.data for image in result.images) == sorted(fake.images) and len(set(fake.images)) == 3
    words = len(PROMPT.split())
    assert result.usage is not None
    assert result.usage == {"input_tokens": 3 * words, "output_tokens": 3 * IMAGE_OUTPUT_TOKENS,
                            "total_tokens": 3 * (words + IMAGE_OUTPUT_TOKENS),
                            "input_tokens_details": {"text_tokens": 3 * words, "image_tokens": 0}}


async def test_one_failed_call_of_a_fan_out_fails_the_request_with_its_own_error(
        fake: FakeGemini, http: aiohttp.ClientSession) -> None:
    fake.fail_next("unavailable", retry_after="2")
    with pytest.raises(UpstreamError) as failed:  # the upstream's error itself, not an ExceptionGroup
        await generate(http, fake.url, spec(n=3))
    assert "UNAVAILABLE: The model is overloaded" in failed.value.message and failed.value.retry_after == 2.0


async def test_a_deployment_may_ask_for_several_candidates_a_call(fake: FakeGemini,
                                                                   http: aiohttp.ClientSession) -> None:
    result = await generate(http, fake.url, spec(n=3), images_per_call=2)
    configs = sorted((call.json["generationConfig"] for call in fake.calls), key=len)
    assert configs == [{"responseModalities": ["TEXT", "IMAGE"]},
                       {"responseModalities": ["TEXT", "IMAGE"], "candidateCount": 2}]
    assert sorted(image.data for image in result.images) == sorted(fake.images) and len(fake.images) == 3
    assert result.usage is not None and result.usage["output_tokens"] == 3 * IMAGE_OUTPUT_TOKENS


@pytest.mark.parametrize(("size", "ratio"), [
    ("1024x1024", "1:1"), ("1024x1536", "2:3"), ("1536x1024", "3:2"), ("1024x1792", "9:16"),
    ("1792x1024", "16:9"), ("2560x1080", "21:9"), ("1200x1000", "5:4"), ("768x1024", "3:4"),
])
async def test_size_becomes_the_nearest_aspect_ratio(fake: FakeGemini, http: aiohttp.ClientSession, size: str,
                                                     ratio: str) -> None:
    result = await generate(http, fake.url, spec(size=size))
    assert fake.calls[0].json["generationConfig"]["imageConfig"] == {"aspectRatio": ratio}
    assert result.size == "{}x{}".format(*GEMINI_SIZES[ratio])


async def test_auto_size_sends_no_image_config(fake: FakeGemini, http: aiohttp.ClientSession) -> None:
    result = await generate(http, fake.url, spec(size="auto"), model="gemini-3-pro-image-preview",
                            image_size="2K")
    assert fake.calls[0].json["generationConfig"] == {"responseModalities": ["TEXT", "IMAGE"],
                                                      "imageConfig": {"imageSize": "2K"}}
    assert result.size == "1024x1024"


async def test_edit_sends_input_images_and_describes_the_mask(fake: FakeGemini,
                                                              http: aiohttp.ClientSession) -> None:
    photo, sketch, mask = png(640, 480, "photo"), png(300, 300, "sketch"), png(640, 480, "mask")
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(sketch)).save(jpeg, "JPEG")
    request = ImageRequest(spec=spec(operation="edit", prompt="put a hat on the fox"),
                           images=[InputImage(photo, "png"), InputImage(jpeg.getvalue(), "jpeg")],
                           mask=InputImage(mask, "png"))
    result = await generate(http, fake.url, request)

    def inline(data: bytes, mime: str) -> dict[str, Any]:
        return {"inlineData": {"mimeType": mime, "data": base64.b64encode(data).decode()}}

    assert fake.calls[0].json["contents"] == [{"role": "user", "parts": [
        {"text": "put a hat on the fox"}, inline(photo, "image/png"), inline(jpeg.getvalue(), "image/jpeg"),
        inline(mask, "image/png"), {"text": MASK_INSTRUCTION},
    ]}]
    assert result.size == "640x480"  # no ratio asked: the model keeps the input's shape
    words = len("put a hat on the fox".split()) + len(MASK_INSTRUCTION.split())
    assert result.usage is not None
    assert result.usage["input_tokens"] == words + 3 * IMAGE_PROMPT_TOKENS
    assert result.usage["input_tokens_details"] == {"text_tokens": words,
                                                    "image_tokens": 3 * IMAGE_PROMPT_TOKENS}


async def test_imagen_goes_through_predict_four_images_a_call(fake: FakeGemini,
                                                              http: aiohttp.ClientSession) -> None:
    result = await generate(http, fake.url, spec(n=6, size="1792x1024"), model=IMAGEN,
                            person_generation="allow_adult")

    assert {call.path for call in fake.calls} == {f"/v1beta/models/{IMAGEN}:predict"}
    assert all(call.headers["x-goog-api-key"] == API_KEY for call in fake.calls)
    assert sorted((call.json for call in fake.calls), key=lambda body: body["parameters"]["sampleCount"]) == [
        {"instances": [{"prompt": PROMPT}], "parameters": {
            "sampleCount": count, "includeRaiReason": True, "aspectRatio": "16:9",
            "personGeneration": "allow_adult"}}
        for count in (2, 4)]
    assert len(result.images) == 6 and sorted(i.data for i in result.images) == sorted(fake.images)
    assert result.size == "1408x768" and result.usage is None


async def test_imagen_refuses_edits_and_seeds(fake: FakeGemini, http: aiohttp.ClientSession) -> None:
    request = ImageRequest(spec=spec(operation="edit"), images=[InputImage(png(8, 8, "x"), "png")])
    with pytest.raises(UpstreamRejected) as edit:
        await generate(http, fake.url, request, model=IMAGEN)
    assert edit.value.param == "model" and "cannot edit" in edit.value.message
    with pytest.raises(UpstreamRejected) as seed:
        await generate(http, fake.url, spec(seed=5), model=IMAGEN)
    assert seed.value.param == "seed" and seed.value.code == "unsupported_parameter"
    assert fake.calls == []


@pytest.mark.parametrize(("fields", "param"), [
    ({"style": "vivid"}, "style"), ({"negative_prompt": "blur"}, "negative_prompt"),
    ({"background": "transparent"}, "background"), ({"seed": 2**31}, "seed"),
])
async def test_parameters_gemini_lacks_are_refused(fake: FakeGemini, http: aiohttp.ClientSession,
                                                   fields: dict[str, Any], param: str) -> None:
    with pytest.raises(UpstreamRejected) as refused:
        await generate(http, fake.url, spec(**fields))
    assert refused.value.param == param and refused.value.status == 400
    assert fake.calls == []


async def test_bad_key_is_a_502_naming_the_upstream(fake: FakeGemini, http: aiohttp.ClientSession,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "AIza-wrong-key-42")
    with pytest.raises(UpstreamError) as failed:
        await generate(http, fake.url, spec())
    assert failed.value.status == 502 and failed.value.code == "upstream_auth_failed"
    assert failed.value.message == (f"Upstream 'google' (gemini, model '{MODEL}') refused the gateway's "
                                    "credentials: HTTP 400: INVALID_ARGUMENT API_KEY_INVALID: API key not "
                                    "valid. Please pass a valid API key.")
    assert fake.calls[0].headers["x-goog-api-key"] == "AIza-wrong-key-42"


async def test_missing_key_is_a_502(fake: FakeGemini, http: aiohttp.ClientSession,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(UpstreamError) as failed:
        await generate(http, fake.url, spec())
    assert failed.value.code == "upstream_auth_failed" and "PERMISSION_DENIED" in failed.value.message
    assert "x-goog-api-key" not in fake.calls[0].headers


async def test_an_echoed_key_is_redacted(fake: FakeGemini, http: aiohttp.ClientSession) -> None:
    fake.fail_next("server_error", message=f"backend refused key {API_KEY} for this project")
    with pytest.raises(UpstreamError) as failed:
        await generate(http, fake.url, spec())
    assert API_KEY not in failed.value.message
    assert "INTERNAL: backend refused key [redacted] for this project" in failed.value.message


@pytest.mark.parametrize(("retry_after", "wait"), [("7", 7.0), (None, 13.0)])
async def test_429_keeps_the_upstreams_delay(fake: FakeGemini, http: aiohttp.ClientSession,
                                             retry_after: str | None, wait: float) -> None:
    fake.fail_next("rate_limit", retry_after=retry_after)
    with pytest.raises(UpstreamError) as failed:
        await generate(http, fake.url, spec())
    assert failed.value.status == 502 and failed.value.code == "upstream_rate_limited"
    assert failed.value.retry_after == wait  # Retry-After first, else Google's RetryInfo
    assert "RESOURCE_EXHAUSTED: You exceeded your current quota" in failed.value.message


@pytest.mark.parametrize(("kind", "status_name"), [("server_error", "INTERNAL"),
                                                   ("unavailable", "UNAVAILABLE")])
async def test_server_errors_are_502s(fake: FakeGemini, http: aiohttp.ClientSession, kind: str,
                                      status_name: str) -> None:
    fake.fail_next(kind)
    with pytest.raises(UpstreamError) as failed:
        await generate(http, fake.url, spec())
    assert type(failed.value) is UpstreamError and failed.value.code == "upstream_error"
    assert failed.value.message.startswith(f"Upstream 'google' (gemini, model '{MODEL}') failed: HTTP ")
    assert status_name in failed.value.message and failed.value.retry_after is None


@pytest.mark.parametrize(("kind", "reason"), [
    ("blocked_prompt", "the prompt was blocked (PROHIBITED_CONTENT)"),
    ("image_safety", "generation stopped (IMAGE_SAFETY): Unable to show the generated image."),
    ("no_image", "the model returned no image; it said: I can't create that image."),
])
async def test_safety_blocks_are_400s_with_the_reason(fake: FakeGemini, http: aiohttp.ClientSession,
                                                      kind: str, reason: str) -> None:
    fake.fail_next(kind)
    with pytest.raises(UpstreamRejected) as rejected:
        await generate(http, fake.url, spec())
    assert rejected.value.status == 400 and rejected.value.param == "prompt"
    assert reason in rejected.value.message
    assert len(fake.calls) == 1


async def test_imagen_filtered_images_are_a_400_with_the_reason(fake: FakeGemini,
                                                                http: aiohttp.ClientSession) -> None:
    fake.fail_next("image_safety")
    with pytest.raises(UpstreamRejected) as rejected:
        await generate(http, fake.url, spec(), model=IMAGEN)
    assert rejected.value.code == "content_policy_violation"
    assert "every image was filtered out (Your current safety filter threshold" in rejected.value.message


async def test_upstream_400_is_rejected_once(fake: FakeGemini, http: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamRejected) as rejected:
        await generate(http, fake.url, spec(size="1024x1024"), aspect_ratios=["7:5"])
    assert "INVALID_ARGUMENT: Unsupported aspect ratio: 7:5" in rejected.value.message
    assert len(fake.calls) == 1


async def test_unknown_model_is_a_502(fake: FakeGemini, http: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamError) as failed:
        await generate(http, fake.url, spec(), model="gemini-9-image")
    assert "NOT_FOUND: models/gemini-9-image is not found" in failed.value.message
    assert fake.calls[0].path == "/v1beta/models/gemini-9-image:generateContent"


async def test_slow_upstream_times_out(fake: FakeGemini, http: aiohttp.ClientSession) -> None:
    fake.delay = 2.0
    with pytest.raises(UpstreamTimeout) as failed:
        await generate(http, fake.url, spec(), deadline=0.2)
    assert failed.value.status == 504 and "no answer within 0.2 s" in failed.value.message


async def test_unreachable_upstream_is_a_502(http: aiohttp.ClientSession,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    with pytest.raises(UpstreamError) as failed:
        await generate(http, f"http://127.0.0.1:{free_port()}", spec())
    assert failed.value.code == "upstream_unreachable"


async def test_versioned_base_url_is_used_as_is(fake: FakeGemini, http: aiohttp.ClientSession) -> None:
    await generate(http, f"{fake.url}/v1", spec())
    assert fake.calls[0].path == f"/v1/models/{MODEL}:generateContent"


def test_the_gemini_family_validates_sizes_and_parameters() -> None:
    rules = FAMILIES["gemini"]
    ok = resolve_spec(ImageGenerationRequest(prompt="x", size="2560x1080", seed=3), "nano", rules, "b64_json")
    assert (ok.size, ok.seed) == ("2560x1080", 3)
    for body, param in [({"size": "4000x500"}, "size"), ({"quality": "hd"}, "quality"),
                        ({"background": "transparent"}, "background"), ({"style": "vivid"}, "style")]:
        with pytest.raises(GatewayError) as refused:
            resolve_spec(ImageGenerationRequest(prompt="x", **body), "nano", rules, "b64_json")
        assert refused.value.param == param
    with pytest.raises(GatewayError) as no_seed:
        resolve_spec(ImageGenerationRequest(prompt="x", seed=1), "imagen", FAMILIES["imagen"], "b64_json")
    assert no_seed.value.param == "seed"


# End to end: the official SDK against the gateway, the gateway against the fake.

def gateway_config(base_url: str, model: str = MODEL, family: str = "gemini") -> GatewayConfig:
    return GatewayConfig.model_validate({
        "providers": {"google": {"type": "gemini", "base_url": base_url, "api_key_env": KEY_ENV}},
        "models": {"nano-banana": {"family": family,
                                   "deployments": [{"provider": "google", "model": model}]}},
    })


async def test_sdk_gets_b64_and_url_images(fake: FakeGemini, gateway_factory: GatewayFactory,
                                           http: aiohttp.ClientSession) -> None:
    gateway = await gateway_factory(config=gateway_config(fake.url))
    client = gateway.client()

    result = await client.images.generate(model="nano-banana", prompt=PROMPT, size="1024x1536", n=2,
                                          response_format="b64_json")
    assert len(result.data) == 2 and len(fake.calls) == 2
    assert {call.json["generationConfig"]["imageConfig"]["aspectRatio"] for call in fake.calls} == {"2:3"}
    assert sorted(base64.b64decode(d.b64_json or "") for d in result.data) == sorted(fake.images)
    assert all(d.revised_prompt == TEXT_ANSWER for d in result.data)
    assert result.size == "832x1248"
    assert result.usage is not None and result.usage.output_tokens == 2 * IMAGE_OUTPUT_TOKENS

    result = await client.images.generate(model="nano-banana", prompt=PROMPT, response_format="url",
                                          output_format="webp")
    async with http.get(result.data[0].url or "") as resp:
        assert resp.status == 200
        image = Image.open(io.BytesIO(await resp.read()))
    assert image.format == "WEBP" and image.size == (1024, 1024)


async def test_sdk_gets_imagen_images(fake: FakeGemini, gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(config=gateway_config(fake.url, model=IMAGEN, family="imagen"))
    result = await gateway.client().images.generate(model="nano-banana", prompt=PROMPT, size="1024x1792", n=5)
    assert len(result.data) == 5 and result.size == "768x1408"
    assert sorted(call.json["parameters"]["sampleCount"] for call in fake.calls) == [1, 4]


async def test_sdk_sees_a_safety_block_as_400_with_the_reason(fake: FakeGemini,
                                                              gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(config=gateway_config(fake.url))
    fake.fail_next("blocked_prompt")
    with pytest.raises(openai.BadRequestError) as rejected:
        await gateway.client().images.generate(model="nano-banana", prompt=PROMPT)
    assert rejected.value.status_code == 400
    assert rejected.value.body is not None and "PROHIBITED_CONTENT" in rejected.value.body["message"]
    assert len(fake.calls) == 1  # a refusal is never retried


async def test_sdk_sees_a_bad_key_as_502_without_the_key(fake: FakeGemini, gateway_factory: GatewayFactory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "AIza-secret-but-wrong")
    gateway = await gateway_factory(config=gateway_config(fake.url))
    with pytest.raises(openai.APIStatusError) as failed:
        await gateway.client().images.generate(model="nano-banana", prompt=PROMPT)
    assert failed.value.status_code == 502
    assert "AIza-secret-but-wrong" not in failed.value.response.text
    assert "Upstream 'google'" in failed.value.response.text
    assert "API key not valid" in failed.value.response.text


async def test_sdk_edit_reaches_gemini_with_image_and_mask(fake: FakeGemini,
                                                           gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(config=gateway_config(fake.url))
    photo, canvas = png(320, 240, "photo"), Image.new("RGBA", (320, 240), (0, 0, 0, 255))
    canvas.paste((0, 0, 0, 0), (100, 60, 220, 180))  # the transparent hole to repaint
    out = io.BytesIO()
    canvas.save(out, "PNG")
    mask = out.getvalue()
    result = await gateway.client().images.edit(model="nano-banana", prompt="add a moon",
                                                image=("photo.png", photo, "image/png"),
                                                mask=("mask.png", mask, "image/png"))
    parts = fake.calls[0].json["contents"][0]["parts"]
    assert parts[0] == {"text": "add a moon"} and parts[-1] == {"text": MASK_INSTRUCTION}
    assert [base64.b64decode(p["inlineData"]["data"]) for p in parts[1:3]] == [photo, mask]
    assert base64.b64decode(result.data[0].b64_json or "") == fake.images[0] and result.size == "320x240"
