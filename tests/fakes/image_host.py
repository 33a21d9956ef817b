"""A web server hosting input images for URL edits, recording every TCP connection it accepts (even one that
never sends a request), so tests can prove the gateway did not connect at all."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    stall: bool = False  # accept the request, never answer
    declare_length: bool = True  # False: no Content-Length, the body ends when the connection closes


class ImageHost:
    """Raw asyncio HTTP/1.1 on 127.0.0.1: `routes[path]` answers, `connections` counts accepts, `requests`
    holds (request line, headers) of every request."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            line = (await reader.readline()).decode().strip()
            headers = {}
            while (header := (await reader.readline()).decode().strip()):
                name, _, value = header.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.requests.append((line, headers))
            path = line.split(" ")[1] if line.count(" ") >= 2 else "/"
            route = self.routes.get(path, Route(status=404, body=b"not found"))
            if route.stall:
                await asyncio.sleep(3600)
            head = {"Connection": "close", **route.headers}
            if route.declare_length:
                head["Content-Length"] = str(len(route.body))
            writer.write(f"HTTP/1.1 {route.status} X\r\n".encode()
                         + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode() + b"\r\n" + route.body)
            await writer.drain()
        except ConnectionError:
            pass  # the gateway gave up on us: exactly what some tests provoke
        finally:
            self._handlers.discard(task)
            writer.close()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):  # stalled ones included
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
