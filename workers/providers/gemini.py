"""Google's Gemini image models through `generateContent`, and Imagen through `predict`.

Follows the Gemini API reference (ai.google.dev/api, REST `v1beta`, the revision with Gemini 2.5 Flash
Image, Gemini 3 Pro Image and Imagen 4): `models.generateContent` with `responseModalities` and
`imageConfig` (`aspectRatio`, `imageSize`), the "Image generation with Gemini" guide for inline image input
and output, `models.predict` for Imagen (`instances[].prompt`; `parameters.sampleCount`, `aspectRatio`,
`sampleImageSize`, `personGeneration`, `includeRaiReason`), and Google's error model
`{"error": {"code", "message", "status", "details"}}`:

    POST {base_url}/v1beta/models/{model}:generateContent          x-goog-api-key: <key>
    {"contents": [{"role": "user", "parts": [{"text"}, {"inlineData": {"mimeType", "data"}}...]}],
     "generationConfig": {"responseModalities": ["TEXT", "IMAGE"], "imageConfig": {"aspectRatio"}, "seed"}}
    200 -> {"candidates": [{"content": {"parts": [{"text"} | {"inlineData"}]}, "finishReason"}],
            "promptFeedback": {"blockReason"}, "usageMetadata": {"promptTokenCount", ...}}
    POST {base_url}/v1beta/models/{imagen-model}:predict
    {"instances": [{"prompt"}], "parameters": {"sampleCount", "aspectRatio", ...}}
    200 -> {"predictions": [{"bytesBase64Encoded", "mimeType"} | {"raiFilteredReason"}]}

How the gateway's request reaches Google (the tables below, not conditionals):
- `size` becomes the nearest supported aspect ratio; `auto` leaves the choice to the model (for an edit:
  the input's shape). Google draws its own pixel size for that ratio, and the answer's `size` says which.
- `n`: a Gemini call returns one image (a deployment may raise `images_per_call`, sent as
  `candidateCount`) and an Imagen call up to four; more are parallel calls.
- `seed` becomes `generationConfig.seed`, call i getting seed + i so the images differ yet repeat. The
  Gemini API's Imagen has no seed, so there it is refused, as are `style`, `negative_prompt` and
  transparent backgrounds.
- Edits send the input images as `inlineData` parts after the prompt. Gemini has no mask parameter: the
  mask goes as one more image part, described in text (`MASK_INSTRUCTION`), so the model is asked, not
  forced, to keep the unmasked areas. Imagen edits are refused: the Gemini API has no Imagen edit method.
- Text parts of the answer become the images' `revised_prompt`; "thought" parts are skipped.
- A blocked prompt (`promptFeedback.blockReason`), a finish reason other than STOP, or an answer without
  an image is a 400 naming Google's reason, never retried; an Imagen answer with only some images filtered
  out returns the others. `usageMetadata` becomes OpenAI-shaped usage.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pybase64
from pydantic import Field

from service.errors import UpstreamRejected
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
    reject_operation,
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

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
SEED_MAX = 2**31 - 1  # generationConfig.seed is an int32
CONTENT_POLICY = "content_policy_violation"

# Spec fields Google cannot honour, with the values refused (None: any value that is set)
REFUSED_BY_GEMINI: dict[str, frozenset[Any] | None] = {
    "style": None,
    "negative_prompt": None,
    "background": frozenset({"transparent"}),
    "stream": None,
    "partial_images": None,
}
REFUSED_BY_IMAGEN = {**REFUSED_BY_GEMINI, "seed": None}


@dataclass(frozen=True)
class GoogleMethod:
    """What differs between the two Google methods, as data."""

    name: str  # generateContent | predict
    aspect_ratios: tuple[str, ...]
    images_per_call: int
    refused: Mapping[str, frozenset[Any] | None]


GENERATE_CONTENT = GoogleMethod(
    name="generateContent",
    aspect_ratios=("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"),
    images_per_call=1,
    refused=REFUSED_BY_GEMINI,
)
PREDICT = GoogleMethod(
    name="predict",
    aspect_ratios=("1:1", "3:4", "4:3", "9:16", "16:9"),
    images_per_call=4,
    refused=REFUSED_BY_IMAGEN,
)

# Google's canonical error status decides where it says more than the HTTP code
KIND_BY_GOOGLE_STATUS: dict[str, FailureKind] = {
    "INVALID_ARGUMENT": "rejected",
    "OUT_OF_RANGE": "rejected",
    "FAILED_PRECONDITION": "failed",  # billing or region of the account, not the request
    "UNAUTHENTICATED": "auth",
    "PERMISSION_DENIED": "auth",
    "NOT_FOUND": "failed",  # a model this account cannot use: the config's fault
    "RESOURCE_EXHAUSTED": "rate_limited",
    "DEADLINE_EXCEEDED": "timeout",
    "INTERNAL": "failed",
    "UNAVAILABLE": "failed",
}
# ErrorInfo reasons that override the status: an invalid key is a 400 INVALID_ARGUMENT
KIND_BY_REASON: dict[str, FailureKind] = {"API_KEY_INVALID": "auth", "API_KEY_EXPIRED": "auth"}
VERSIONED_BASE = re.compile(r"/v\d+(alpha|beta)?\d*$")


class GeminiOptions(ProviderOptions):
    api_version: str = Field("v1beta", description="API version path segment, unless base_url ends in one")
    aspect_ratios: list[AspectRatio] | None = Field(
        None, description="aspect ratios the model takes; default: Gemini's ten, or Imagen's five")
    image_size: Literal["1K", "2K", "4K"] | None = Field(
        None, description="imageConfig.imageSize (Gemini 3 Pro Image) or Imagen's sampleImageSize")
    images_per_call: int | None = Field(None, ge=1, le=8, description="default: 1 for Gemini, 4 for Imagen")
    person_generation: Literal["dont_allow", "allow_adult", "allow_all"] | None = Field(
        None, description="Imagen's personGeneration")


class GeminiProvider(Provider):
    """Gemini image models and Imagen over the Gemini API, keyed by `x-goog-api-key`."""

    type = "gemini"
    Options = GeminiOptions

    async def generate(self, request: ImageRequest, deployment: Deployment, progress: ProgressReporter
                       ) -> ProviderResult:
        spec = request.spec
        options = self.options(deployment)
        assert isinstance(options, GeminiOptions)
        model = deployment.upstream_model.removeprefix("models/")
        method = PREDICT if model.startswith("imagen") else GENERATE_CONTENT
        if method is PREDICT and spec.operation != "generate":
            raise reject_operation(spec, f"{self.type}, Imagen")
        refuse_parameters(spec, method.refused, self.type)
        counts = calls_for(spec.n, options.images_per_call or method.images_per_call)
        if spec.seed is not None and spec.seed + len(counts) - 1 > SEED_MAX:
            raise UpstreamRejected(f"Invalid 'seed': model '{spec.model}' ({self.type}) takes seeds up to "
                                   f"{SEED_MAX - len(counts) + 1} for n={spec.n}.", param="seed")
        client = UpstreamClient(self.http, self.type, deployment)
        url = f"{api_root(deployment, options)}/models/{model}:{method.name}"
        headers = dict(deployment.headers)
        if deployment.api_key:
            headers["x-goog-api-key"] = deployment.api_key
        ratio = nearest_aspect_ratio(spec, tuple(options.aspect_ratios or method.aspect_ratios))
        done = 0

        async def call(index: int, count: int) -> CallResult:
            nonlocal done
            imagen = method is PREDICT
            payload = (imagen_payload(request, options, ratio, count) if imagen
                       else gemini_payload(request, options, ratio, index, count))
            answer = await client.post_json(url, payload, headers)
            raise_for_status(client, answer)
            result = read_predictions(client, answer.body) if imagen else read_candidates(client, answer.body)
            done += len(result.images)
            await progress.update(done / spec.n, f"received {done}/{spec.n} images")
            return result

        await progress.update(0.0, f"requesting {spec.n} image{'s' if spec.n > 1 else ''} from Google")
        results = await fan_out(counts, call)
        images = [image for result in results for image in result.images]
        return ProviderResult(images=images, usage=add_usage([r.usage for r in results if r.usage]),
                              size=image_size(images[0].data))


def api_root(deployment: Deployment, options: GeminiOptions) -> str:
    """The base URL with the API version, unless the configured base already names one."""
    base = deployment.base_url or DEFAULT_BASE_URL
    return base if VERSIONED_BASE.search(base) else f"{base}/{options.api_version}"


def inline_part(image: InputImage) -> dict[str, Any]:
    return {"inlineData": {"mimeType": image.content_type, "data": pybase64.b64encode_as_string(image.data)}}


def gemini_payload(request: ImageRequest, options: GeminiOptions, ratio: str | None, index: int,
                   count: int) -> dict[str, Any]:
    spec = request.spec
    parts: list[dict[str, Any]] = [{"text": spec.prompt}, *(inline_part(image) for image in request.images)]
    if request.mask is not None:
        parts += [inline_part(request.mask), {"text": MASK_INSTRUCTION}]
    image_config = {key: value for key, value in (("aspectRatio", ratio), ("imageSize", options.image_size))
                    if value is not None}
    config: dict[str, Any] = {"responseModalities": ["TEXT", "IMAGE"]}
    if image_config:
        config["imageConfig"] = image_config
    if count > 1:  # only when a deployment says its model draws several (today's image models draw one)
        config["candidateCount"] = count
    if spec.seed is not None:
        config["seed"] = spec.seed + index
    return {"contents": [{"role": "user", "parts": parts}], "generationConfig": config}


def imagen_payload(request: ImageRequest, options: GeminiOptions, ratio: str | None, count: int
                   ) -> dict[str, Any]:
    parameters: dict[str, Any] = {"sampleCount": count, "includeRaiReason": True}
    for key, value in (("aspectRatio", ratio), ("sampleImageSize", options.image_size),
                       ("personGeneration", options.person_generation)):
        if value is not None:
            parameters[key] = value
    return {"instances": [{"prompt": request.spec.prompt}], "parameters": parameters}


def raise_for_status(client: UpstreamClient, answer: JsonAnswer) -> None:
    """Nothing for a 2xx answer; else the gateway error for Google's `{"error": {...}}`, with the delay of
    `Retry-After` or of a RetryInfo detail kept for the router."""
    if answer.status < 300:
        return
    error = answer.body.get("error") if isinstance(answer.body, dict) else None
    if not isinstance(error, dict):
        raise client.failure(kind_for_status(answer.status), answer.text[:200] or "no reason given",
                             status=answer.status, wait=retry_after(answer.headers))
    status = str(error.get("status") or "")
    details = [d for d in error.get("details") or [] if isinstance(d, dict)]
    reasons = [str(d["reason"]) for d in details if d.get("reason") in KIND_BY_REASON]
    kind = (KIND_BY_REASON[reasons[0]] if reasons else None) or KIND_BY_GOOGLE_STATUS.get(status) \
        or kind_for_status(answer.status)
    wait = retry_after(answer.headers)
    if wait is None:
        wait = next((retry_delay(d["retryDelay"]) for d in details if "retryDelay" in d), None)
    label = " ".join(part for part in (status, *reasons) if part)
    raise client.failure(kind, f"{label}: {error.get('message') or 'no reason given'}" if label
                         else str(error.get("message") or "no reason given"), status=answer.status, wait=wait)


def retry_delay(value: Any) -> float | None:
    """google.rpc.RetryInfo's `retryDelay` in its JSON form, a Duration like "13s" or "0.5s"."""
    try:
        return max(0.0, float(str(value).removesuffix("s")))
    except ValueError:
        return None


