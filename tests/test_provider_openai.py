"""The OpenAI adapter against the fake OpenAI server: exact outbound requests, answers, and error mapping;
then the official SDK through the gateway to the fake, in both response formats and streamed."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from PIL import Image

from service.errors import GatewayError, UpstreamError, UpstreamRejected, UpstreamTimeout
from service.schemas import ImageSpec
from service.settings import LOCAL_MODELS, GatewayConfig
from tests.conftest import GatewayFactory
from tests.fakes.openai import API_KEY, ERROR_BODIES, FakeOpenAI, FilePart
from workers.providers.base import ImageRequest, InputImage, ProviderResult
from workers.providers.openai import OpenAIProvider
from workers.router import Router

KEY_ENV = "FAKE_OPENAI_KEY"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=")


class Progress:
    def __init__(self) -> None:
        self.stages: list[str] = []
        self.partials: list[tuple[bytes, str]] = []
        self.relayed_at: list[float] = []

    async def update(self, fraction: float, stage: str) -> None:
        self.stages.append(stage)

    async def partial_image(self, image: bytes, fmt: str) -> None:
        self.partials.append((image, fmt))
        self.relayed_at.append(time.monotonic())


def openai_config(fake: FakeOpenAI, *models: str, options: dict[str, Any] | None = None,
                  timeout: float | None = None) -> GatewayConfig:
    """One `openai` provider account on the fake, serving each of `models` under its own name and family."""
    azure = (options or {}).get("api_style") == "azure"
    return GatewayConfig.model_validate({
        "providers": {"oa": {"type": "openai", "base_url": fake.url if azure else fake.base_url,
                             "api_key_env": KEY_ENV, "headers": {"OpenAI-Organization": "org-test"},
                             "options": options or {}}},
        "models": {name: {"family": LOCAL_MODELS[name],
                          "deployments": [{"provider": "oa", "timeout": timeout}]} for name in models},
    })


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


async def run(http: aiohttp.ClientSession, config: GatewayConfig, spec: ImageSpec,
              images: list[InputImage] | None = None, mask: InputImage | None = None,
              progress: Progress | None = None) -> ProviderResult:
    """The adapter alone, on the deployment the router resolved from `config`."""
    router = Router(config, http)
    provider = router.providers["oa"]
    assert isinstance(provider, OpenAIProvider)
    deployment = router.deployments[spec.model][0]
    request = ImageRequest(spec=spec, images=images or [], mask=mask)
    return await provider.generate(request, deployment, progress or Progress())


def json_headers(call_headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in call_headers.items() if k in ("authorization", "api-key", "openai-organization",
                                                           "content-type")}


async def test_gpt_image_generation_request_and_answer(fake: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    spec = ImageSpec(model="gpt-image-1", prompt="a red fox in snow", n=2, size="1536x1024", quality="high",
                     background="transparent", output_format="webp", output_compression=80, moderation="low",
                     user="user-42", response_format="url", style=None, seed=None)
    result = await run(http, openai_config(fake, "gpt-image-1"), spec)

    [call] = fake.calls
    assert (call.method, call.path, call.query) == ("POST", "/v1/images/generations", {})
    assert json_headers(call.headers) == {"authorization": f"Bearer {API_KEY}",
                                          "content-type": "application/json",
                                          "openai-organization": "org-test"}
    # every field GPT Image takes, and nothing it refuses (response_format) or lacks (style, seed)
    assert call.json == {"model": "gpt-image-1", "prompt": "a red fox in snow", "n": 2, "size": "1536x1024",
                         "quality": "high", "background": "transparent", "output_format": "webp",
                         "output_compression": 80, "moderation": "low", "user": "user-42"}
    assert [image.data for image in result.images] == fake.images
    assert [image.format for image in result.images] == ["webp", "webp"]
    assert result.usage == {"input_tokens": 5, "output_tokens": 544, "total_tokens": 549,
                            "input_tokens_details": {"image_tokens": 0, "text_tokens": 5}}
    assert (result.size, result.quality, result.background) == ("1536x1024", "high", "transparent")


async def test_dall_e_3_url_results_are_downloaded_and_n_fans_out(fake: FakeOpenAI,
                                                                  http: aiohttp.ClientSession) -> None:
    spec = ImageSpec(model="dall-e-3", prompt="a lighthouse", n=2, size="1792x1024", quality="hd",
                     style="natural", user="u1", response_format="url")
    result = await run(http, openai_config(fake, "dall-e-3"), spec)

    posts = [c for c in fake.calls if c.method == "POST"]
    gets = [c for c in fake.calls if c.method == "GET"]
    # DALL·E 3 draws one image per call: n=2 is two calls
    assert [c.json for c in posts] == [{"model": "dall-e-3", "prompt": "a lighthouse", "n": 1,
                                        "size": "1792x1024", "quality": "hd", "style": "natural",
                                        "response_format": "url", "user": "u1"}] * 2
    assert sorted(c.path for c in gets) == ["/files/img-0.png", "/files/img-1.png"]
    assert all("authorization" not in c.headers for c in gets)  # the key never goes to the image link
    assert sorted(image.data for image in result.images) == sorted(fake.images)
    assert [image.revised_prompt for image in result.images] == ["A detailed rendering of a lighthouse"] * 2
    assert result.usage is None and result.size == "1792x1024"


async def test_dall_e_2_b64_json_is_decoded(fake: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    spec = ImageSpec(model="dall-e-2", prompt="a cat", n=3, size="256x256", response_format="b64_json")
    result = await run(http, openai_config(fake, "dall-e-2"), spec)

    [call] = fake.calls
    assert call.json == {"model": "dall-e-2", "prompt": "a cat", "n": 3, "size": "256x256",
                         "response_format": "b64_json"}
    assert [image.data for image in result.images] == fake.images
    assert [image.revised_prompt for image in result.images] == [None] * 3


async def test_edit_with_mask_is_multipart(fake: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    spec = ImageSpec(operation="edit", model="gpt-image-1", prompt="add a hat", size="1024x1024",
                     quality="low", input_fidelity="high", user="u7", input_images=["x/input-0.png"],
                     mask="x/mask.png")
    source, mask = InputImage(PNG, "png"), InputImage(PNG + b"mask", "png")
    result = await run(http, openai_config(fake, "gpt-image-1"), spec, [source], mask)

    [call] = fake.calls
    assert (call.path, call.json) == ("/v1/images/edits", None)
    assert call.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert call.headers["authorization"] == f"Bearer {API_KEY}"
    assert call.form == [("model", "gpt-image-1"), ("prompt", "add a hat"), ("n", "1"), ("size", "1024x1024"),
                         ("quality", "low"), ("output_format", "png"), ("input_fidelity", "high"),
                         ("user", "u7"),
                         ("image", FilePart("image-0.png", "image/png", PNG)),
                         ("mask", FilePart("mask.png", "image/png", PNG + b"mask"))]
    assert [image.data for image in result.images] == fake.images
    assert result.usage is not None and result.usage["input_tokens_details"] == {"image_tokens": 65,
                                                                                  "text_tokens": 3}


async def test_edit_with_several_images_uses_image_brackets(fake: FakeOpenAI,
                                                             http: aiohttp.ClientSession) -> None:
    spec = ImageSpec(operation="edit", model="gpt-image-1", prompt="a gift basket of these", size="auto")
    images = [InputImage(PNG, "png"), InputImage(b"\xff\xd8\xff-a-jpeg", "jpeg")]
    await run(http, openai_config(fake, "gpt-image-1"), spec, images)

    [call] = fake.calls
    assert call.fields() == {"model": "gpt-image-1", "prompt": "a gift basket of these", "n": "1",
                             "size": "auto", "output_format": "png"}
    assert call.files() == [("image[]", FilePart("image-0.png", "image/png", PNG)),
                            ("image[]", FilePart("image-1.jpeg", "image/jpeg", b"\xff\xd8\xff-a-jpeg"))]


async def test_variation_of_dall_e_2(fake: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    spec = ImageSpec(operation="variation", model="dall-e-2", prompt="", n=2, size="512x512",
                     response_format="b64_json", user="u9")
    result = await run(http, openai_config(fake, "dall-e-2"), spec, [InputImage(PNG, "png")])

    [call] = fake.calls
    assert call.path == "/v1/images/variations"
    assert call.form == [("model", "dall-e-2"), ("n", "2"), ("size", "512x512"),
                         ("response_format", "b64_json"), ("user", "u9"),
                         ("image", FilePart("image-0.png", "image/png", PNG))]
    assert len(result.images) == 2


async def test_operations_a_model_lacks_are_refused_before_any_call(fake: FakeOpenAI,
                                                                    http: aiohttp.ClientSession) -> None:
    config = openai_config(fake, "gpt-image-1", "dall-e-3")
    with pytest.raises(UpstreamRejected) as variation:
        await run(http, config, ImageSpec(operation="variation", model="gpt-image-1", prompt="", size="auto"),
                  [InputImage(PNG, "png")])
    with pytest.raises(UpstreamRejected) as edit:
        await run(http, config, ImageSpec(operation="edit", model="dall-e-3", prompt="x", size="1024x1024"),
                  [InputImage(PNG, "png")])
    assert variation.value.status == edit.value.status == 400
    assert edit.value.message == "Model 'dall-e-3' (openai model 'dall-e-3') cannot edit images."
    assert fake.calls == []


async def test_azure_deployment_urls_and_api_key_header(fake: FakeOpenAI,
                                                         http: aiohttp.ClientSession) -> None:
    options = {"api_style": "azure", "api_version": "2025-04-01-preview", "deployment": "img-prod"}
    config = openai_config(fake, "gpt-image-1", options=options)
    result = await run(http, config, ImageSpec(model="gpt-image-1", prompt="a boat", size="1024x1024"))
    edit_spec = ImageSpec(operation="edit", model="gpt-image-1", prompt="a sail", size="1024x1024")
    await run(http, config, edit_spec, [InputImage(PNG, "png")])

    generation, edit = fake.calls
    assert (generation.path, generation.query) == ("/openai/deployments/img-prod/images/generations",
                                                   {"api-version": "2025-04-01-preview"})
    assert json_headers(generation.headers) == {"api-key": API_KEY, "openai-organization": "org-test",
                                                "content-type": "application/json"}
    # the deployment names the model: none in the body
    assert generation.json == {"prompt": "a boat", "n": 1, "size": "1024x1024", "output_format": "png"}
    assert (edit.path, edit.query) == ("/openai/deployments/img-prod/images/edits",
                                       {"api-version": "2025-04-01-preview"})
    assert edit.headers["api-key"] == API_KEY and "authorization" not in edit.headers
    assert edit.fields() == {"prompt": "a sail", "n": "1", "size": "1024x1024", "output_format": "png"}
    assert result.images[0].data == fake.images[0]


async def test_azure_without_base_url_is_a_config_error(http: aiohttp.ClientSession) -> None:
    config = GatewayConfig.model_validate({
        "providers": {"az": {"type": "openai", "options": {"api_style": "azure"}}},
        "models": {"m": {"deployments": [{"provider": "az"}]}},
    })
    with pytest.raises(ValueError, match=r"models\.m\.deployments\.0: provider 'az': Azure needs base_url"):
        Router(config, http)


LABEL = "Upstream 'oa' (openai, model 'gpt-image-1')"
SPEC = ImageSpec(model="gpt-image-1", prompt="x", size="auto")
SAFETY = ERROR_BODIES[400]["error"]["message"]


@pytest.mark.parametrize(("status", "body", "headers", "kind", "expected"), [
    (400, None, {}, UpstreamRejected,
     {"status": 400, "code": "content_policy_violation", "param": "prompt", "retry_after": None,
      "message": f"{LABEL} rejected the request: HTTP 400: {SAFETY} [content_policy_violation]"}),
    (400, {"error": {"message": "Invalid size '7x7'.", "type": "invalid_request_error", "param": "size",
                     "code": "invalid_value"}}, {}, UpstreamRejected,
     {"status": 400, "code": "upstream_rejected", "param": "size", "retry_after": None,
      "message": f"{LABEL} rejected the request: HTTP 400: Invalid size '7x7'. [invalid_value]"}),
    (401, None, {}, UpstreamError,
     {"status": 502, "code": "upstream_auth_failed", "param": None, "retry_after": None,
      "message": f"{LABEL} refused the gateway's credentials: HTTP 401; check the key the provider's "
                 "api_key_env names"}),
    (403, None, {}, UpstreamError,
     {"status": 502, "code": "upstream_account_error", "param": None, "retry_after": None,
      "message": f"{LABEL} failed: HTTP 403: Project does not have access to model gpt-image-1. "
                 "[model_not_found]"}),
    (429, None, {"Retry-After": "7"}, UpstreamError,
     {"status": 502, "code": "upstream_rate_limited", "param": None, "retry_after": 7.0}),
    (429, None, {"retry-after-ms": "1500", "Retry-After": "2"}, UpstreamError,
     {"status": 502, "code": "upstream_rate_limited", "param": None, "retry_after": 1.5}),
    (429, {"error": {"message": "You exceeded your current quota.", "type": "insufficient_quota",
                     "param": None, "code": "insufficient_quota"}}, {}, UpstreamError,
     {"status": 502, "code": "upstream_account_error", "param": None, "retry_after": None}),
    (500, None, {}, UpstreamError,
     {"status": 502, "code": "upstream_error", "param": None, "retry_after": None,
      "message": f"{LABEL} failed: HTTP 500: The server had an error while processing your request. "
                 "Sorry about that!"}),
    (503, None, {}, UpstreamError,
     {"status": 502, "code": "upstream_error", "param": None, "retry_after": None}),
])
async def test_error_mapping(fake: FakeOpenAI, http: aiohttp.ClientSession, status: int, body: Any,
                             headers: dict[str, str], kind: type[GatewayError], expected: dict[str, Any]
                             ) -> None:
    fake.fail(status, body, headers=headers)
    with pytest.raises(GatewayError) as caught:
        await run(http, openai_config(fake, "gpt-image-1"), SPEC)
    error = caught.value
    assert type(error) is kind
    got = {"status": error.status, "code": error.code, "param": error.param,
           "retry_after": getattr(error, "retry_after", None), "message": error.message}
    assert {k: got[k] for k in expected} == expected
    assert len(fake.calls) == 1
    assert "sk-" not in str(error.body())  # neither the key nor the part OpenAI's 401 message quotes


async def test_timeout_and_connection_reset(fake: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    config = openai_config(fake, "gpt-image-1", timeout=0.3)
    fake.delay(5)
    with pytest.raises(UpstreamTimeout) as timeout:
        await run(http, config, SPEC)
    assert timeout.value.status == 504
    assert timeout.value.message == f"{LABEL} timed out: no answer within 0.3 s"
    fake.reset()
    with pytest.raises(UpstreamError) as reset:
        await run(http, config, SPEC)
    assert (reset.value.status, reset.value.code) == (502, "upstream_unreachable")
    assert reset.value.message.startswith(f"{LABEL} failed: could not be reached (ClientOSError")


async def test_downloads_are_capped(fake: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    config = openai_config(fake, "dall-e-3", options={"max_image_bytes": 50})
    with pytest.raises(UpstreamError) as caught:
        await run(http, config, ImageSpec(model="dall-e-3", prompt="x", size="1024x1024",
                                          response_format="url"))
    assert caught.value.code == "upstream_answer_too_large"


# ---- streaming ---------------------------------------------------------------------------------------------

async def test_streamed_generation_relays_each_partial_image_as_it_arrives(fake: FakeOpenAI,
                                                                           http: aiohttp.ClientSession) -> None:
    fake.event_delay = 0.05
    spec = ImageSpec(model="gpt-image-1", prompt="a red fox", size="1024x1024", quality="low",
                     output_format="webp", partial_images=2, stream=True)
    progress = Progress()
    result = await run(http, openai_config(fake, "gpt-image-1"), spec, progress=progress)

    [call] = fake.calls
    assert call.json == {"model": "gpt-image-1", "prompt": "a red fox", "n": 1, "size": "1024x1024",
                         "quality": "low", "output_format": "webp", "stream": True, "partial_images": 2}
    assert progress.partials == [(partial, "webp") for partial in fake.partials] and len(fake.partials) == 2
    sent = dict(fake.sent)
    assert [event for event, _ in fake.sent] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"]
    # relayed while the upstream was still working, not after the stream ended
    assert all(at < sent["image_generation.completed"] for at in progress.relayed_at)
    assert [(image.data, image.format) for image in result.images] == [(fake.images[0], "webp")]
    assert result.usage == {"input_tokens": 3, "output_tokens": 272, "total_tokens": 275,
                            "input_tokens_details": {"image_tokens": 0, "text_tokens": 3}}
    assert (result.size, result.quality, result.background) == ("1024x1024", "low", "opaque")


async def test_streamed_edit_is_multipart_with_stream_fields(fake: FakeOpenAI,
                                                             http: aiohttp.ClientSession) -> None:
    spec = ImageSpec(operation="edit", model="gpt-image-1", prompt="add a hat", size="1024x1024", n=2,
                     partial_images=1, stream=True)
    progress = Progress()
    result = await run(http, openai_config(fake, "gpt-image-1"), spec, [InputImage(PNG, "png")],
                       progress=progress)

    [call] = fake.calls
    assert call.form == [("model", "gpt-image-1"), ("prompt", "add a hat"), ("n", "2"), ("size", "1024x1024"),
                         ("output_format", "png"), ("stream", "true"), ("partial_images", "1"),
                         ("image", FilePart("image-0.png", "image/png", PNG))]
    assert [event for event, _ in fake.sent] == ["image_edit.partial_image", "image_edit.completed"] * 2
    assert progress.partials == [(partial, "png") for partial in fake.partials]
    assert [image.data for image in result.images] == fake.images
    # the prompt and input image count once, each image's output tokens add up
    assert result.usage == {"input_tokens": 68, "output_tokens": 544, "total_tokens": 612,
                            "input_tokens_details": {"image_tokens": 65, "text_tokens": 3}}


async def test_an_error_event_maps_like_an_error_answer(fake: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    fake.fail_stream(ERROR_BODIES[400]["error"])
    fake.fail_stream({"message": "The server had an error.", "type": "server_error", "param": None,
                      "code": "server_error"})
    spec = ImageSpec(model="gpt-image-1", prompt="x", size="auto", partial_images=1, stream=True)
    progress = Progress()
    with pytest.raises(UpstreamRejected) as rejected:
        await run(http, openai_config(fake, "gpt-image-1"), spec, progress=progress)
    assert (rejected.value.status, rejected.value.code, rejected.value.param) == (
        400, "content_policy_violation", "prompt")
    assert rejected.value.message == (f"{LABEL} rejected the request: HTTP 200: {SAFETY} "
                                      "[content_policy_violation]")
    assert len(progress.partials) == 1  # relayed before the error came
    with pytest.raises(UpstreamError) as failed:
        await run(http, openai_config(fake, "gpt-image-1"), spec)
    assert type(failed.value) is UpstreamError and failed.value.status == 502
    assert [event for event, _ in fake.sent] == ["image_generation.partial_image", "error"] * 2


async def test_a_refused_stream_answers_in_json(fake: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    fake.fail(429, headers={"Retry-After": "3"})
    spec = ImageSpec(model="gpt-image-1", prompt="x", size="auto", partial_images=1, stream=True)
    with pytest.raises(UpstreamError) as caught:
        await run(http, openai_config(fake, "gpt-image-1"), spec)
    assert (caught.value.code, caught.value.retry_after) == ("upstream_rate_limited", 3.0)


async def test_models_without_streaming_are_called_without_it(fake: FakeOpenAI,
                                                              http: aiohttp.ClientSession) -> None:
    spec = ImageSpec(model="dall-e-3", prompt="a lighthouse", size="1024x1024", partial_images=2,
                     response_format="b64_json")
    progress = Progress()
    result = await run(http, openai_config(fake, "dall-e-3"), spec, progress=progress)
    [call] = fake.calls
    assert call.json is not None and "stream" not in call.json and "partial_images" not in call.json
    assert progress.partials == [] and [image.data for image in result.images] == fake.images


# ---- the official SDK, through the gateway, to the fake --------------------------------------------------

async def test_sdk_through_gateway_b64_and_url(fake: FakeOpenAI, gateway_factory: GatewayFactory,
                                               http: aiohttp.ClientSession) -> None:
    config = openai_config(fake, "gpt-image-1", "dall-e-3")
    gateway = await gateway_factory(config=config)
    client = gateway.client()

    gpt = await client.images.generate(model="gpt-image-1", prompt="a red fox", size="1024x1536",
                                       quality="low", output_format="png", response_format="b64_json")
    assert gpt.data is not None and base64.b64decode(gpt.data[0].b64_json or "") == fake.images[0]
    assert gpt.usage is not None and (gpt.usage.input_tokens, gpt.usage.output_tokens) == (3, 272)
    assert (gpt.size, gpt.quality, gpt.output_format) == ("1024x1536", "low", "png")
    assert fake.calls[0].json == {"model": "gpt-image-1", "prompt": "a red fox", "n": 1, "size": "1024x1536",
                                  "quality": "low", "output_format": "png"}

    # DALL·E answers with a link; the gateway fetches it and serves the image from its own storage
    dalle = await client.images.generate(model="dall-e-3", prompt="a lighthouse", response_format="url")
    assert dalle.data is not None
    link = dalle.data[0].url or ""
    assert link.startswith(gateway.url) and "/v1/files/" in link
    async with http.get(link) as resp:
        assert resp.status == 200
        assert await resp.read() == fake.images[1]
    assert dalle.data[0].revised_prompt == "A detailed rendering of a lighthouse"
    assert fake.calls[1].json == {"model": "dall-e-3", "prompt": "a lighthouse", "n": 1, "size": "1024x1024",
                                  "response_format": "url"}
    assert fake.calls[2].method == "GET"

    dalle_b64 = await client.images.generate(model="dall-e-3", prompt="a harbour", response_format="b64_json")
    assert dalle_b64.data is not None
    assert base64.b64decode(dalle_b64.data[0].b64_json or "") == fake.images[2]
    assert fake.calls[3].json is not None and fake.calls[3].json["response_format"] == "b64_json"


def picture(color: tuple[int, int, int, int], size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", size, color).save(out, "PNG")
    return out.getvalue()


async def test_sdk_edit_and_variation_through_gateway(fake: FakeOpenAI,
                                                     gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(config=openai_config(fake, "gpt-image-1", "dall-e-2"))
    client = gateway.client()
    first, second, mask = picture((200, 0, 0, 255)), picture((0, 0, 200, 255)), picture((0, 0, 0, 0))

    edited = await client.images.edit(model="gpt-image-1", prompt="put them in a basket",
                                      image=[("a.png", first, "image/png"), ("b.png", second, "image/png")],
                                      mask=("mask.png", mask, "image/png"), input_fidelity="high")
    assert edited.data is not None and base64.b64decode(edited.data[0].b64_json or "") == fake.images[0]
    [edit] = fake.image_calls
    assert edit.path == "/v1/images/edits"
    assert edit.fields() == {"model": "gpt-image-1", "prompt": "put them in a basket", "n": "1",
                             "size": "auto", "output_format": "png", "input_fidelity": "high"}
    assert edit.files() == [("image[]", FilePart("image-0.png", "image/png", first)),
                            ("image[]", FilePart("image-1.png", "image/png", second)),
                            ("mask", FilePart("mask.png", "image/png", mask))]
    assert edited.usage is not None and edited.usage.input_tokens_details.image_tokens == 130

    with pytest.warns(DeprecationWarning):  # the SDK marks variations deprecated; the API still has them
        varied = await client.images.create_variation(model="dall-e-2", image=("a.png", first, "image/png"),
                                                      n=2, size="256x256", response_format="b64_json")
    assert varied.data is not None
    assert [base64.b64decode(d.b64_json or "") for d in varied.data] == fake.images[1:]
    variation = fake.image_calls[1]
    assert variation.form == [("model", "dall-e-2"), ("n", "2"), ("size", "256x256"),
                              ("response_format", "b64_json"),
                              ("image", FilePart("image-0.png", "image/png", first))]


async def test_sdk_streams_through_gateway(fake: FakeOpenAI, gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(config=openai_config(fake, "gpt-image-1"))
    stream = await gateway.client().images.generate(model="gpt-image-1", prompt="a harbour", size="1024x1024",
                                                    stream=True, partial_images=2)
    events = [event async for event in stream]

    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"]
    [call] = fake.image_calls
    assert call.json == {"model": "gpt-image-1", "prompt": "a harbour", "n": 1, "size": "1024x1024",
                         "output_format": "png", "stream": True, "partial_images": 2}
    partials, final = events[:2], events[2]
    assert [base64.b64decode(event.b64_json) for event in partials] == fake.partials
    assert [event.partial_image_index for event in partials] == [0, 1]
    assert base64.b64decode(final.b64_json) == fake.images[0]
    assert final.usage.output_tokens == 272 and final.size == "1024x1024"
