"""OpenAI's Images API, and the OpenAI-compatible bases that speak it (Azure OpenAI deployment URLs included).

Follows the OpenAI API reference "Images" (platform.openai.com/docs/api-reference/images, the 2025 revision
with GPT Image models): create image, create image edit and create image variation, with the request fields
and multipart layout the official openai-python SDK (3.x) sends; and Azure OpenAI's data-plane REST
reference (api-version 2025-04-01-preview) for deployment URLs:

    POST {base_url}/images/generations        Authorization: Bearer <key>    JSON
    POST {base_url}/images/edits              multipart: image | image[] ..., mask, prompt, model, ...
    POST {base_url}/images/variations         multipart: image, model, n, size, response_format, user
    Azure: POST {base_url}/openai/deployments/{deployment}/images/{generations|edits}?api-version=...
           with an `api-key` header, and no `model` in the body (the deployment decides)
    200 -> {"created", "data": [{"b64_json" | "url", "revised_prompt"?}], "usage"?, "size"?, "quality"?,
            "background"?, "output_format"?}
    4xx/5xx -> {"error": {"message", "type", "param", "code"}}

Which request fields an upstream model takes is data (MODEL_PARAMS). GPT Image models always answer in
base64; DALL·E models are asked for the client's `response_format`, and `url` results are downloaded here
(streamed, capped), so the gateway re-serves every image from its own storage in whichever form the client
wants. n above a model's per-call maximum (DALL·E 3: 1) fans out into parallel calls.

Streaming (the 2025 revision, GPT Image models only): with `partial_images` > 0 the call adds
`"stream": true, "partial_images": N` and the answer is server-sent events, relayed as they arrive:

    event: image_generation.partial_image   (image_edit.partial_image)
    data: {"type", "b64_json", "partial_image_index", "output_format", "size", "quality", "background", ...}
    event: image_generation.completed       (image_edit.completed), one per image
    data: {"type", "b64_json", "usage", "size", "quality", "background", "output_format", "created_at"}
    event: error
    data: {"type": "error", "error": {"message", "type", "param", "code"}}
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from aiohttp.http_exceptions import LineTooLong
from pydantic import Field

from service.schemas import ImageSpec
from workers.providers.base import (
    Deployment,
    GeneratedImage,
    ImageRequest,
    InputImage,
    ProgressReporter,
    Provider,
    ProviderOptions,
    ProviderResult,
    decode_b64_image,
    reject_operation,
)
from workers.providers.images_api import (
    CONTENT_POLICY,
    MAX_IMAGE_BYTES,
    ErrorRule,
    download_image,
    raise_for_status,
    upstream_error,
)
from workers.providers.json_stream import RawString
from workers.providers.translation import add_usage, calls_for, fan_out
from workers.providers.upstream_client import MAX_ANSWER_BYTES, JsonAnswer, UpstreamClient

DEFAULT_BASE_URL = "https://api.openai.com/v1"
AZURE_API_VERSION = "2025-04-01-preview"
ENDPOINTS = {"generate": "generations", "edit": "edits", "variation": "variations"}
STREAM_EVENTS = {"generate": "image_generation", "edit": "image_edit"}  # the prefix of the SSE event types
IMAGE_KEYS = frozenset({"b64_json"})  # answer strings read as raw bytes, each decoded straight to its image

# OpenAI's error codes, first match wins; others fall back to the HTTP status.
OPENAI_ERRORS: tuple[ErrorRule, ...] = (
    ("content_policy_violation", "rejected", CONTENT_POLICY),
    ("moderation_blocked", "rejected", CONTENT_POLICY),
    ("insufficient_quota", "failed", "upstream_account_error"),  # a 429 that no waiting cures
    ("billing_*", "failed", "upstream_account_error"),
    ("model_not_found", "failed", "upstream_account_error"),  # a model this key cannot use
)

ModelKind = Literal["dall-e-2", "dall-e-3", "gpt-image"]


@dataclass(frozen=True)
class ModelParams:
    """The ImageSpec fields an upstream model takes on each endpoint (empty: it has no such endpoint), how
    many images one call may ask for, and whether its generations and edits stream partial images."""

    generate: tuple[str, ...]
    edit: tuple[str, ...] = ()
    variation: tuple[str, ...] = ()
    max_n: int = 10
    streams: bool = False

    def fields(self, operation: str) -> tuple[str, ...]:
        fields: tuple[str, ...] = getattr(self, operation)
        return fields


_GPT_IMAGE = ("prompt", "n", "size", "quality", "background", "output_format", "output_compression")
_DALL_E_2 = ("prompt", "n", "size", "quality", "response_format", "user")
MODEL_PARAMS: dict[ModelKind, ModelParams] = {
    "dall-e-2": ModelParams(generate=_DALL_E_2, edit=_DALL_E_2,
                            variation=("n", "size", "response_format", "user")),
    "dall-e-3": ModelParams(generate=("prompt", "n", "size", "quality", "style", "response_format", "user"),
                            max_n=1),
    "gpt-image": ModelParams(generate=(*_GPT_IMAGE, "moderation", "user"),
                             edit=(*_GPT_IMAGE, "input_fidelity", "user"), streams=True),
}


class OpenAIOptions(ProviderOptions):
    api_style: Literal["openai", "azure"] = Field("openai", description="azure: deployment URLs, `api-key`")
    api_version: str = Field(AZURE_API_VERSION, description="Azure's `api-version` query parameter")
    deployment: str | None = Field(None, description="Azure deployment name; default: the upstream model")
    model_params: ModelKind | None = Field(
        None, description="which request fields the upstream model takes; default: judged from its name")
    max_image_bytes: int = Field(MAX_IMAGE_BYTES, ge=1, description="largest image downloaded from a `url`")


def model_kind(model: str) -> ModelKind:
    """GPT Image unless the name says DALL·E: OpenAI-compatible bases mostly copy the newer API."""
    for kind in ("dall-e-2", "dall-e-3"):
        if model.startswith(kind):
            return kind
    return "gpt-image"


def request_fields(spec: ImageSpec, fields: tuple[str, ...], n: int) -> dict[str, Any]:
    """The spec's values for `fields`, unset ones left out, asking for `n` images."""
    values = {name: getattr(spec, name) for name in fields}
    values["n"] = n
    return {name: value for name, value in values.items() if value is not None}


