"""What the Gemini and OpenRouter fakes and their tests share: a real aiohttp server on 127.0.0.1 (port 0), a
record of every call, failures scripted for the next calls, real PNGs drawn with Pillow, and a progress
reporter that remembers what a provider told it."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from PIL import Image

from tests.fakes.server import LoopbackServer

# what aiohttp's client sends on its own besides the headers an adapter sets
TRANSPORT_HEADERS = frozenset({"host", "accept", "accept-encoding", "user-agent", "content-length"})


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    json: Any


@dataclass
class Failure:
    """What one upcoming call gets instead of its answer: a `kind` the fake knows, plus optional details."""

    kind: str
    retry_after: str | None = None
    message: str | None = None


class RecordingServer(LoopbackServer):
    """Subclasses add their routes to `app`; `async with` starts the server on a free port and stops it."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.failures: deque[Failure] = deque()
        self.delay = 0.0  # seconds every answer waits, to provoke timeouts
        super().__init__(web.Application(middlewares=[self._record]))

    def fail_next(self, kind: str, times: int = 1, *, retry_after: str | None = None,
                  message: str | None = None) -> None:
        self.failures.extend(Failure(kind, retry_after, message) for _ in range(times))

    def take_failure(self) -> Failure | None:
        return self.failures.popleft() if self.failures else None

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        self.calls.append(Call(method=request.method, path=request.path, query=dict(request.query),
                               headers={k.lower(): v for k, v in request.headers.items()}, json=body))
        if self.delay:
            await asyncio.sleep(self.delay)
        return await handler(request)



def png(width: int, height: int, seed: str) -> bytes:
    """A real PNG of that size, its colour drawn from `seed` so different requests give different pictures."""
    r, g, b = hashlib.sha256(seed.encode()).digest()[:3]
    out = io.BytesIO()
    Image.new("RGB", (width, height), (r, g, b)).save(out, "PNG", compress_level=1)
    return out.getvalue()


def image_dimensions(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.width, image.height


class RecordingProgress:
    """A `ProgressReporter` that remembers what it was told."""

    def __init__(self) -> None:
        self.updates: list[tuple[float, str]] = []
        self.partials: list[tuple[bytes, str]] = []

    async def update(self, fraction: float, stage: str) -> None:
        self.updates.append((fraction, stage))

    async def partial_image(self, image: bytes, fmt: str) -> None:
        self.partials.append((image, fmt))
