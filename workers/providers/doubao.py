"""ByteDance Doubao Seedream through Volcengine Ark (BytePlus ModelArk speaks the same protocol).

Follows Volcengine Ark's image generation API reference ("图片生成 API", volcengine.com/docs/82379/1541523,
the revision for Seedream 4.0 `doubao-seedream-4-0-250828` and 4.5) and the ModelArk error-code list
(docs.byteplus.com/en/docs/ModelArk/1299023):

    POST {base_url}/api/v3/images/generations            Authorization: Bearer <key>
    {"model", "prompt", "size": "1K" | "2K" | "4K" | "WIDTHxHEIGHT", "seed", "watermark",
     "response_format": "url" | "b64_json", "image": data URL | [data URLs] (edits, multi-image fusion),
     "sequential_image_generation": "auto" | "disabled",
     "sequential_image_generation_options": {"max_images"}, "stream": false}
    200 -> {"model", "created", "data": [{"url" | "b64_json", "size"} | {"error": {"code", "message"}}],
            "usage": {"generated_images", "output_tokens", "total_tokens"}}
    4xx/5xx -> {"error": {"code", "message", "param", "type"}}

`n` > 1 is one call in sequential mode ("组图") with `max_images` = n (inputs plus outputs at most 15). In
that mode the model decides from the prompt how many of those images it draws, so a shortfall is made up by
single-image calls in parallel. Models without sequential generation (Seedream 3.0, SeedEdit 3.0) take
`sequential: false` in the deployment options: every image is then its own call, all in parallel, and a given
seed is varied per call so the images differ. Edits send the input images as data URLs; Ark has no mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pybase64
from pydantic import Field

from service.errors import UpstreamRejected
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
)
from workers.providers.images_api import (
    CONTENT_POLICY,
    MAX_IMAGE_BYTES,
    ErrorRule,
    bearer_headers,
    download_image,
    raise_for_status,
    upstream_error,
)
from workers.providers.translation import add_usage, fan_out
from workers.providers.upstream_client import UpstreamClient

DEFAULT_BASE_URL = "https://ark.cn-beijing.volces.com"
PATH = "/api/v3/images/generations"
MAX_IMAGES_PER_REQUEST = 15  # input images plus generated ones, per Ark's sequential mode
SEED_RANGE = 2**31  # Ark takes seeds in [-1, 2147483647]

# Ark's error codes, first match wins; codes not listed fall back to their HTTP status.
ARK_ERRORS: tuple[ErrorRule, ...] = (
    ("*SensitiveContentDetected*", "rejected", CONTENT_POLICY),  # Input/Output Text/Image, SevereViolation...
    ("*RiskDetection", "rejected", CONTENT_POLICY),
    ("ContentSecurityDetectionError", "failed", None),  # Ark's safety service itself failed
    ("AuthenticationError", "auth", None),
    ("AccessDenied", "auth", None),
    ("InvalidEndpoint*", "failed", "upstream_account_error"),  # closed or unknown endpoint: the deployment
    ("ModelNotOpen", "failed", "upstream_account_error"),
    ("AccountOverdueError", "failed", "upstream_account_error"),
    ("QuotaExceeded", "rate_limited", None),
    ("RateLimitExceeded*", "rate_limited", None),
    ("ServerOverloaded", "rate_limited", None),
    ("InternalServiceError", "failed", None),
    ("MissingParameter", "rejected", None),
    ("InvalidParameter*", "rejected", None),
)


class DoubaoOptions(ProviderOptions):
    watermark: bool = Field(False, description="add Ark's 'AI generated' mark when the request does not say")
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="how Ark hands the images over; links are downloaded right away")
    sequential: bool = Field(True, description="the model has sequential_image_generation (Seedream 4.x)")
    max_image_bytes: int = Field(MAX_IMAGE_BYTES, ge=1, description="largest image accepted from Ark, bytes")


def data_url(image: InputImage) -> str:
    return f"data:{image.content_type};base64,{pybase64.b64encode_as_string(image.data)}"


def ark_body(spec: ImageSpec, images: list[InputImage], options: DoubaoOptions, model: str, count: int,
             seed_offset: int = 0) -> dict[str, Any]:
    """The JSON body asking for `count` images: the whole mapping from the gateway's request to Ark's."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": spec.prompt,
        "size": spec.size,
        "response_format": options.response_format,
        "watermark": options.watermark if spec.watermark is None else spec.watermark,
        "stream": False,
    }
    if spec.seed is not None:
        body["seed"] = (spec.seed + seed_offset) % SEED_RANGE
    if images:
        urls = [data_url(image) for image in images]
        body["image"] = urls[0] if len(urls) == 1 else urls
    if count > 1:
        body["sequential_image_generation"] = "auto"
        body["sequential_image_generation_options"] = {"max_images": count}
    elif options.sequential:
        body["sequential_image_generation"] = "disabled"
    return body


