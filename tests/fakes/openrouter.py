"""A fake OpenRouter (openrouter.ai/api/v1) for image models behind chat completions.

Modelled on OpenRouter's "Image Generation" guide, its chat completions reference and "Errors and Debugging":

* ``POST /api/v1/chat/completions`` with ``Authorization: Bearer``; ``messages[].content`` as a string or as
  ``text`` and ``image_url`` parts (data URLs), ``modalities`` (without ``"image"`` the model only talks),
  ``image_config.aspect_ratio`` / ``image_size``. Answers one choice whose ``message.images`` holds one
  ``image_url`` data URL of a PNG drawn at the size Gemini uses for the ratio (an edit without a ratio keeps
  the first input's size), with ``usage`` (prompt, completion and total tokens, ``cost`` in credits).
* Errors use OpenRouter's body ``{"error": {"code", "message", "metadata"}}`` with the HTTP status of
  ``code``: no or a wrong key 401, unknown model or bad parameter 400.

Failures scripted with ``fail_next(kind)``: ``auth`` (401), ``credits`` (402), ``moderation`` (403 with the
flagged reasons in ``metadata``), ``rate_limit`` (429, ``Retry-After`` when given), ``server_error`` (500),
``provider_error`` (502 naming the provider), ``safety`` (200 with ``finish_reason: content_filter`` and no
images), ``error_in_body`` (200 carrying an ``error`` object, as when the model fails after starting) and
``no_image`` (the model answers in words only).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.fakes.gemini import GEMINI_SIZES
from tests.fakes.recording import Failure, RecordingServer, image_dimensions, png

API_KEY = "sk-or-v1-fake-0123456789abcdef"
MODELS = {"google/gemini-2.5-flash-image": "Google", "google/gemini-3-pro-image-preview": "Google",
          "openai/gpt-5-image": "OpenAI"}
REQUEST_FIELDS = frozenset({"model", "messages", "modalities", "image_config", "seed", "user", "stream",
                            "max_tokens", "temperature", "provider", "usage"})
TEXT_ANSWER = "Here is your image."
PROMPT_TOKENS_PER_IMAGE = 258
COMPLETION_TOKENS = 1290
COST_PER_IMAGE = 0.0387


def openrouter_error(code: int, message: str, metadata: dict[str, Any] | None = None,
                     retry_after: str | None = None, status: int | None = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if metadata is not None:
        error["metadata"] = metadata
    return web.json_response({"error": error}, status=status or code,
                             headers={"Retry-After": retry_after} if retry_after else None)


ERROR_ANSWERS: dict[str, Callable[[Failure], web.Response]] = {
    "auth": lambda failure: openrouter_error(401, "User not found."),
    "credits": lambda failure: openrouter_error(
        402, "Insufficient credits. Add more using https://openrouter.ai/settings/credits"),
    "moderation": lambda failure: openrouter_error(403, "Input was flagged for moderation", {
        "reasons": ["violence", "harassment"], "flagged_input": "...", "provider_name": "OpenAI",
        "model_slug": "openai/gpt-5-image"}),
    "rate_limit": lambda failure: openrouter_error(
        429, failure.message or "Rate limit exceeded: free-models-per-min.",
        {"headers": {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0"}},
        retry_after=failure.retry_after),
    "server_error": lambda failure: openrouter_error(500, failure.message or "Internal Server Error"),
    "provider_error": lambda failure: openrouter_error(502, "Provider returned error", {
        "provider_name": "Google", "raw": '{"error": {"code": 503, "status": "UNAVAILABLE"}}'}),
    "error_in_body": lambda failure: openrouter_error(502, "Provider returned error",
                                                      {"provider_name": "Google"}, status=200),
}


class FakeOpenRouter(RecordingServer):
    """`async with FakeOpenRouter() as fake:` then point a provider at `fake.base_url`."""

    def __init__(self, api_key: str = API_KEY, text: str | None = TEXT_ANSWER) -> None:
        super().__init__()
        self.api_key = api_key
        self.text = text  # the message content next to the image (None: null content)
        self.images: list[bytes] = []  # every image handed out, in order
        self._serial = itertools.count()
        self.app.router.add_post("/api/v1/chat/completions", self.chat_completions)

    @property
    def base_url(self) -> str:
        return f"{self.url}/api/v1"

    async def chat_completions(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return openrouter_error(401, "No auth credentials found")
        if auth.removeprefix("Bearer ") != self.api_key:
            return openrouter_error(401, "User not found.")
        failure = self.take_failure()
        if failure is not None and failure.kind in ERROR_ANSWERS:
            return ERROR_ANSWERS[failure.kind](failure)
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return openrouter_error(400, "Input required: specify \"prompt\" or \"messages\"")
        if set(body) - REQUEST_FIELDS:
            return openrouter_error(400, f"Unrecognized key: {sorted(set(body) - REQUEST_FIELDS)[0]}")
        model = body.get("model")
        if model not in MODELS:
            return openrouter_error(400, f"{model} is not a valid model ID")
        inputs, words = [], 0
        for asked in body["messages"]:
            content = asked.get("content")
            parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if isinstance(content, str) \
                else content or []
            for part in parts:
                if part.get("type") == "text":
                    words += len(str(part.get("text", "")).split())
                elif part.get("type") == "image_url":
                    url = str((part.get("image_url") or {}).get("url", ""))
                    header, _, data = url.partition(",")
                    try:
                        inputs.append(base64.b64decode(data, validate=True))
                    except binascii.Error:
                        return openrouter_error(400, "Invalid image_url: expected a data URL or https URL")
                    if not header.startswith("data:image/") or not header.endswith(";base64"):
                        return openrouter_error(400, "Invalid image_url: expected a data URL or https URL")
                else:
                    return openrouter_error(400, f"Invalid content part type: {part.get('type')}")
        image_config = body.get("image_config") or {}
        ratio = image_config.get("aspect_ratio")
        if ratio is not None and ratio not in GEMINI_SIZES:
            return openrouter_error(400, f"Invalid aspect_ratio: {ratio}")
        kind = failure.kind if failure is not None else None
        draws = "image" in (body.get("modalities") or ["text"]) and kind not in ("safety", "no_image")
        answer: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None, "reasoning": None}
        if kind == "no_image":
            answer["content"] = "I'm not able to create that image."
        elif kind is None:
            answer["content"] = self.text if draws else "Sure, but I can only answer in text."
        completion = 0
        if draws:
            if ratio is not None:
                width, height = GEMINI_SIZES[ratio]
            else:
                width, height = image_dimensions(inputs[0]) if inputs else (1024, 1024)
            image = png(width, height, f"{model}|{ratio}|{next(self._serial)}")
            self.images.append(image)
            url = f"data:image/png;base64,{base64.b64encode(image).decode()}"
            answer["images"] = [{"type": "image_url", "image_url": {"url": url}, "index": 0}]
            completion = COMPLETION_TOKENS
        prompt = words + PROMPT_TOKENS_PER_IMAGE * len(inputs)
        finish, native = ("content_filter", "IMAGE_SAFETY") if kind == "safety" else ("stop", "STOP")
        return web.json_response({
            "id": f"gen-{int(time.time())}-{next(self._serial)}",
            "provider": MODELS[model],
            "model": model,
            "object": "chat.completion",
            "created": int(time.time()),
            "choices": [{"logprobs": None, "finish_reason": finish, "native_finish_reason": native,
                         "index": 0, "message": answer}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion, "cost": COST_PER_IMAGE if draws else 0.0001,
                      "is_byok": False, "prompt_tokens_details": {"cached_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0, "image_tokens": completion}},
        })
