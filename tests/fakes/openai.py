"""A fake OpenAI Images API: an in-process aiohttp server speaking the real wire protocol.

Modelled on the OpenAI API reference (Images: create, create edit, create variation) and the Azure
OpenAI REST reference for deployment URLs:

* ``POST /v1/images/generations`` (JSON), ``/v1/images/edits`` and ``/v1/images/variations`` (multipart,
  ``image`` or repeated ``image[]``, ``mask``), authenticated with ``Authorization: Bearer``.
* ``POST /openai/deployments/{deployment}/images/{generations|edits}?api-version=...`` authenticated with
  ``api-key``, as Azure OpenAI.
* GPT Image models always answer ``b64_json`` with ``usage``, ``size``, ``quality``, ``background`` and
  ``output_format``; they refuse ``response_format`` like the real API. DALL·E models answer ``url`` by
  default (a link to ``GET /files/...`` on this server, no auth, like OpenAI's signed blob links) or
  ``b64_json``, and DALL·E 3 adds a ``revised_prompt``.
* ``"stream": true`` (GPT Image generations and edits; ``"true"`` in a multipart edit) answers
  ``text/event-stream``: for each image ``partial_images`` ``image_generation.partial_image`` (or
  ``image_edit.partial_image``) events, then its ``*.completed`` event with its usage, ``event_delay`` seconds
  apart; ``fail_stream(error)`` ends the next stream with an ``error`` event after its partial images.
  Partial images are kept in ``partials``, each sent event's type and time in ``sent``.
* Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}`` (Azure's own shape for a bad
  key). Failures are scripted for the next calls: ``fail(status)``, ``delay(seconds)``, ``reset()``.

Every request is recorded in ``calls``: method, path, query, headers (lower-case names), JSON body or
multipart fields, and when it arrived.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import json
import socket
import struct
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web
from PIL import Image

from tests.fakes.server import LoopbackServer

API_KEY = "sk-fake-openai-0123456789abcdef"
IMAGE_SIZE = (32, 24)

ERROR_BODIES: dict[int, dict[str, Any]] = {
    400: {"error": {"message": "Your request was rejected as a result of our safety system. Your prompt may "
                               "contain text that is not allowed by our safety system.",
                    "type": "image_generation_user_error", "param": None,
                    "code": "content_policy_violation"}},
    401: {"error": {"message": "Incorrect API key provided: sk-wro***ong. You can find your API key at "
                               "https://platform.openai.com/account/api-keys.",
                    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}},
    403: {"error": {"message": "Project does not have access to model gpt-image-1.",
                    "type": "invalid_request_error", "param": None, "code": "model_not_found"}},
    429: {"error": {"message": "Rate limit reached for gpt-image-1 on images per minute (IPM): Limit 5, "
                               "Used 5, Requested 1. Please try again in 12s.",
                    "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
    500: {"error": {"message": "The server had an error while processing your request. Sorry about that!",
                    "type": "server_error", "param": None, "code": None}},
    503: {"error": {"message": "The engine is currently overloaded, please try again later.",
                    "type": "server_error", "param": None, "code": None}},
}
AZURE_BAD_KEY = {"error": {"code": "401",
                           "message": "Access denied due to invalid subscription key or wrong API endpoint. "
                                      "Make sure to provide a valid key for an active subscription and use a "
                                      "correct regional API endpoint for your resource."}}


@dataclass
class FilePart:
    filename: str | None
    content_type: str
    data: bytes


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: dict[str, Any] | None = None
    form: list[tuple[str, str | FilePart]] | None = None
    at: float = 0.0

    def fields(self) -> dict[str, str]:
        """The text fields of a multipart body."""
        return {name: value for name, value in self.form or [] if isinstance(value, str)}

    def files(self) -> list[tuple[str, FilePart]]:
        return [(name, value) for name, value in self.form or [] if isinstance(value, FilePart)]


@dataclass
class Scripted:
    """What the next call gets instead of a normal answer (`status` with `body`), or before it (`delay`)."""

    status: int | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    reset: bool = False


def _kind(model: str) -> str:
    return model if model in ("dall-e-2", "dall-e-3") else "gpt-image"


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          type_: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": param, "code": code}},
                             status=status)


class FakeOpenAI(LoopbackServer):
    """`async with FakeOpenAI() as fake:`, then point a provider at `fake.base_url` (Azure: `fake.url`)."""

    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self.calls: list[Call] = []
        self.images: list[bytes] = []  # every image handed out, in order
        self.partials: list[bytes] = []  # every partial image streamed, in order
        self.sent: list[tuple[str, float]] = []  # (event type, time) of every streamed event
        self.event_delay = 0.0
        self.stream_errors: deque[dict[str, Any]] = deque()
        self.files: dict[str, bytes] = {}
        self.script: deque[Scripted] = deque()
        self.active = 0  # image requests being answered right now
        self.peak = 0  # the most there ever were at once
        self._counter = itertools.count()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/images/{operation}", self.openai_images)
        app.router.add_post("/openai/deployments/{deployment}/images/{operation}", self.azure_images)
        app.router.add_get("/files/{name}", self.file)
        super().__init__(app)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    # scripting --------------------------------------------------------------------------------------------
    def fail(self, status: int, body: Any = None, *, times: int = 1, headers: dict[str, str] | None = None
             ) -> None:
        """The next `times` calls answer `status` with `body` (default: OpenAI's own body for that status)."""
        for _ in range(times):
            self.script.append(Scripted(status=status, headers=headers or {},
                                        body=body if body is not None else ERROR_BODIES[status]))

    def delay(self, seconds: float, *, times: int = 1) -> None:
        for _ in range(times):
            self.script.append(Scripted(delay=seconds))

    def fail_stream(self, error: dict[str, Any]) -> None:
        """The next stream ends with an `error` event carrying `error` instead of its completed images."""
        self.stream_errors.append(error)

    def reset(self, *, times: int = 1) -> None:
        """The next `times` calls get their connection reset instead of an answer."""
        for _ in range(times):
            self.script.append(Scripted(reset=True))

    @property
    def image_calls(self) -> list[Call]:
        return [c for c in self.calls if c.method == "POST"]

    # handlers ---------------------------------------------------------------------------------------------
    async def _record(self, request: web.Request) -> Call:
        call = Call(method=request.method, path=request.path, query=dict(request.query),
                    headers={k.lower(): v for k, v in request.headers.items()}, at=time.monotonic())
        if request.content_type == "application/json":
            call.json = json.loads(await request.read())
        elif request.content_type == "multipart/form-data":
            call.form = []
            async for part in await request.multipart():
                assert isinstance(part, BodyPartReader)  # the API takes no nested multipart
                data = await part.read()
                if part.filename is None:
                    call.form.append((part.name or "", data.decode()))
                else:
                    upload = FilePart(part.filename, part.headers.get("Content-Type", ""), bytes(data))
                    call.form.append((part.name or "", upload))
        self.calls.append(call)
        return call

    async def _scripted(self, request: web.Request) -> web.StreamResponse | None:
        if not self.script:
            return None
        step = self.script.popleft()
        if step.delay:
            await asyncio.sleep(step.delay)
        if step.reset:
            transport = request.transport
            assert transport is not None
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            transport.abort()
            return web.Response()
        if step.status is not None:
            return web.json_response(step.body, status=step.status, headers=step.headers)
        return None

    async def openai_images(self, request: web.Request) -> web.StreamResponse:
        with self._counted():
            return await self._openai_images(request)

    async def azure_images(self, request: web.Request) -> web.StreamResponse:
        with self._counted():
            return await self._azure_images(request)

    @contextmanager
    def _counted(self) -> Iterator[None]:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            yield
        finally:
            self.active -= 1

    async def _openai_images(self, request: web.Request) -> web.StreamResponse:
        call = await self._record(request)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response(ERROR_BODIES[401], status=401)
        scripted = await self._scripted(request)
        if scripted is not None:
            return scripted
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        return await self._reply(request, str(body.get("model") or "dall-e-2"), body)

    async def _azure_images(self, request: web.Request) -> web.StreamResponse:
        call = await self._record(request)
        if "api-version" not in request.query:
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        if request.headers.get("api-key") != self.api_key:
            return web.json_response(AZURE_BAD_KEY, status=401)
        scripted = await self._scripted(request)
        if scripted is not None:
            return scripted
        body = self._body(call)
        if isinstance(body, web.Response):
            return body
        return await self._reply(request, request.match_info["deployment"], body)

    async def file(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        data = self.files.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404, text="BlobNotFound")
        return web.Response(body=data, content_type="image/png")

    def _body(self, call: Call) -> dict[str, Any] | web.Response:
        if call.json is not None:
            return call.json
        if call.form is not None:
            body: dict[str, Any] = call.fields()
            body["images"] = [f for name, f in call.files() if name in ("image", "image[]")]
            for name in ("n", "partial_images"):
                if name in body:
                    body[name] = int(body[name])
            if "stream" in body:
                body["stream"] = body["stream"] == "true"
            return body
        return error(400, "We could not parse the JSON body of your request.", code="invalid_json")

    async def _reply(self, request: web.Request, model: str, body: dict[str, Any]) -> web.StreamResponse:
        operation = request.match_info["operation"]
        answer = self._answer(operation, model, body)
        if isinstance(answer, web.Response):
            return answer
        if body.get("stream") is True:
            return await self._stream(request, operation, body, answer)
        return web.json_response(answer)

    async def _stream(self, request: web.Request, operation: str, body: dict[str, Any], answer: dict[str, Any]
                      ) -> web.StreamResponse:
        prefix = "image_generation" if operation == "generations" else "image_edit"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        common = {key: answer[key] for key in ("size", "quality", "background", "output_format")}
        error = self.stream_errors.popleft() if self.stream_errors else None
        prompt = str(body.get("prompt", ""))
        for item in answer["data"]:
            for index in range(int(body.get("partial_images") or 0)):
                partial = self._picture(f"{prompt}\0partial{len(self.partials)}", answer["output_format"])
                self.partials.append(partial)
                await self._send(response, f"{prefix}.partial_image", {
                    "b64_json": _b64(partial), "partial_image_index": index, "created_at": answer["created"],
                    **common})
            if error is not None:
                await self._send(response, "error", {"error": error})
                return response
            # each image counts its own tokens; the prompt (and input images) only once
            usage = answer["usage"] if item is answer["data"][0] else {
                **answer["usage"], "input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}
            usage = {**usage, "output_tokens": 272, "total_tokens": usage["input_tokens"] + 272}
            await self._send(response, f"{prefix}.completed", {
                "b64_json": item["b64_json"], "created_at": answer["created"], "usage": usage, **common})
        await response.write_eof()
        return response

    async def _send(self, response: web.StreamResponse, event: str, data: dict[str, Any]) -> None:
        await asyncio.sleep(self.event_delay)
        self.sent.append((event, time.monotonic()))
        payload = json.dumps({"type": event, **data})
        await response.write(f"event: {event}\ndata: {payload}\n\n".encode())

    def _answer(self, operation: str, model: str, body: dict[str, Any]) -> web.Response | dict[str, Any]:
        kind = _kind(model)
        if operation not in ("generations", "edits", "variations"):
            return error(404, f"Invalid URL (POST /v1/images/{operation})")
        if operation == "variations" and kind != "dall-e-2":
            return error(400, "Variations are only supported for dall-e-2.", param="model")
        if operation != "variations" and not body.get("prompt"):
            return error(400, "Missing required parameter: 'prompt'.", param="prompt",
                         code="missing_required_parameter")
        if operation != "generations" and not body.get("images"):
            return error(400, "Missing required parameter: 'image'.", param="image",
                         code="missing_required_parameter")
        if body.get("stream") and (kind != "gpt-image" or operation == "variations"):
            return error(400, "Streaming is not supported for this model.", param="stream",
                         code="unsupported_value")
        if kind == "gpt-image" and "response_format" in body:
            return error(400, "Unknown parameter: 'response_format'.", param="response_format",
                         code="unknown_parameter")
        n = int(body.get("n") or 1)
        if kind == "dall-e-3" and n != 1:
            return error(400, "You must provide n=1 for this model.", param="n")
        fmt = str(body.get("output_format") or "png") if kind == "gpt-image" else "png"
        data = [self._image(str(body.get("prompt", "")), fmt) for _ in range(n)]
        answer: dict[str, Any] = {"created": int(time.time())}
        if kind == "gpt-image":
            answer["data"] = [{"b64_json": _b64(image)} for image in data]
            text_tokens = len(str(body.get("prompt", "")).split())
            image_tokens = 65 * len(body.get("images", []))
            answer.update(background=body.get("background") or "opaque", output_format=fmt,
                          quality=body.get("quality") or "medium", size=body.get("size") or "1024x1024",
                          usage={"input_tokens": text_tokens + image_tokens, "output_tokens": 272 * n,
                                 "total_tokens": text_tokens + image_tokens + 272 * n,
                                 "input_tokens_details": {"image_tokens": image_tokens,
                                                          "text_tokens": text_tokens}})
        else:
            items = []
            for image in data:
                if body.get("response_format", "url") == "b64_json":
                    item = {"b64_json": _b64(image)}
                else:
                    name = f"img-{next(self._counter)}.png"
                    self.files[name] = image
                    item = {"url": f"{self.url}/files/{name}?se=2099-01-01&sig=fake"}
                if kind == "dall-e-3":
                    item["revised_prompt"] = f"A detailed rendering of {body.get('prompt')}"
                items.append(item)
            answer["data"] = items
        return answer

    def _image(self, prompt: str, fmt: str) -> bytes:
        data = self._picture(f"{prompt}\0{len(self.images)}", fmt)
        self.images.append(data)
        return data

    @staticmethod
    def _picture(seed: str, fmt: str) -> bytes:
        digest = hashlib.sha256(seed.encode()).digest()
        image = Image.new("RGB", IMAGE_SIZE, tuple(digest[:3]))
        out = io.BytesIO()
        image.save(out, {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt])
        return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
