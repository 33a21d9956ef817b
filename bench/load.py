"""The load generator: a separate process, driven by JSON commands on stdin, one JSON answer per line.

It holds what a load test needs between commands (open Socket.IO and WebSocket subscribers) and does the
timing itself, so the process running the gateway never measures its own work. HTTP goes through a
minimal keep-alive HTTP/1.1 client on asyncio streams: much cheaper per request than a full client, so on a
small machine the generator takes as little CPU as possible from the servers it measures. Bodies are JSON, or
multipart forms for edits; a chunked answer (an event stream) is also timed to its first chunk.

Commands (`op`): `closed` (fixed concurrency), `open` (fixed rate, latency from the scheduled send time),
`subscribe` / `publish` / `journal` / `unsubscribe` (progress subscribers), `quit`.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bench.subscribers import SubscriberPool

REQUEST_TIMEOUT = 120.0  # a request taking longer is an error, not a hang
BOUNDARY = "imagegw-bench-form"


@dataclass(frozen=True)
class Target:
    """One request, encoded once, and what a correct answer looks like."""

    host: str
    port: int
    raw: bytes
    status: int = 200
    contains: bytes = b""  # must appear in the first KiB of the body
    ends: bytes = b""  # must appear in its last KiB (an event stream's last event)
    min_length: int = 0

    @classmethod
    def from_command(cls, spec: dict[str, Any]) -> Target:
        url = urlsplit(spec["url"])
        assert url.hostname and url.port
        body, content_type = encode_body(spec["body"], spec.get("files"))
        headers = {"Host": f"{url.hostname}:{url.port}", "Content-Type": content_type,
                   "Content-Length": str(len(body)), **spec.get("headers", {})}
        head = f"POST {url.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        return cls(url.hostname, url.port, head.encode() + body, spec.get("status", 200),
                   spec.get("contains", "").encode(), spec.get("ends", "").encode(), spec.get("min_length", 0))

    def check(self, status: int, body: bytes) -> str | None:
        if status != self.status:
            return f"status {status}: {body[:200]!r}"
        if self.contains not in body[:1024] or self.ends not in body[-1024:] or len(body) < self.min_length:
            return f"unexpected body ({len(body)} bytes): {body[:200]!r} ... {body[-200:]!r}"
        return None


def encode_body(fields: dict[str, Any], files: dict[str, str] | None) -> tuple[bytes, str]:
    """JSON; or with `files` (name: base64 of a PNG) a multipart form of the fields and files, as the SDK
    sends an edit."""
    if files is None:
        return json.dumps(fields).encode(), "application/json"
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts += [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
              f"Content-Type: image/png\r\n\r\n".encode() + base64.b64decode(data) + b"\r\n"
              for name, data in files.items()]
    return b"".join([*parts, f"--{BOUNDARY}--\r\n".encode()]), f"multipart/form-data; boundary={BOUNDARY}"


@dataclass
class Answer:
    status: int
    body: bytes
    first_chunk: float | None  # when the first chunk of a chunked body arrived (perf_counter)


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closed it."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.target.host, self.target.port,
                                                                 limit=1 << 20)

    async def request(self) -> Answer:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await self._request()
        except TimeoutError:
            self.close()
            raise

    async def _request(self) -> Answer:
        if self.writer is None or self.writer.is_closing():
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.target.raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked, close = 0, False, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        first = None
        if chunked:
            body, first = await self._chunked()
        else:
            body = await self.reader.readexactly(length)
        if close:
            self.close()
        return Answer(status, body, first)

    async def _chunked(self) -> tuple[bytes, float]:
        """The body, and when its first chunk arrived."""
        assert self.reader is not None
        parts = []
        first = 0.0
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            first = first or time.perf_counter()
            parts.append(await self.reader.readexactly(size + 2))
            if size == 0:
                return b"".join(p[:-2] for p in parts), first

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)  # seconds
    firsts: list[float] = field(default_factory=list)  # seconds to the first chunk, for chunked answers
    errors: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # kept only when asked for (job ids of async submits)
    elapsed: float = 0.0

    def record(self, target: Target, answer: Answer, started: float, ended: float, keep: bool) -> None:
        problem = target.check(answer.status, answer.body)
        if problem is None:
            self.latencies.append(ended - started)
            if answer.first_chunk is not None:
                self.firsts.append(answer.first_chunk - started)
            if keep:
                self.bodies.append(answer.body)
        else:
            self.errors.append(problem)

    def to_json(self) -> dict[str, Any]:
        return {"latencies": self.latencies, "firsts": self.firsts, "errors": len(self.errors),
                "first_errors": self.errors[:3], "elapsed": self.elapsed,
                "bodies": [b.decode() for b in self.bodies]}


async def closed_loop(target: Target, concurrency: int, count: int, keep: bool = False, pause: float = 0.0
                      ) -> Outcome:
    """`count` requests from `concurrency` clients, each sending its next request when the last one ended
    (`pause` seconds later: lets the server go idle between requests)."""
    outcome = Outcome()
    remaining = count

    async def client() -> None:
        nonlocal remaining
        conn = Connection(target)
        try:
            while remaining > 0:
                remaining -= 1
                if pause:
                    await asyncio.sleep(pause)
                started = time.perf_counter()
                try:
                    answer = await conn.request()
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    conn.close()
                    outcome.errors.append(repr(exc))
                    continue
                outcome.record(target, answer, started, time.perf_counter(), keep)
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    outcome.elapsed = time.perf_counter() - started
    return outcome


async def open_loop(target: Target, rate: float, duration: float, connections: int) -> Outcome:
    """Requests sent at a fixed rate whatever the answers do; latency counts from the scheduled send time,
    so a stalled server is charged for the requests it delayed (no coordinated omission)."""
    outcome = Outcome()
    idle = [Connection(target) for _ in range(connections)]
    for conn in idle:
        await conn.open()
    start = time.perf_counter() + 0.05
    total = int(rate * duration)

    async def one(i: int) -> None:
        scheduled = start + i / rate
        await asyncio.sleep(scheduled - time.perf_counter())
        conn = idle.pop() if idle else Connection(target)
        try:
            answer = await conn.request()
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            conn.close()
            outcome.errors.append(repr(exc))
            return
        outcome.record(target, answer, scheduled, time.perf_counter(), False)
        idle.append(conn)

    await asyncio.gather(*(one(i) for i in range(total)))
    outcome.elapsed = time.perf_counter() - start
    for conn in idle:
        conn.close()
    return outcome


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)  # a command may list every event of a run
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pools = {"sio": SubscriberPool(), "plain": SubscriberPool()}
    try:
        while line := await reader.readline():
            command = json.loads(line)
            op = command.pop("op")
            if op == "quit":
                break
            # what the generator holds between commands (open subscribers, connections) out of its collections:
            # a full one over them mid-run (20-40 ms) would count as the measured side's latency
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            result = await run_command(op, command, pools)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()
    finally:
        for pool in pools.values():
            await pool.close()


async def run_command(op: str, command: dict[str, Any], pools: dict[str, SubscriberPool]) -> dict[str, Any]:
    if op == "closed":
        outcome = await closed_loop(Target.from_command(command["target"]), command["concurrency"],
                                    command["count"], command.get("keep", False), command.get("pause", 0.0))
        return outcome.to_json()
    if op == "open":
        outcome = await open_loop(Target.from_command(command["target"]), command["rate"], command["duration"],
                                  command.get("connections", 32))
        return outcome.to_json()
    result: dict[str, Any] = await pools[command["kind"]].command(op, command)
    return result


if __name__ == "__main__":
    asyncio.run(serve())
