"""Progress subscribers for the load process: Socket.IO clients of the gateway and plain WebSocket clients of
the baseline server, plus the publishers that feed each side through Redis.

The Socket.IO client is the Engine.IO v4 / Socket.IO v5 wire protocol spoken directly over one aiohttp
WebSocket (no polling upgrade): a thousand python-socketio clients would cost the load process more CPU than
the server it measures. Every event the publishers here send carries its send time (`time.monotonic()`, one
clock for every process on the machine) in its `stage` text, so latency is receive time minus send time. Events
of real jobs (the gateway's workers publish them) are kept in a journal with their receive time instead, for the
bench to match against what caused them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
from arq.connections import ArqRedis

from service.constants import EVENT_PROGRESS, JOB_ROOM, PROGRESS_NAMESPACE, TERMINAL_EVENTS
from service.progress import JobEventManager

PLAIN_CHANNEL = "bench:plain"
STAGE_PREFIX = "bench "
NS = PROGRESS_NAMESPACE

Deliver = Callable[[str, dict[str, Any]], None]


class SocketIOSubscriber:
    """One `/image-progress` connection subscribed to one job."""

    def __init__(self, deliver: Deliver) -> None:
        self.deliver = deliver
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.replies: asyncio.Queue[str] = asyncio.Queue()

    async def connect(self, session: aiohttp.ClientSession, base_url: str, api_key: str, job_id: str) -> None:
        self.ws = await session.ws_connect(f"{base_url}/socket.io/?EIO=4&transport=websocket")
        self.reader = asyncio.create_task(self._read())
        opened = await self._reply()
        assert opened.startswith("0{"), opened
        await self.ws.send_str(f"40{NS},{json.dumps({'api_key': api_key})}")
        connected = await self._reply()
        assert connected.startswith(f"40{NS},"), connected
        await self.ws.send_str(f"42{NS},1{json.dumps(['subscribe', {'job_id': job_id}])}")
        ack = await self._reply()
        assert ack.startswith(f"43{NS},1") and '"error"' not in ack, ack

    async def _reply(self) -> str:
        return await asyncio.wait_for(self.replies.get(), 10)

    async def _read(self) -> None:
        assert self.ws is not None
        event_prefix = f"42{NS},"
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data: str = msg.data
            if data == "2":
                await self.ws.send_str("3")  # Engine.IO heartbeat
            elif data.startswith(event_prefix):
                event, payload = json.loads(data[len(event_prefix):])
                self.deliver(event, payload)
            else:
                self.replies.put_nowait(data)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await self.reader


class PlainSubscriber:
    """One connection to the baseline WebSocket server, for one job."""

    def __init__(self, deliver: Deliver) -> None:
        self.deliver = deliver
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None

    async def connect(self, session: aiohttp.ClientSession, base_url: str, api_key: str, job_id: str) -> None:
        self.ws = await session.ws_connect(f"{base_url}/ws/{job_id}")
        ready = await self.ws.receive_str(timeout=10)  # sent once the server holds the connection
        assert ready == "ok", ready
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                payload = json.loads(msg.data)
                self.deliver(payload["event"], payload["data"])

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await self.reader


class SubscriberPool:
    """The open subscribers of one kind ("sio" or "plain") and what they have received."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self.subscribers: list[SocketIOSubscriber | PlainSubscriber] = []
        self.per_job: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.received = 0
        self.last_received = 0.0
        self.arrived = asyncio.Event()
        self.journal: list[tuple[str, str, float]] | None = None  # (job id, stage, receive time) of progress
        self.ended = 0  # subscribers that got their job's terminal event, while journaling

    def _deliver(self, event: str, data: dict[str, Any]) -> None:
        if self.journal is not None:  # a real job's events: timed against what caused them by the bench
            if event == EVENT_PROGRESS:
                self.journal.append((data["job_id"], data.get("stage") or "", time.monotonic()))
            elif event in TERMINAL_EVENTS:
                self.ended += 1
                self.arrived.set()
            return
        stage = data.get("stage") or ""
        if event != EVENT_PROGRESS or not stage.startswith(STAGE_PREFIX):
            return  # the snapshot a subscriber gets first
        now = time.monotonic()
        self.latencies.append(now - float(stage.rsplit(" ", 1)[1]))
        self.received += 1
        self.last_received = now
        self.arrived.set()

    async def command(self, op: str, command: dict[str, Any]) -> dict[str, Any]:
        if op == "subscribe":
            return await self.subscribe(command["kind"], command["url"], command["api_key"],
                                        command["job_ids"], command["count"], command.get("journal", False))
        if op == "journal":
            return await self.read_journal(command["within"])
        if op == "publish":
            return await self.publish(command["kind"], command["redis_url"], command["job_ids"],
                                      command["events"], command.get("interval", 0.0), command.get("at"))
        if op == "unsubscribe":
            await self.close()
            return {"closed": True}
        raise ValueError(f"unknown op {op!r}")

    async def subscribe(self, kind: str, url: str, api_key: str, job_ids: list[str], count: int,
                        journal: bool = False) -> dict[str, Any]:
        """`count` subscribers spread evenly over `job_ids`. With `journal`, the events after their first
        view (the job's snapshot, sent before the subscription is acknowledged) go to the journal."""
        await self.close()
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        cls = SocketIOSubscriber if kind == "sio" else PlainSubscriber
        gate = asyncio.Semaphore(32)
        started = time.perf_counter()

        async def one(i: int) -> None:
            sub = cls(self._deliver)
            self.subscribers.append(sub)
            job_id = job_ids[i % len(job_ids)]
            async with gate:
                assert self.session is not None
                await sub.connect(self.session, url, api_key, job_id)
            self.per_job[job_id] += 1

        await asyncio.gather(*(one(i) for i in range(count)))
        if journal:
            self.journal, self.ended = [], 0
        return {"connected": len(self.subscribers), "per_job": self.per_job,
                "seconds": time.perf_counter() - started}

    async def publish(self, kind: str, redis_url: str, job_ids: list[str], events: int, interval: float,
                      at: list[float] | None = None) -> dict[str, Any]:
        """Publish `events` progress events round-robin over `job_ids`, `interval` apart (0: back to back) or
        each at its offset in `at` (seconds from the first), and wait for every delivery the subscribers are
        owed."""
        self.latencies, self.received = [], 0
        expected = sum(self.per_job[job_ids[i % len(job_ids)]] for i in range(events))
        emit = await self._publisher(kind, redis_url)
        started = time.monotonic()
        try:
            for i in range(events):
                if at is not None or interval:
                    await asyncio.sleep(started + (at[i] if at is not None else i * interval) - time.monotonic())
                await emit(job_ids[i % len(job_ids)], f"{STAGE_PREFIX}{i} {time.monotonic()!r}")
            await self._until(lambda: self.received >= expected, 10)
        finally:
            await emit.close()
        return {"latencies": self.latencies, "expected": expected, "received": self.received,
                "elapsed": max(self.last_received - started, 1e-9)}

    async def read_journal(self, within: float) -> dict[str, Any]:
        """The journal, once every subscriber got its job's terminal event (the last one it may get) or
        `within` seconds passed."""
        await self._until(lambda: self.ended >= len(self.subscribers), within)
        journal, self.journal = self.journal or [], None
        return {"events": journal, "ended": self.ended, "subscribers": len(self.subscribers)}

    async def _until(self, done: Callable[[], bool], within: float) -> None:
        """Wait until `done()` holds, looking again at each delivery, or until `within` seconds passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not done() and loop.time() < deadline:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), deadline - loop.time())
            except TimeoutError:
                break

    async def _publisher(self, kind: str, redis_url: str) -> Any:
        if kind == "sio":
            # the manager a worker publishes job events through (write-only), emitting to the jobs' rooms
            manager = JobEventManager(lambda: ArqRedis.from_url(redis_url), write_only=True)

            async def emit_sio(job_id: str, stage: str) -> None:
                data = {"job_id": job_id, "progress": 50, "status": "running", "stage": stage}
                await manager.emit(EVENT_PROGRESS, data, room=JOB_ROOM.format(job_id), namespace=NS)

            emit_sio.close = manager.close  # type: ignore[attr-defined]
            return emit_sio
        redis = ArqRedis.from_url(redis_url)

        async def emit_plain(job_id: str, stage: str) -> None:
            message = {"job_id": job_id, "event": EVENT_PROGRESS,
                       "data": {"job_id": job_id, "progress": 50, "status": "running", "stage": stage}}
            await redis.publish(PLAIN_CHANNEL, json.dumps(message))

        emit_plain.close = redis.aclose  # type: ignore[attr-defined]
        return emit_plain

    async def close(self) -> None:
        await asyncio.gather(*(sub.close() for sub in self.subscribers))
        self.subscribers, self.per_job = [], Counter()
        if self.session is not None:
            await self.session.close()
            self.session = None