def multipart(fields: dict[str, Any], images: list[InputImage], mask: InputImage | None) -> aiohttp.FormData:
    """As the SDK sends it: text fields, then `image` (or one `image[]` per image when there are several),
    then `mask`."""
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, json.dumps(value) if isinstance(value, bool) else str(value))  # `stream`: true
    image_field = "image" if len(images) == 1 else "image[]"
    for index, image in enumerate(images):
        form.add_field(image_field, image.data, filename=f"image-{index}.{image.format}",
                       content_type=image.content_type)
    if mask is not None:
        form.add_field("mask", mask.data, filename=f"mask.{mask.format}", content_type=mask.content_type)
    return form


class OpenAIProvider(Provider):
    """api.openai.com, Azure OpenAI, or any base URL speaking OpenAI's Images API."""

    type = "openai"
    Options = OpenAIOptions

    def check_deployment(self, deployment: Deployment) -> None:
        options = self._options(deployment)
        if options.api_style == "azure" and not deployment.base_url:
            raise ValueError(f"provider {deployment.provider!r}: Azure needs base_url "
                             "(https://<resource>.openai.azure.com)")

    def _options(self, deployment: Deployment) -> OpenAIOptions:
        options = self.options(deployment)
        assert isinstance(options, OpenAIOptions)
        return options

    async def generate(self, request: ImageRequest, deployment: Deployment, progress: ProgressReporter
                       ) -> ProviderResult:
        spec = request.spec
        options = self._options(deployment)
        params = MODEL_PARAMS[options.model_params or model_kind(deployment.upstream_model)]
        fields = params.fields(spec.operation)
        if not fields:
            raise reject_operation(spec, f"{self.type} model '{deployment.upstream_model}'")
        client = UpstreamClient(self.http, self.type, deployment)
        url, headers = self._endpoint(deployment, options, ENDPOINTS[spec.operation])
        streaming = spec.partial_images > 0 and params.streams and spec.operation in STREAM_EVENTS

        async def call(_index: int, n: int) -> tuple[list[GeneratedImage], dict[str, Any]]:
            body = request_fields(spec, fields, n)
            if options.api_style == "openai":
                body = {"model": deployment.upstream_model, **body}
            if streaming:
                body.update(stream=True, partial_images=spec.partial_images)
                payload: dict[str, Any] = (
                    {"json": body} if spec.operation == "generate"
                    else {"data": multipart(body, request.images, request.mask)})
                return await self._stream(client, url, headers, payload, options, progress)
            if spec.operation == "generate":
                answer = await client.post_json(url, body, headers, raw_keys=IMAGE_KEYS)
            else:
                answer = await client.post_form(url, multipart(body, request.images, request.mask), headers,
                                                raw_keys=IMAGE_KEYS)
            return await self._images(client, answer, options), answer.body

        await progress.update(0.05, "waiting for the upstream")
        answers = await fan_out(calls_for(spec.n, params.max_n), call)
        await progress.update(0.95, "received")
        first = answers[0][1]
        usages = [body["usage"] for _, body in answers if isinstance(body.get("usage"), dict)]
        return ProviderResult(
            images=[image for images, _ in answers for image in images],
            usage=add_usage(usages),
            size=first.get("size") or (spec.size if spec.dimensions() else None),
            quality=first.get("quality") or spec.quality,
            background=first.get("background") or spec.background,
        )

    def _endpoint(self, deployment: Deployment, options: OpenAIOptions, endpoint: str
                  ) -> tuple[str, dict[str, str]]:
        """The URL and headers of one call; the key goes only into the header its API style expects."""
        headers = dict(deployment.headers)
        if options.api_style == "azure":
            name = options.deployment or deployment.upstream_model
            url = (f"{deployment.base_url}/openai/deployments/{name}/images/{endpoint}"
                   f"?api-version={options.api_version}")
            if deployment.api_key:
                headers["api-key"] = deployment.api_key
            return url, headers
        if deployment.api_key:  # local OpenAI-compatible servers may take none
            headers["Authorization"] = f"Bearer {deployment.api_key}"
        return f"{deployment.base_url or DEFAULT_BASE_URL}/images/{endpoint}", headers

    async def _images(self, client: UpstreamClient, answer: JsonAnswer, options: OpenAIOptions
                      ) -> list[GeneratedImage]:
        if answer.status == 401:
            # OpenAI's message quotes part of the key: say only what failed
            raise client.failure("auth", "HTTP 401; check the key the provider's api_key_env names")
        raise_for_status(client, OPENAI_ERRORS, answer)
        data = answer.body.get("data") if isinstance(answer.body, dict) else None
        if not isinstance(data, list) or not data or not all(isinstance(item, dict) for item in data):
            raise client.failure("failed", "the answer holds no images", code="bad_upstream_answer")
        images = []
        for item in data:
            revised = item.get("revised_prompt")
            b64 = item.get("b64_json")
            if isinstance(b64, RawString):
                b64 = b64.take()
            if isinstance(b64, str | bytes):
                # on the loop (~0.5 ms for a 4 MB image): from a thread, a 10-image answer peaked ~45 MiB higher
                images.append(decode_b64_image(b64, revised))
            elif isinstance(item.get("url"), str):
                image = await download_image(client, item["url"], options.max_image_bytes)
                image.revised_prompt = revised
                images.append(image)
            else:
                raise client.failure("failed", "an image has neither b64_json nor url",
                                     code="bad_upstream_answer")
        return images

    async def _stream(self, client: UpstreamClient, url: str, headers: dict[str, str], payload: dict[str, Any],
                      options: OpenAIOptions, progress: ProgressReporter
                      ) -> tuple[list[GeneratedImage], dict[str, Any]]:
        """One streamed call: its partial images relayed as they arrive, its completed images returned with
        an answer body shaped like the non-streamed one (usage, size, quality, background)."""
        timeout = aiohttp.ClientTimeout(total=client.deployment.timeout)
        try:
            async with client.http.post(url, headers=headers, timeout=timeout, **payload) as resp:
                if resp.content_type != "text/event-stream":  # an error, answered in JSON as without `stream`
                    async with aclosing(self._lines(client, resp)) as lines:
                        raw = b"".join([line async for line in lines])
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = None
                    answer = JsonAnswer(resp.status, resp.headers, body, raw.decode("utf-8", "replace"))
                    return await self._images(client, answer, options), answer.body
                return await self._events(client, resp, progress)
        except TimeoutError:
            raise client.failure("timeout", f"no answer within {client.deployment.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise client.failure("failed", f"could not be reached ({type(exc).__name__}: {exc})",
                                 code="upstream_unreachable") from None

    async def _events(self, client: UpstreamClient, resp: aiohttp.ClientResponse, progress: ProgressReporter
                      ) -> tuple[list[GeneratedImage], dict[str, Any]]:
        images: list[GeneratedImage] = []
        completed: list[dict[str, Any]] = []
        event, data = "", []
        async with aclosing(self._lines(client, resp)) as lines:
            async for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith(":"):  # an SSE comment (keep-alive)
                    continue
                name, _, value = line.partition(":")
                if name:
                    value = value.removeprefix(" ")
                    if name == "event":
                        event = value
                    elif name == "data":
                        data.append(value)
                    continue
                if data:  # a blank line ends an event
                    image = await self._event(client, resp.status, event, "\n".join(data), progress)
                    if image is not None:
                        images.append(image[0])
                        completed.append(image[1])
                event, data = "", []
        if not images:
            raise client.failure("failed", "the event stream ended before an image was completed",
                                 code="bad_upstream_answer")
        usages = [body["usage"] for body in completed if isinstance(body.get("usage"), dict)]
        first = completed[0]
        return images, {"usage": add_usage(usages), "size": first.get("size"), "quality": first.get("quality"),
                        "background": first.get("background")}

    async def _event(self, client: UpstreamClient, status: int, event: str, data: str,
                     progress: ProgressReporter) -> tuple[GeneratedImage, dict[str, Any]] | None:
        """Relay a partial image; a completed image and its event, returned; an error event, raised."""
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise client.failure("failed", f"an event is not a JSON object: {data[:200]!r}",
                                 code="bad_upstream_answer")
        kind = str(body.get("type") or event)
        if kind == "error" or event == "error":
            error = body.get("error")
            raise upstream_error(client, OPENAI_ERRORS, status, error if isinstance(error, dict) else body)
        if not kind.endswith((".partial_image", ".completed")):
            return None  # an event type this adapter does not know yet
        if not isinstance(body.get("b64_json"), str):
            raise client.failure("failed", f"a {kind} event has no b64_json", code="bad_upstream_answer")
        image = decode_b64_image(body["b64_json"])
        if kind.endswith(".partial_image"):
            await progress.partial_image(image.data, image.format)
            return None
        return image, body

    @staticmethod
    async def _lines(client: UpstreamClient, resp: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
        """The answer's lines as they arrive, refused once they add up to more than the answer cap."""
        size = 0
        while True:
            try:
                line = await resp.content.readline(max_line_length=MAX_ANSWER_BYTES)
            except LineTooLong:
                line, size = b"", MAX_ANSWER_BYTES + 1
            size += len(line)
            if size > MAX_ANSWER_BYTES:
                raise client.failure("failed", f"the answer is larger than {MAX_ANSWER_BYTES} bytes",
                                     status=resp.status, code="upstream_answer_too_large")
            if not line:
                return
            yield line
