"""What the fakes of JSON image APIs share (Volcengine Ark, Zhipu / Z.ai): an in-process aiohttp server on
127.0.0.1, port 0, that records every call, answers the next calls with scripted failures, and serves the
PNGs it draws behind signed-looking links.

A subclass adds its routes in `routes()` and draws pictures with `draw()`. Every request is recorded in
`calls` (method, path, query, headers with lower-case names, JSON body) before anything else happens.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image, ImageDraw

from tests.fakes.server import LoopbackServer


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any = None
    at: float = 0.0


@dataclass
class Failure:
    """An answer given instead of the normal one."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


def png(size: tuple[int, int], color: tuple[int, int, int], mark: bool = False) -> bytes:
    """A real PNG of `size` in one colour, with a white corner block as a visible watermark when `mark`.
    Palette mode keeps even 4096x4096 fast to encode and small."""
    image = Image.new("P", size, 0)
    image.putpalette([*color, 255, 255, 255])
    if mark:
        w, h = size
        ImageDraw.Draw(image).rectangle((w - max(1, w // 8), h - max(1, h // 8), w - 1, h - 1), fill=1)
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def color_for(*parts: object) -> tuple[int, int, int]:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return digest[0], digest[1], digest[2]


class FakeImagesAPI(LoopbackServer):
    """`async with Fake() as fake:` then point a provider at `fake.url`."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.files: dict[str, bytes] = {}
        self.script: deque[Failure] = deque()
        self._counter = itertools.count()
        super().__init__(web.Application(client_max_size=256 * 1024 * 1024))
        self.routes(self.app.router)

    def routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    def fail_with(self, status: int, body: Any, *, times: int = 1, retry_after: str | None = None) -> None:
        """The next `times` authenticated calls answer `status` with `body` instead of images."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self.script.extend(Failure(status, body, headers) for _ in range(times))

    def scripted(self) -> web.Response | None:
        if not self.script:
            return None
        failure = self.script.popleft()
        return web.json_response(failure.body, status=failure.status, headers=failure.headers)

    async def record(self, request: web.Request) -> Call:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        call = Call(method=request.method, path=request.path, query=dict(request.query), headers=headers,
                    json=body, at=time.monotonic())
        self.calls.append(call)
        return call

    @property
    def posts(self) -> list[Call]:
        return [call for call in self.calls if call.method == "POST"]

    @property
    def downloads(self) -> list[Call]:
        return [call for call in self.calls if call.method == "GET"]

    def publish(self, data: bytes, prefix: str) -> str:
        """Keep `data` behind a link like the upstream's object-storage ones (signed query, no auth)."""
        name = f"{prefix}-{next(self._counter)}.png"
        self.files[name] = data
        return f"{self.url}/files/{name}?X-Expires=86400&X-Signature=fake"

    async def file(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        data = self.files.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404, text="NoSuchKey")
        return web.Response(body=data, content_type="image/png")
