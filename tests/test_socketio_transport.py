"""The Socket.IO transport under /image-progress: polling, the upgrade to WebSocket, and a subscriber that stops
reading while events keep coming."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from typing import Any

import aiohttp
import pytest
import socketio

from service.constants import EVENT_PARTIAL_IMAGE, EVENT_PROGRESS, PROGRESS_NAMESPACE
from service.progress import JobEventManager, ProgressPublisher
from service.state import HUB, SIO
from tests.conftest import GatewayFactory
from tests.test_jobs import Subscriber, assert_monotonic_then_completed, keyed_config, submit

NS = PROGRESS_NAMESPACE


@pytest.mark.parametrize("transports", [None, ["polling"]], ids=["polling-then-websocket", "polling-only"])
async def test_official_client_on_polling_and_after_the_upgrade(gateway_factory: GatewayFactory,
                                                                http: aiohttp.ClientSession,
                                                                transports: list[str] | None) -> None:
    gw = await gateway_factory(config=keyed_config())
    sub = Subscriber(gw.url, "sk-alice")
    await sub.client.connect(gw.url, namespaces=[NS], auth={"api_key": "sk-alice"}, transports=transports)
    try:
        job = await submit(http, gw)
        assert (await sub.subscribe(job["id"]))["job_id"] == job["id"]
        events = await sub.wait(job["id"])
        assert_monotonic_then_completed(events)
        assert sub.client.transport() == (transports or ["websocket"])[-1]
    finally:
        await sub.client.disconnect()


class RawSubscriber:
    """Engine.IO v4 / Socket.IO v5 over one WebSocket, reading only when asked to."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, url: str, key: str, job_id: str, compress: int = 0
                      ) -> RawSubscriber:
        sub = cls(await http.ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket", compress=compress))
        assert sub.ws.compress == compress  # the server agreed to what was asked (permessage-deflate or not)
        assert (await sub.ws.receive_str()).startswith("0{")
        await sub.ws.send_str(f"40{NS},{json.dumps({'api_key': key})}")
        assert (await sub.ws.receive_str()).startswith(f"40{NS},")
        await sub.ws.send_str(f"42{NS},1{json.dumps(['subscribe', {'job_id': job_id}])}")
        while not (await sub.ws.receive_str()).startswith(f"43{NS},1"):
            pass  # the snapshot comes before the acknowledgement
        return sub

    async def events(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        received = []
        while len(received) < count:
            text = await self.ws.receive_str(timeout=10)
            if text.startswith(f"42{NS},"):
                received.append(tuple(json.loads(text[len(NS) + 3:])))
        return received


@pytest.mark.parametrize("compress", [0, 15], ids=["plain", "permessage-deflate"])
async def test_a_subscriber_that_stops_reading_holds_up_nobody(gateway_factory: GatewayFactory, redis_url: str,
                                                               http: aiohttp.ClientSession, compress: int) -> None:
    gw = await gateway_factory(config=keyed_config(), redis_url=redis_url)  # no worker: the job stays queued
    hub = gw.app[HUB]
    job_id = (await submit(http, gw))["id"]
    stalled = await RawSubscriber.connect(http, gw.url, "sk-alice", job_id, compress)
    reading = await RawSubscriber.connect(http, gw.url, "sk-alice", job_id, compress)
    image = base64.b64encode(os.urandom(288 * 1024)).decode()  # 384 KiB that deflate cannot shrink much
    rounds = 64  # 24 MiB for a client that reads nothing: more than the socket buffers hold

    started = time.monotonic()
    for i in range(rounds):
        await hub.deliver(job_id, EVENT_PARTIAL_IMAGE, {"job_id": job_id, "partial_image_index": i,
                                                        "b64_json": image})
        await hub.deliver(job_id, EVENT_PROGRESS, {"job_id": job_id, "progress": i, "status": "running",
                                                   "stage": f"step {i}"})
        assert [data["progress"] for _, data in await reading.events(2) if "progress" in data] == [i]
    assert time.monotonic() - started < 10
    behind = [s for s in gw.app[SIO].eio.sockets.values() if s.drainer is not None]
    assert len(behind) == 1  # the stalled client did fall behind: its packets wait in its own backlog

    # the stalled client gets everything, in order, once it reads again
    events = await stalled.events(2 * rounds)
    assert [data.get("partial_image_index", data.get("progress")) for _, data in events] == [
        i for i in range(rounds) for _ in range(2)]
    assert [name for name, _ in events] == [EVENT_PARTIAL_IMAGE, EVENT_PROGRESS] * rounds
    assert all(data["b64_json"] == image for name, data in events if name == EVENT_PARTIAL_IMAGE)
    await stalled.ws.close()
    await reading.ws.close()
    for _ in range(100):  # and both are forgotten once gone
        if not gw.app[SIO].eio.sockets and hub.subscriber_count == 0:
            break
        await asyncio.sleep(0.02)
    assert not gw.app[SIO].eio.sockets and hub.subscriber_count == 0


async def test_pings_keep_a_live_client_and_drop_a_silent_one(gateway_factory: GatewayFactory, redis_url: str,
                                                              http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=keyed_config(), redis_url=redis_url)
    engine = gw.app[SIO].eio
    engine.ping_interval, engine.ping_timeout = 0.1, 0.2  # read at each connection and each ping
    job_id = (await submit(http, gw))["id"]
    live = Subscriber(gw.url, "sk-alice")  # the official client answers pings
    await live.connect()
    silent = await RawSubscriber.connect(http, gw.url, "sk-alice", job_id)  # reads nothing, answers nothing
    try:
        await live.subscribe(job_id)
        hub = gw.app[HUB]
        assert hub.subscriber_count == 2
        await asyncio.sleep(1.0)  # ten ping intervals
        assert hub.subscriber_count == 1 and live.client.connected
        await hub.deliver(job_id, EVENT_PROGRESS, {"job_id": job_id, "progress": 7, "status": "running",
                                                   "stage": "still here"})
        await asyncio.sleep(0.1)
        assert live.events[job_id][-1][1]["stage"] == "still here"
    finally:
        await live.client.disconnect()
        await silent.ws.close()


async def test_the_redis_listener_skips_only_this_processes_own_emits(monkeypatch: pytest.MonkeyPatch) -> None:
    own = JobEventManager(lambda: None, write_only=True)  # type: ignore[arg-type,return-value]
    other = JobEventManager(lambda: None, write_only=True)  # type: ignore[arg-type,return-value]
    publisher = ProgressPublisher(own)
    messages = [own.json.dumps(publisher.message(EVENT_PROGRESS, "j", {"progress": 5})),
                other.json.dumps(ProgressPublisher(other).message(EVENT_PROGRESS, "j", {"progress": 6})),
                own.json.dumps({"method": "callback", "host_id": own.host_id, "sid": "s", "id": 1, "args": []})]

    async def published(self: Any) -> Any:
        for message in messages:
            yield message.encode()

    monkeypatch.setattr(socketio.AsyncRedisManager, "_listen", published)
    heard = [json.loads(data) async for data in own._listen()]
    assert [m["host_id"] for m in heard] == [other.host_id, own.host_id]
    assert [m["method"] for m in heard] == ["emit", "callback"]  # a callback for this host still arrives