@dataclass
class ArkAnswer:
    """What one call brought back."""

    images: list[GeneratedImage]
    sizes: list[str]
    usage: dict[str, Any] | None


class DoubaoProvider(Provider):
    """Seedream text-to-image and image editing on Volcengine Ark."""

    type = "doubao"
    Options = DoubaoOptions

    async def generate(self, request: ImageRequest, deployment: Deployment, progress: ProgressReporter
                       ) -> ProviderResult:
        spec = request.spec
        options = self.options(deployment)
        assert isinstance(options, DoubaoOptions)
        if request.mask is not None:
            raise UpstreamRejected(f"Model '{spec.model}' (doubao) edits whole images and takes no mask.",
                                   param="mask", code="unsupported_parameter")
        client = UpstreamClient(self.http, self.type, deployment)

        async def call(index: int, count: int) -> ArkAnswer:
            body = ark_body(spec, request.images, options, deployment.upstream_model, count, index)
            return await self._call(client, deployment, options, body)

        await progress.update(0.05, "waiting for Ark")
        answers: list[ArkAnswer] = []
        batch = min(spec.n, MAX_IMAGES_PER_REQUEST - len(request.images)) if options.sequential else 1
        if batch > 1:
            answers.append(await call(0, batch))
        made = sum(len(answer.images) for answer in answers)
        if made < spec.n:
            # offsets continue past the images already made, so a fixed seed still gives distinct pictures
            answers += await fan_out([1] * (spec.n - made), lambda i, count: call(made + i, count))
        await progress.update(0.95, "received")
        images = [image for answer in answers for image in answer.images][: spec.n]
        sizes = [size for answer in answers for size in answer.sizes]
        return ProviderResult(
            images=images,
            usage=ark_usage([answer.usage for answer in answers if answer.usage]),
            size=sizes[0] if sizes else (spec.size if spec.dimensions() else None),
            background="opaque",
        )

    async def _call(self, client: UpstreamClient, deployment: Deployment, options: DoubaoOptions,
                    body: dict[str, Any]) -> ArkAnswer:
        answer = await client.post_json(f"{deployment.base_url or DEFAULT_BASE_URL}{PATH}", body,
                                        bearer_headers(deployment))
        raise_for_status(client, ARK_ERRORS, answer)
        data = answer.body.get("data") if isinstance(answer.body, dict) else None
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise client.failure("failed", "the answer has no 'data' list", code="bad_upstream_answer")
        # in sequential mode single images may fail (a safety refusal of one picture) while others succeed
        refused = [item["error"] for item in data if isinstance(item.get("error"), dict)]
        delivered = [item for item in data if not isinstance(item.get("error"), dict)]
        if not delivered:
            if refused:
                raise upstream_error(client, ARK_ERRORS, 400, refused[0])
            raise client.failure("failed", "the answer holds no image", code="bad_upstream_answer")

        async def fetch(index: int, _: int) -> GeneratedImage:
            item = delivered[index]
            if isinstance(item.get("b64_json"), str):
                return decode_b64_image(item["b64_json"])
            if isinstance(item.get("url"), str):
                return await download_image(client, item["url"], options.max_image_bytes)
            raise client.failure("failed", "an image entry has neither 'b64_json' nor 'url'",
                                 code="bad_upstream_answer")

        images = await fan_out([1] * len(delivered), fetch)
        usage = answer.body.get("usage")
        sizes = [item["size"] for item in delivered if isinstance(item.get("size"), str)]
        return ArkAnswer(images=images, sizes=sizes, usage=usage if isinstance(usage, dict) else None)


def ark_usage(usages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Ark's usage added up over the calls, with OpenAI's `input_tokens` beside it (Ark counts outputs)."""
    total = add_usage([{key: usage[key] for key in ("generated_images", "output_tokens", "total_tokens")
                        if isinstance(usage.get(key), int)} for usage in usages])
    if total is None:
        return None
    if "total_tokens" in total and "output_tokens" in total:
        total["input_tokens"] = total["total_tokens"] - total["output_tokens"]
    return total