def read_candidates(client: UpstreamClient, body: Any) -> CallResult:
    """The images of a generateContent answer, or a 400 naming why Google gave none."""
    if not isinstance(body, dict):
        raise client.failure("failed", "the answer is not a JSON object", code="bad_upstream_answer")
    feedback = body.get("promptFeedback") or {}
    if feedback.get("blockReason"):
        message = f": {feedback['blockReasonMessage']}" if feedback.get("blockReasonMessage") else ""
        raise client.failure("rejected", f"the prompt was blocked ({feedback['blockReason']}){message}",
                             code=CONTENT_POLICY, param="prompt")
    candidates = [c for c in body.get("candidates") or [] if isinstance(c, dict)]
    if not candidates:
        raise client.failure("failed", "the answer has no candidates", code="bad_upstream_answer")
    images: list[GeneratedImage] = []
    texts: list[str] = []
    for candidate in candidates:
        reason = candidate.get("finishReason")
        if reason not in (None, "STOP", "FINISH_REASON_UNSPECIFIED"):
            message = f": {candidate['finishMessage']}" if candidate.get("finishMessage") else ""
            raise client.failure("rejected", f"generation stopped ({reason}){message}", code=CONTENT_POLICY,
                                 param="prompt")
        for part in (candidate.get("content") or {}).get("parts") or []:
            if not isinstance(part, dict) or part.get("thought"):
                continue  # the thinking models' drafts, not the answer
            inline = part.get("inlineData") or part.get("inline_data")
            if inline and inline.get("data"):
                images.append(decode_b64_image(inline["data"]))
            elif isinstance(part.get("text"), str):
                texts.append(part["text"].strip())
    revised = " ".join(text for text in texts if text) or None
    if not images:
        said = f"; it said: {revised}" if revised else ""
        raise client.failure("rejected", f"the model returned no image{said}", code="upstream_no_image",
                             param="prompt")
    for image in images:
        image.revised_prompt = revised
    return CallResult(images=images, usage=gemini_usage(body.get("usageMetadata")))


