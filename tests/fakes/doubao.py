"""A fake Volcengine Ark image generation API (Doubao Seedream), speaking the wire protocol of Ark's
"图片生成 API" reference (Seedream 4.0) and its error codes:

* ``POST /api/v3/images/generations`` with ``Authorization: Bearer <key>`` and a JSON body: ``model``,
  ``prompt``, ``size`` (``1K``/``2K``/``4K`` or ``WIDTHxHEIGHT`` with 1280x720..4096x4096 pixels and an aspect
  ratio within 1:16..16:1), ``seed`` (-1..2^31-1), ``watermark`` (default true), ``response_format``
  (default ``url``), ``image`` (one data URL or a list; this fake takes no web links),
  ``sequential_image_generation`` with ``sequential_image_generation_options.max_images`` (inputs plus
  outputs at most 15), ``stream``.
* Answers ``{"model", "created", "data": [{"url" | "b64_json", "size"}], "usage": {"generated_images",
  "output_tokens", "total_tokens"}}``; links point at ``GET /files/...`` on this server (no auth, like Ark's
  signed TOS links).
* Errors use Ark's body ``{"error": {"code", "message", "param", "type"}}``.

Pictures are one colour drawn from prompt, seed and image index (random per call without a seed), with a
white corner block when ``watermark`` is on; an edit takes its colour from the first input image's top-left
pixel, so a test can see the input arrived. ``sequential_limit`` makes sequential mode draw fewer images
than ``max_images`` (the real model decides from the prompt), ``refuse_outputs`` replaces the first images of
the next answer by per-image safety errors, and ``fail(code)`` scripts whole-call failures.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import time
import uuid
from typing import Any

from aiohttp import web
from PIL import Image, UnidentifiedImageError

from tests.fakes.images_api import FakeImagesAPI, color_for, png

API_KEY = "ark-fake-3f9a7c2e-0123-4567-89ab-cdef01234567"
SEEDREAM_4 = "doubao-seedream-4-0-250828"
SEEDREAM_3 = "doubao-seedream-3-0-t2i-250415"  # text-to-image only, no sequential mode
TIERS = {"1K": (1024, 1024), "2K": (2048, 2048), "4K": (4096, 4096)}

# Ark's own status, type and message for each error code a test may script
ERRORS: dict[str, tuple[int, str, str]] = {
    "AuthenticationError": (
        401, "Unauthorized", "The API key or AK/SK in the request is missing or invalid."),
    "RateLimitExceeded": (
        429, "TooManyRequests", "Your account has exceeded the rate limit (IPM) for the model."),
    "ServerOverloaded": (
        429, "TooManyRequests", "The service is currently unable to handle more requests due to overload."),
    "InternalServiceError": (
        500, "InternalServiceError", "The service encountered an unexpected internal error."),
    "InputTextSensitiveContentDetected": (
        400, "BadRequest", "The request failed because the input text may contain sensitive information."),
    "OutputImageSensitiveContentDetected": (
        400, "BadRequest", "The request failed because the output image may contain sensitive information."),
    "InvalidEndpointOrModel.NotFound": (
        404, "NotFound", "The model or endpoint does not exist or you do not have access to it."),
}


def ark_error(code: str, message: str | None = None, param: str = "") -> tuple[int, dict[str, Any]]:
    status, kind, default = ERRORS.get(code, (400, "BadRequest", ""))
    text = f"{message or default} Request id: {uuid.uuid4().hex}"
    return status, {"error": {"code": code, "message": text, "param": param, "type": kind}}


def invalid(param: str, message: str) -> web.Response:
    status, body = ark_error("InvalidParameter", f"The parameter `{param}` specified in the request is not "
                                                 f"valid: {message}.", param)
    return web.json_response(body, status=status)


def tier_or_pixels(size: str) -> tuple[int, int] | str:
    """The (width, height) Ark draws for `size`, or why it refuses it."""
    if size in TIERS:
        return TIERS[size]
    width, sep, height = size.partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        return "size must be 1K, 2K, 4K or WIDTHxHEIGHT"
    w, h = int(width), int(height)
    if not 1280 * 720 <= w * h <= 4096 * 4096:
        return "total pixels must be within [1280x720, 4096x4096]"
    if max(w, h) > 16 * min(w, h):
        return "aspect ratio must be within [1/16, 16]"
    return w, h


def first_pixel(image: str) -> tuple[int, int, int] | None:
    """The top-left colour of a data-URL image, None when it is not one."""
    head, sep, data = image.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        return None
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as picture:
            r, g, b = picture.convert("RGB").getpixel((0, 0))  # type: ignore[misc]
            return int(r), int(g), int(b)
    except (binascii.Error, ValueError, UnidentifiedImageError):
        return None


class FakeArk(FakeImagesAPI):
    """Point a doubao provider's `base_url` at `fake.url`."""

    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self.sequential_limit: int | None = None
        self.refuse_outputs = 0
        self._random = itertools.count()
        super().__init__()

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/api/v3/images/generations", self.generations)
        router.add_get("/files/{name}", self.file)

    def fail(self, code: str, *, times: int = 1, retry_after: str | None = None) -> None:
        status, body = ark_error(code)
        self.fail_with(status, body, times=times, retry_after=retry_after)

    async def generations(self, request: web.Request) -> web.Response:
        call = await self.record(request)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            status, body = ark_error("AuthenticationError")
            return web.json_response(body, status=status)
        scripted = self.scripted()
        if scripted is not None:
            return scripted
        if not isinstance(call.json, dict):
            return invalid("body", "the request body must be a JSON object")
        return self.answer(call.json)

    def answer(self, body: dict[str, Any]) -> web.Response:
        model, prompt = body.get("model"), body.get("prompt")
        if not model or not prompt:
            status, error = ark_error("MissingParameter", "The request failed because it is missing one or "
                                      "multiple required parameters.", "model" if not model else "prompt")
            return web.json_response(error, status=status)
        if model not in (SEEDREAM_4, SEEDREAM_3):
            status, error = ark_error("InvalidEndpointOrModel.NotFound")
            return web.json_response(error, status=status)
        dims = tier_or_pixels(str(body.get("size", "2048x2048")))
        if isinstance(dims, str):
            return invalid("size", dims)
        seed = body.get("seed", -1)
        if not isinstance(seed, int) or not -1 <= seed <= 2**31 - 1:
            return invalid("seed", "seed must be an integer within [-1, 2147483647]")
        response_format = body.get("response_format", "url")
        if response_format not in ("url", "b64_json"):
            return invalid("response_format", "response_format must be url or b64_json")
        if body.get("stream", False) is not False:
            return invalid("stream", "this fake answers without streaming only")
        watermark = body.get("watermark", True)
        images = body.get("image", [])
        images = [images] if isinstance(images, str) else images
        colors = [first_pixel(image) for image in images] if isinstance(images, list) else [None]
        if None in colors:
            return invalid("image", "image must be a URL or a data URL of a JPEG/PNG/WEBP image")
        count = 1
        mode = body.get("sequential_image_generation", "disabled")
        if mode not in ("auto", "disabled"):
            return invalid("sequential_image_generation", "must be auto or disabled")
        if model == SEEDREAM_3 and (images or "sequential_image_generation" in body):
            return invalid("image" if images else "sequential_image_generation",
                           f"not supported by model {SEEDREAM_3}")
        if mode == "auto":
            max_images = (body.get("sequential_image_generation_options") or {}).get("max_images", 15)
            if not isinstance(max_images, int) or not 1 <= max_images <= 15 - len(images):
                return invalid("sequential_image_generation_options.max_images",
                               "reference images plus generated images must not exceed 15")
            count = min(max_images, self.sequential_limit or max_images)
        random_id = next(self._random)
        data: list[dict[str, Any]] = []
        for index in range(count):
            if self.refuse_outputs:
                self.refuse_outputs -= 1
                _, error = ark_error("OutputImageSensitiveContentDetected")
                data.append({"error": {k: error["error"][k] for k in ("code", "message")}})
                continue
            color = colors[0] if images else color_for(prompt, seed if seed >= 0 else f"r{random_id}", index)
            picture = png(dims, color or (0, 0, 0), mark=bool(watermark))
            size = f"{dims[0]}x{dims[1]}"
            if response_format == "b64_json":
                data.append({"b64_json": base64.b64encode(picture).decode(), "size": size})
            else:
                data.append({"url": self.publish(picture, "seedream"), "size": size})
        made = sum(1 for item in data if "error" not in item)
        tokens = made * dims[0] * dims[1] // 256
        return web.json_response({"model": model, "created": int(time.time()), "data": data,
                                  "usage": {"generated_images": made, "output_tokens": tokens,
                                            "total_tokens": tokens}})
