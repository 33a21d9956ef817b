"""OpenRouter's image models through chat completions with image output.

Follows OpenRouter's documentation (openrouter.ai/docs: "Image Generation" under multimodal features, the
chat completions API reference and "Errors and Debugging", as published in late 2025):

    POST {base_url}/chat/completions     Authorization: Bearer <key>   (optional HTTP-Referer, X-Title)
    {"model", "messages": [{"role": "user", "content": prompt | [{"type": "text"}, {"type": "image_url"}]}],
     "modalities": ["image", "text"], "image_config": {"aspect_ratio", "image_size"}, "seed", "user"}
    200 -> {"choices": [{"message": {"content", "images": [{"type": "image_url", "image_url": {"url"}}]},
                         "finish_reason", "native_finish_reason"}],
            "usage": {"prompt_tokens", "completion_tokens", "total_tokens", "cost"}}
    errors -> {"error": {"code", "message", "metadata"}}, with the HTTP status of `code`, or inside a 200 when
              the model failed after it started

How the gateway's request reaches OpenRouter:
- `size` becomes `image_config.aspect_ratio`, the nearest of the ratios OpenRouter documents for its image
  models (a deployment may list others, or none to send no ratio); `auto` sends none.
- `n`: one call draws one image; more are parallel calls. `seed` goes along (call i: seed + i) and `user` too;
  `style`, `negative_prompt` and transparent backgrounds are refused with a 400.
- Edits send the input images as `image_url` content parts holding data URLs. Chat models have no mask
  parameter: the mask is one more image part, described in text (`MASK_INSTRUCTION`).
- The message text becomes the images' `revised_prompt`. A `content_filter` finish, a moderation 403 or an
  answer without images is a 400 naming the reason; usage (tokens and `cost`) is carried into the answer.
"""

from __future__ import annotations

from typing import Any, Literal

import pybase64
from pydantic import Field

from service.errors import GatewayError
from workers.imaging import image_size
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
from workers.providers.translation import (
    MASK_INSTRUCTION,
    AspectRatio,
    CallResult,
    add_usage,
    calls_for,
    fan_out,
    nearest_aspect_ratio,
    refuse_parameters,
)
from workers.providers.upstream_client import (
    FailureKind,
    JsonAnswer,
    UpstreamClient,
    kind_for_status,
    retry_after,
)

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
CONTENT_POLICY = "content_policy_violation"

# image_config.aspect_ratio values OpenRouter documents for its image models
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")

# Spec fields chat image models cannot honour, with the values refused (None: any value that is set)
REFUSED: dict[str, frozenset[Any] | None] = {
    "style": None,
    "negative_prompt": None,
    "background": frozenset({"transparent"}),
    "stream": None,
    "partial_images": None,
}

# OpenRouter's error codes (= HTTP statuses) where they mean more than the status alone
KIND_BY_CODE: dict[int, FailureKind] = {
    402: "failed",  # the account is out of credits: another deployment may still serve
    404: "failed",  # no such model or endpoint: the config's fault, not the request's
    502: "failed",
    503: "failed",
}
# finish reasons that end a generation without its images
REFUSING_FINISHES = frozenset({"content_filter"})


class OpenRouterOptions(ProviderOptions):
    app_url: str | None = Field(None, description="sent as HTTP-Referer: the app's URL on OpenRouter")
    app_title: str | None = Field(None, description="sent as X-Title: the app's name on OpenRouter")
    modalities: list[Literal["image", "text"]] = Field(
        ["image", "text"], description="output modalities; image-only models (FLUX...) take ['image']")
    aspect_ratios: list[AspectRatio] = Field(
        list(ASPECT_RATIOS), description="image_config.aspect_ratio values the model takes; [] sends none")
    image_size: Literal["1K", "2K", "4K"] | None = Field(None, description="image_config.image_size")


class OpenRouterProvider(Provider):
    """Any OpenRouter model with image output, through `/chat/completions`."""

    type = "openrouter"
    Options = OpenRouterOptions

    async def generate(self, request: ImageRequest, deployment: Deployment, progress: ProgressReporter
                       ) -> ProviderResult:
        spec = request.spec
        options = self.options(deployment)
        assert isinstance(options, OpenRouterOptions)
        refuse_parameters(spec, REFUSED, self.type)
        client = UpstreamClient(self.http, self.type, deployment)
        url = f"{deployment.base_url or DEFAULT_BASE_URL}/chat/completions"
        headers = request_headers(deployment, options)
        ratio = nearest_aspect_ratio(spec, tuple(options.aspect_ratios))
        done = 0

        async def call(index: int, count: int) -> CallResult:
            nonlocal done
            payload = chat_payload(request, deployment, options, ratio, index)
            result = read_completion(client, await client.post_json(url, payload, headers))
            done += len(result.images)
            await progress.update(done / spec.n, f"received {done}/{spec.n} images")
            return result

        await progress.update(0.0, f"requesting {spec.n} image{'s' if spec.n > 1 else ''} from OpenRouter")
        results = await fan_out(calls_for(spec.n, 1), call)
        images = [image for result in results for image in result.images]
        return ProviderResult(images=images, usage=add_usage([r.usage for r in results if r.usage]),
                              size=image_size(images[0].data))


