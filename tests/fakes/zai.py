"""A fake Zhipu / Z.ai CogView image generation API, speaking the wire protocol of Z.ai's "Generate Image"
reference and its business error codes:

* ``POST /api/paas/v4/images/generations`` with ``Authorization: Bearer <key>`` and a JSON body: ``model``
  (cogview-4-250304, cogview-4, cogview-3-flash), ``prompt``, ``size`` (the recommended sizes or custom ones
  with 512-2048 px edges divisible by 16 and at most 2^21 pixels), ``quality`` (hd | standard, only for
  cogview-4-250304), ``user_id`` (6-128 characters).
* Answers ``{"created", "data": [{"url"}], "content_filter": [{"role", "level"}]}`` with one image per call;
  the link points at ``GET /files/...`` on this server (no auth).
* Errors use Zhipu's body ``{"error": {"code": "1301", "message"}}`` under the HTTP status of that code.

Pictures are the requested size in one colour drawn from prompt and call number; ``fail(code)`` scripts
whole-call failures.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from aiohttp import web

from tests.fakes.images_api import FakeImagesAPI, color_for, png

API_KEY = "0123456789abcdef0123456789abcdef.FakeZhipuSecret42"
MODELS = ("cogview-4-250304", "cogview-4", "cogview-3-flash")  # only the first takes `quality`

# Zhipu's HTTP status and message for each business code a test may script
ERRORS: dict[str, tuple[int, str]] = {
    "1002": (401, "Invalid Authentication Token, please confirm the correct transmission of the "
                  "Authentication Token."),
    "1113": (429, "Your account is in arrears, please recharge and try again."),
    "1211": (400, "Model does not exist, please check the model code."),
    "1214": (400, "Invalid {field} parameter. Please check the documentation."),
    "1301": (400, "System detected potentially unsafe or sensitive content in input or generation. Please "
                  "avoid using prompts that may generate sensitive content. Thank you for your cooperation."),
    "1302": (429, "High concurrency usage of this API, please reduce concurrency or contact customer "
                  "service to increase limits."),
    "500": (500, "Internal Error"),
}


def zhipu_error(code: str, field: str = "") -> tuple[int, dict[str, Any]]:
    status, message = ERRORS[code]
    return status, {"error": {"code": code, "message": message.replace("{field}", field)}}


def size_ok(size: str) -> bool:
    width, sep, height = size.partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        return False
    w, h = int(width), int(height)
    return 512 <= w <= 2048 and 512 <= h <= 2048 and w % 16 == 0 and h % 16 == 0 and w * h <= 2**21


def invalid_field(body: dict[str, Any]) -> str | None:
    """The first field CogView would refuse, None when the body is fine."""
    if body.get("model") not in MODELS:
        return "model"
    if not body.get("prompt"):
        return "prompt"
    if not size_ok(str(body.get("size", "1024x1024"))):
        return "size"
    if "quality" in body and (body["model"] != MODELS[0] or body["quality"] not in ("hd", "standard")):
        return "quality"
    if "user_id" in body and not 6 <= len(str(body["user_id"])) <= 128:
        return "user_id"
    return None


class FakeZai(FakeImagesAPI):
    """Point a zai provider's `base_url` at `fake.url`."""

    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self._calls = itertools.count()
        super().__init__()

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/api/paas/v4/images/generations", self.generations)
        router.add_get("/files/{name}", self.file)

    def fail(self, code: str, *, times: int = 1, retry_after: str | None = None) -> None:
        status, body = zhipu_error(code)
        self.fail_with(status, body, times=times, retry_after=retry_after)

    async def generations(self, request: web.Request) -> web.Response:
        call = await self.record(request)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            status, error = zhipu_error("1002")
            return web.json_response(error, status=status)
        scripted = self.scripted()
        if scripted is not None:
            return scripted
        body = call.json if isinstance(call.json, dict) else {}
        problem = invalid_field(body)
        if problem is not None:
            status, error = zhipu_error("1211" if problem == "model" else "1214", problem)
            return web.json_response(error, status=status)
        width, height = (int(v) for v in str(body.get("size", "1024x1024")).split("x"))
        picture = png((width, height), color_for(body["prompt"], next(self._calls)))
        return web.json_response({"created": int(time.time()),
                                  "data": [{"url": self.publish(picture, "cogview")}],
                                  "content_filter": [{"role": "assistant", "level": 3}]})
