"""A fake Gemini API (generativelanguage.googleapis.com) for Gemini image models and Imagen.

Modelled on the Gemini API reference (REST v1beta) and its image-generation guide:

* ``POST /v1beta/models/{model}:generateContent`` for the Gemini image models: ``contents[].parts`` of
  ``text`` and ``inlineData`` / ``inline_data`` images, ``generationConfig.responseModalities`` (without
  ``IMAGE`` the model only talks), ``imageConfig.aspectRatio`` / ``imageSize`` and ``candidateCount``.
  Each candidate holds a text part and an ``inlineData`` PNG drawn at the 1K pixel size Google lists for
  the ratio (an edit without a ratio keeps the first input's size) and ends ``finishReason: STOP``; the
  answer has ``usageMetadata`` (258 tokens per input image, 1290 per output image, as Google counts them).
* ``POST /v1beta/models/{imagen-model}:predict``: ``instances[0].prompt``, ``parameters.sampleCount``
  (1-4) and ``aspectRatio``; answers ``predictions[].bytesBase64Encoded``.
* The key comes in ``x-goog-api-key`` (or ``?key=``). A missing key is 403 PERMISSION_DENIED, a wrong one
  400 INVALID_ARGUMENT with an ``ErrorInfo`` reason ``API_KEY_INVALID``, as Google answers; unknown models
  or methods 404 NOT_FOUND; unknown fields 400 INVALID_ARGUMENT. Errors use Google's body
  ``{"error": {"code", "message", "status", "details"}}``.

Failures scripted with ``fail_next(kind)``: ``auth``, ``rate_limit`` (429 RESOURCE_EXHAUSTED with a
RetryInfo detail, and ``Retry-After`` when given), ``server_error`` (500 INTERNAL), ``unavailable`` (503),
``blocked_prompt`` (``promptFeedback.blockReason``), ``image_safety`` (``finishReason: IMAGE_SAFETY``;
Imagen: a ``raiFilteredReason``) and ``no_image`` (the model answers in words only).
"""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.fakes.recording import Failure, RecordingServer, image_dimensions, png

API_KEY = "AIzaSy-fake-gemini-key-0123456789"
GEMINI_MODELS = frozenset({"gemini-2.5-flash-image", "gemini-3-pro-image-preview"})
IMAGEN_MODELS = frozenset({"imagen-4.0-generate-001", "imagen-4.0-fast-generate-001"})
# the pixels Gemini 2.5 Flash Image draws for each aspect ratio (Google's image-generation guide)
GEMINI_SIZES = {"1:1": (1024, 1024), "2:3": (832, 1248), "3:2": (1248, 832), "3:4": (864, 1184),
                "4:3": (1184, 864), "4:5": (896, 1152), "5:4": (1152, 896), "9:16": (768, 1344),
                "16:9": (1344, 768), "21:9": (1536, 672)}
IMAGEN_SIZES = {"1:1": (1024, 1024), "3:4": (896, 1280), "4:3": (1280, 896), "9:16": (768, 1408),
                "16:9": (1408, 768)}
REQUEST_FIELDS = frozenset({"contents", "generationConfig", "safetySettings", "systemInstruction"})
GENERATION_CONFIG_FIELDS = frozenset({"responseModalities", "imageConfig", "seed", "temperature", "topP",
                                      "topK", "candidateCount", "maxOutputTokens", "stopSequences"})
IMAGE_CONFIG_FIELDS = frozenset({"aspectRatio", "imageSize"})
IMAGEN_PARAMETERS = frozenset({"sampleCount", "aspectRatio", "sampleImageSize", "personGeneration",
                               "includeRaiReason", "includeSafetyAttributes", "outputOptions"})
TEXT_ANSWER = "Here is a picture of what you described."
IMAGE_PROMPT_TOKENS = 258
IMAGE_OUTPUT_TOKENS = 1290

MESSAGES = {
    "no_key": "Method doesn't allow unregistered callers (callers without established identity). Please use "
              "API Key or other form of API consumer identity to call this API.",
    "bad_key": "API key not valid. Please pass a valid API key.",
    "quota": "You exceeded your current quota, please check your plan and billing details.",
    "internal": "An internal error has occurred. Please retry or report in "
                "https://developers.generativeai.google/guide/troubleshooting",
    "overloaded": "The model is overloaded. Please try again later.",
    "image_safety": "Unable to show the generated image. The image was filtered out because it violated "
                    "Google's Generative AI Prohibited Use policy.",
    "rai_filtered": "Your current safety filter threshold filtered out the generated image. Try rephrasing "
                    "the prompt. Support codes: 56562880",
}