def request_headers(deployment: Deployment, options: OpenRouterOptions) -> dict[str, str]:
    headers = dict(deployment.headers)
    for name, value in (("HTTP-Referer", options.app_url), ("X-Title", options.app_title)):
        if value:
            headers[name] = value
    if deployment.api_key:
        headers["Authorization"] = f"Bearer {deployment.api_key}"
    return headers


def image_part(image: InputImage) -> dict[str, Any]:
    data = pybase64.b64encode_as_string(image.data)
    return {"type": "image_url", "image_url": {"url": f"data:{image.content_type};base64,{data}"}}


def chat_payload(request: ImageRequest, deployment: Deployment, options: OpenRouterOptions, ratio: str | None,
                 index: int) -> dict[str, Any]:
    spec = request.spec
    content: str | list[dict[str, Any]] = spec.prompt
    if request.images:
        content = [{"type": "text", "text": spec.prompt}, *(image_part(image) for image in request.images)]
        if request.mask is not None:
            content += [image_part(request.mask), {"type": "text", "text": MASK_INSTRUCTION}]
    payload: dict[str, Any] = {
        "model": deployment.upstream_model,
        "messages": [{"role": "user", "content": content}],
        "modalities": list(options.modalities),
    }
    image_config = {key: value for key, value in (("aspect_ratio", ratio), ("image_size", options.image_size))
                    if value is not None}
    if image_config:
        payload["image_config"] = image_config
    if spec.seed is not None:
        payload["seed"] = spec.seed + index
    if spec.user is not None:
        payload["user"] = spec.user
    return payload


def openrouter_error(client: UpstreamClient, status: int, error: Any, wait: float | None) -> GatewayError:
    """The gateway error for OpenRouter's `{"code", "message", "metadata"}` error object."""
    if not isinstance(error, dict):
        return client.failure(kind_for_status(status), "no reason given", status=status, wait=wait)
    code: int = error["code"] if isinstance(error.get("code"), int) else status
    metadata: dict[str, Any] = error["metadata"] if isinstance(error.get("metadata"), dict) else {}
    detail = str(error.get("message") or "no reason given")
    if metadata.get("provider_name"):
        detail += f" (provider {metadata['provider_name']})"
    if metadata.get("reasons"):  # moderation: the input was flagged
        reasons = ", ".join(str(reason) for reason in metadata["reasons"])
        return client.failure("rejected", f"{detail}; flagged for: {reasons}", status=code,
                              code=CONTENT_POLICY, param="prompt")
    return client.failure(KIND_BY_CODE.get(code) or kind_for_status(code), detail, status=code, wait=wait)


def read_completion(client: UpstreamClient, answer: JsonAnswer) -> CallResult:
    """The images of one chat completion, or the gateway error for why there are none."""
    body = answer.body
    wait = retry_after(answer.headers)
    if not isinstance(body, dict):
        raise openrouter_error(client, answer.status, None, wait)
    if answer.status >= 300 or "error" in body:
        raise openrouter_error(client, answer.status, body.get("error"), wait)
    choices = body.get("choices")
    if not choices or not isinstance(choices[0], dict):
        raise client.failure("failed", "the answer has no choices", code="bad_upstream_answer")
    choice = choices[0]
    if choice.get("error"):
        raise openrouter_error(client, answer.status, choice["error"], wait)
    message = choice.get("message") or {}
    text = message.get("content") if isinstance(message.get("content"), str) else None
    revised = text.strip() if text and text.strip() else None
    finish = choice.get("finish_reason")
    if finish in REFUSING_FINISHES:
        native = f" ({choice['native_finish_reason']})" if choice.get("native_finish_reason") else ""
        raise client.failure("rejected", f"generation stopped: {finish}{native}", code=CONTENT_POLICY,
                             param="prompt")
    images = [decode_image_url(client, image, revised) for image in message.get("images") or []]
    if not images:
        said = f"; it said: {revised}" if revised else ""
        raise client.failure("rejected", f"the model returned no image{said}", code="upstream_no_image",
                             param="prompt")
    return CallResult(images=images, usage=openrouter_usage(body.get("usage")))


def decode_image_url(client: UpstreamClient, image: Any, revised: str | None) -> GeneratedImage:
    url = (image.get("image_url") or {}).get("url") if isinstance(image, dict) else None
    if not isinstance(url, str) or not url.startswith("data:"):
        raise client.failure("failed", "an image came back without a data URL", code="bad_upstream_answer")
    return decode_b64_image(url, revised)


def openrouter_usage(usage: Any) -> dict[str, Any] | None:
    """OpenRouter's chat usage in the shape of OpenAI's image usage, with its `cost` (credits) kept."""
    if not isinstance(usage, dict):
        return None
    mapped = {"input_tokens": usage.get("prompt_tokens", 0),
              "output_tokens": usage.get("completion_tokens", 0),
              "total_tokens": usage.get("total_tokens", 0)}
    if isinstance(usage.get("cost"), int | float):
        mapped["cost"] = usage["cost"]
    return mapped
