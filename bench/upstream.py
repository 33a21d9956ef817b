"""A fake OpenAI images upstream that answers at once with a fixed body: the far end of every direct baseline.

It speaks OpenAI's `POST /v1/images/generations` (JSON in, `{"created", "data": [{"b64_json"}], ...}` out, or
with `"stream": true` server-sent events: `partial_images` `image_generation.partial_image` events, then
`image_generation.completed`, per image), so the gateway reaches it through its real OpenAI adapter. Three
mounts of the same endpoint:

- `/v1/...`        answers at once with a small PNG per image (a 2048x2048 one when asked for that size);
- `/slow/v1/...`   waits `SLOW_SECONDS` first, the stand-in for a real generation;
- `POST /v1/images/edits`  the multipart edit (fields, an `image` or `image[]` file): the same answer;
- `GET /stats`     how many generations each mount served, so the bench can prove every gateway request
                   reached the upstream (no cached answer is ever measured).

Run as `python -m bench.upstream PORT`; prints "ready" once listening.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import sys
from collections.abc import Awaitable, Callable
from functools import cache

from aiohttp import web
from PIL import Image

SLOW_SECONDS = 0.5
LARGE_SIZE = "2048x2048"


@cache
def small_png() -> bytes:
    """A 64x64 PNG (a few hundred bytes): 'a fixed small PNG'."""
    image = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@cache
def noise_png(side: int) -> bytes:
    """A side x side PNG of smooth noise: about what a detailed picture of that size weighs (2048: ~4 MB)."""
    rng = random.Random(side)
    noise = Image.frombytes("RGB", (64, 64), rng.randbytes(64 * 64 * 3))
    out = io.BytesIO()
    noise.resize((side, side), Image.Resampling.BICUBIC).save(out, "PNG")
    return out.getvalue()


def large_png() -> bytes:
    return noise_png(2048)


CREATED = 1_700_000_000
USAGE = {"input_tokens": 10, "output_tokens": 100, "total_tokens": 110,
         "input_tokens_details": {"text_tokens": 10, "image_tokens": 0}}


def _b64(size: str) -> str:
    return base64.b64encode(large_png() if size == LARGE_SIZE else small_png()).decode()


@cache
def answer(n: int, size: str) -> bytes:
    """The response body for `n` images of `size`, encoded once: the upstream itself costs next to nothing."""
    return json.dumps({
        "created": CREATED,
        "data": [{"b64_json": _b64(size)} for _ in range(n)],
        "background": "opaque",
        "output_format": "png",
        "size": size,
        "quality": "high",
        "usage": USAGE,
    }).encode()


@cache
def stream_events(n: int, size: str, partials: int) -> tuple[bytes, ...]:
    """The events of a streamed answer, encoded once: per image, `partials` partial images (the same picture)
    then its completed event."""
    common = {"b64_json": _b64(size), "created_at": CREATED, "size": size, "quality": "high",
              "background": "opaque", "output_format": "png"}
    events = []
    for _ in range(n):
        for index in range(partials):
            events.append(("image_generation.partial_image", {**common, "partial_image_index": index}))
        events.append(("image_generation.completed", {**common, "usage": USAGE}))
    return tuple(f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()
                 for name, data in events)


CALLS = web.AppKey("calls", dict[str, int])


def generations(mount: str, delay: float) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not isinstance(body, dict) or not body.get("prompt") or not body.get("model"):
            error = {"message": "prompt and model are required", "type": "invalid_request_error",
                     "param": None, "code": None}
            return web.json_response({"error": error}, status=400)
        if delay:
            await asyncio.sleep(delay)
        calls = request.app[CALLS]
        calls[mount] = calls.get(mount, 0) + 1
        n, size = int(body.get("n") or 1), str(body.get("size") or "1024x1024")
        if body.get("stream") is True:
            return await stream(request, stream_events(n, size, int(body.get("partial_images") or 0)))
        return web.Response(body=answer(n, size), content_type="application/json")

    return handler


async def stream(request: web.Request, events: tuple[bytes, ...]) -> web.StreamResponse:
    """Each event written as it would be produced: one chunk each."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for event in events:
        await response.write(event)
    await response.write_eof()
    return response


async def edits(request: web.Request) -> web.Response:
    form = await request.post()
    image = form.get("image") or form.get("image[]")
    if not form.get("prompt") or not form.get("model") or not isinstance(image, web.FileField):
        error = {"message": "prompt, model and an image file are required", "type": "invalid_request_error",
                 "param": None, "code": None}
        return web.json_response({"error": error}, status=400)
    calls = request.app[CALLS]
    calls["edit"] = calls.get("edit", 0) + 1
    return web.Response(body=answer(int(str(form.get("n") or 1)), str(form.get("size") or "1024x1024")),
                        content_type="application/json")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[CALLS])


def create_upstream() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[CALLS] = {}
    app.router.add_post("/v1/images/generations", generations("fast", 0.0))
    app.router.add_post("/slow/v1/images/generations", generations("slow", SLOW_SECONDS))
    app.router.add_post("/v1/images/edits", edits)
    app.router.add_get("/stats", stats)
    return app


async def serve(port: int) -> None:
    runner = web.AppRunner(create_upstream(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    answer(1, "1024x1024")  # the large answer is built by the bench's probe request, before it measures
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