def google_error(status: int, name: str, message: str, details: list[dict[str, Any]] | None = None,
                 retry_after: str | None = None) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": name}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=status,
                             headers={"Retry-After": retry_after} if retry_after else None)


def invalid(message: str) -> web.Response:
    return google_error(400, "INVALID_ARGUMENT", message)


def unknown_field(name: str, where: str = "") -> web.Response:
    return invalid(f'Invalid JSON payload received. Unknown name "{name}"{where}: Cannot find field.')


def bad_key(failure: Failure | None = None) -> web.Response:
    return google_error(400, "INVALID_ARGUMENT", MESSAGES["bad_key"], [{
        "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
        "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}])


def rate_limited(failure: Failure) -> web.Response:
    return google_error(429, "RESOURCE_EXHAUSTED", failure.message or MESSAGES["quota"], [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "13s"},
    ], retry_after=failure.retry_after)


# scripted failures that replace the whole answer; the others shape a 200
ERROR_ANSWERS: dict[str, Callable[[Failure], web.Response]] = {
    "auth": bad_key,
    "rate_limit": rate_limited,
    "server_error": lambda failure: google_error(500, "INTERNAL", failure.message or MESSAGES["internal"]),
    "unavailable": lambda failure: google_error(503, "UNAVAILABLE", failure.message or MESSAGES["overloaded"],
                                                retry_after=failure.retry_after),
}


def inline(image: bytes) -> dict[str, Any]:
    return {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(image).decode()}}


class FakeGemini(RecordingServer):
    """`async with FakeGemini() as fake:` then point a provider at `fake.url`."""

    def __init__(self, api_key: str = API_KEY, text: str | None = TEXT_ANSWER) -> None:
        super().__init__()
        self.api_key = api_key
        self.text = text  # the words that come with each image (None: the image alone)
        self.images: list[bytes] = []  # every image handed out, in order
        self._serial = itertools.count()
        self.app.router.add_post("/{version}/models/{target}", self.models)

    def draw(self, width: int, height: int, model: str) -> bytes:
        image = png(width, height, f"{model}|{width}x{height}|{next(self._serial)}")
        self.images.append(image)
        return image

    async def models(self, request: web.Request) -> web.Response:
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            return google_error(403, "PERMISSION_DENIED", MESSAGES["no_key"])
        if key != self.api_key:
            return bad_key()
        model, _, method = request.match_info["target"].partition(":")
        version = request.match_info["version"]
        known = {"generateContent": GEMINI_MODELS, "predict": IMAGEN_MODELS}.get(method, frozenset())
        if version not in ("v1beta", "v1") or model not in known:
            return google_error(404, "NOT_FOUND", f"models/{model} is not found for API version {version}, "
                                f"or is not supported for {method}. Call ListModels to see the list of "
                                "available models and their supported methods.")
        failure = self.take_failure()
        if failure is not None and failure.kind in ERROR_ANSWERS:
            return ERROR_ANSWERS[failure.kind](failure)
        body = await request.json()
        if not isinstance(body, dict):
            return invalid("Invalid JSON payload received. Expected an object.")
        if method == "predict":
            return self.predict(model, body, failure)
        return self.generate_content(model, body, failure)

    def generate_content(self, model: str, body: dict[str, Any], failure: Failure | None) -> web.Response:
        contents = body.get("contents")
        if not contents or not isinstance(contents, list):
            return invalid("* GenerateContentRequest.contents: contents is not specified")
        if set(body) - REQUEST_FIELDS:
            return unknown_field(sorted(set(body) - REQUEST_FIELDS)[0])
        words, inputs = 0, []
        for content in contents:
            for part in content.get("parts") or []:
                image = part.get("inlineData") or part.get("inline_data")
                if image is not None:
                    try:
                        inputs.append(base64.b64decode(image["data"], validate=True))
                    except (KeyError, binascii.Error):
                        return invalid("Invalid value at 'contents[0].parts.inline_data.data' (TYPE_BYTES), "
                                       "Base64 decoding failed")
                elif isinstance(part.get("text"), str):
                    words += len(part["text"].split())
                else:
                    return invalid("* GenerateContentRequest.contents[0].parts: contains an empty Part")
        config = body.get("generationConfig") or {}
        image_config = config.get("imageConfig") or {}
        if set(config) - GENERATION_CONFIG_FIELDS:
            return unknown_field(sorted(set(config) - GENERATION_CONFIG_FIELDS)[0], " at 'generation_config'")
        if set(image_config) - IMAGE_CONFIG_FIELDS:
            return unknown_field(sorted(set(image_config) - IMAGE_CONFIG_FIELDS)[0],
                                 " at 'generation_config.image_config'")
        ratio = image_config.get("aspectRatio")
        if ratio is not None and ratio not in GEMINI_SIZES:
            return invalid(f"Unsupported aspect ratio: {ratio}. Supported: {', '.join(GEMINI_SIZES)}.")
        if image_config.get("imageSize") not in (None, "1K", "2K", "4K"):
            return invalid(f"Unsupported image size: {image_config['imageSize']}.")

        prompt_tokens = words + IMAGE_PROMPT_TOKENS * len(inputs)
        usage: dict[str, Any] = {
            "promptTokenCount": prompt_tokens,
            "totalTokenCount": prompt_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": words}],
        }
        if inputs:
            usage["promptTokensDetails"].append({"modality": "IMAGE", "tokenCount": prompt_tokens - words})
        kind = failure.kind if failure is not None else None
        if kind == "blocked_prompt":
            return web.json_response({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                                      "usageMetadata": usage, "modelVersion": model})
        if kind == "image_safety":
            blocked = {"finishReason": "IMAGE_SAFETY", "index": 0, "finishMessage": MESSAGES["image_safety"]}
            return web.json_response({"candidates": [blocked], "usageMetadata": usage, "modelVersion": model})

        draws = "IMAGE" in (config.get("responseModalities") or ["TEXT"]) and kind != "no_image"
        count = config.get("candidateCount", 1)
        if not isinstance(count, int) or not 1 <= count <= 8:
            return invalid("candidateCount must be between 1 and 8.")
        if draws and ratio is not None:
            width, height = GEMINI_SIZES[ratio]
        else:
            width, height = image_dimensions(inputs[0]) if inputs else (1024, 1024)
        candidates = []
        for index in range(count):
            parts: list[dict[str, Any]] = []
            if kind == "no_image":
                parts.append({"text": "I can't create that image."})
            elif self.text is not None or not draws:
                parts.append({"text": self.text or "Sure."})
            if draws:
                parts.append(inline(self.draw(width, height, model)))
            candidates.append({"content": {"role": "model", "parts": parts}, "finishReason": "STOP",
                               "index": index})
        if draws:
            output_tokens = IMAGE_OUTPUT_TOKENS * count
            usage.update(candidatesTokenCount=output_tokens, totalTokenCount=prompt_tokens + output_tokens,
                         candidatesTokensDetails=[{"modality": "IMAGE", "tokenCount": output_tokens}])
        return web.json_response({"candidates": candidates, "usageMetadata": usage, "modelVersion": model,
                                  "responseId": f"fake-{next(self._serial)}"})

    def predict(self, model: str, body: dict[str, Any], failure: Failure | None) -> web.Response:
        instances = body.get("instances")
        if not instances or not isinstance(instances[0].get("prompt"), str):
            return invalid("Missing instances[0].prompt")
        parameters = body.get("parameters") or {}
        if set(parameters) - IMAGEN_PARAMETERS:
            return unknown_field(sorted(set(parameters) - IMAGEN_PARAMETERS)[0], " at 'parameters'")
        count = parameters.get("sampleCount", 4)
        if not isinstance(count, int) or not 1 <= count <= 4:
            return invalid("Number of images must be in range [1, 4].")
        ratio = parameters.get("aspectRatio", "1:1")
        if ratio not in IMAGEN_SIZES:
            return invalid(f"Unsupported aspect ratio: {ratio}.")
        if failure is not None:  # blocked_prompt, image_safety, no_image: every image filtered out
            filtered = [{"raiFilteredReason": MESSAGES["rai_filtered"]}]
            return web.json_response({"predictions": filtered} if parameters.get("includeRaiReason") else {})
        images = [self.draw(*IMAGEN_SIZES[ratio], model) for _ in range(count)]
        predictions = [{"bytesBase64Encoded": base64.b64encode(image).decode(), "mimeType": "image/png"}
                       for image in images]
        return web.json_response({"predictions": predictions})