def gemini_usage(metadata: Any) -> dict[str, Any] | None:
    """`usageMetadata` in the shape of OpenAI's image usage."""
    if not isinstance(metadata, dict):
        return None
    usage: dict[str, Any] = {
        "input_tokens": metadata.get("promptTokenCount", 0),
        "output_tokens": metadata.get("candidatesTokenCount", 0),
        "total_tokens": metadata.get("totalTokenCount", 0),
    }
    by_modality = {str(d.get("modality")).lower(): d.get("tokenCount", 0)
                   for d in metadata.get("promptTokensDetails") or [] if isinstance(d, dict)}
    if by_modality:
        usage["input_tokens_details"] = {"text_tokens": by_modality.get("text", 0),
                                         "image_tokens": by_modality.get("image", 0)}
    return usage


def read_predictions(client: UpstreamClient, body: Any) -> CallResult:
    """The images of an Imagen answer; when all were filtered out, a 400 naming Google's reason."""
    predictions = [p for p in (body.get("predictions") if isinstance(body, dict) else None) or []
                   if isinstance(p, dict)]
    images = [decode_b64_image(p["bytesBase64Encoded"]) for p in predictions if p.get("bytesBase64Encoded")]
    if not images:
        reasons = "; ".join(str(p["raiFilteredReason"]) for p in predictions if p.get("raiFilteredReason"))
        raise client.failure("rejected", f"every image was filtered out ({reasons or 'no reason given'})",
                             code=CONTENT_POLICY, param="prompt")
    return CallResult(images=images, usage=None)
