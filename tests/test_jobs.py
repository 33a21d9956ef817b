"""Every request is a job: respond-async, the job API, cancellation, sync timeouts, Socket.IO progress."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
import socketio

from service.jobs import JobRecord, StoredImage, StoredResult
from service.lifecycle import Lifecycle
from service.progress import JobEventManager, ProgressPublisher
from service.schemas import ImageSpec
from service.settings import GatewayConfig
from service.state import DISPATCHER, HUB, REDIS_FACTORY, STORAGE, STORE
from service.storage import image_name
from tests.conftest import Gateway, GatewayFactory, local_config
from tests.pictures import png

ASYNC = {"Prefer": "respond-async"}


def keyed_config(slow: bool = True) -> GatewayConfig:
    config = local_config(steps=20, step_delay=0.02) if slow else local_config()
    return config.model_copy(update={"keys": GatewayConfig.model_validate(
        {"keys": [{"name": "alice", "key": "sk-alice"}, {"name": "bob", "key": "sk-bob"}]}).keys})


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def submit(http: aiohttp.ClientSession, gw: Gateway, key: str = "sk-alice", **body: Any) -> dict[str, Any]:
    async with http.post(gw.url + "/v1/images/generations", json={"prompt": "p", "size": "64x64", **body},
                         headers={**ASYNC, **auth(key)}) as resp:
        assert resp.status == 202, await resp.text()
        assert resp.headers["Location"].endswith("/v1/images/jobs/" + (job := await resp.json())["id"])
        return job  # type: ignore[no-any-return]


async def get_job(http: aiohttp.ClientSession, gw: Gateway, job_id: str, key: str = "sk-alice"
                  ) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{gw.url}/v1/images/jobs/{job_id}", headers=auth(key)) as resp:
        return resp.status, await resp.json()


async def wait_terminal(http: aiohttp.ClientSession, gw: Gateway, job_id: str) -> dict[str, Any]:
    for _ in range(500):
        _, job = await get_job(http, gw, job_id)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.02)
    raise AssertionError("job never finished")


async def test_respond_async_then_poll(gateway_factory: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=keyed_config())
    job = await submit(http, gw, n=2)
    assert job["object"] == "image.job" and job["status"] in ("queued", "running") and job.get("result") is None
    done = await wait_terminal(http, gw, job["id"])
    assert done["status"] == "succeeded" and done["progress"] == 100
    assert len(done["result"]["data"]) == 2 and done["result"]["data"][0]["b64_json"]
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]


async def test_auth_required_when_keys_configured(gateway_factory: GatewayFactory,
                                                  http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=keyed_config(slow=False))
    body = {"prompt": "p", "size": "64x64"}
    async with http.post(gw.url + "/v1/images/generations", json=body) as resp:
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "missing_api_key"
    async with http.post(gw.url + "/v1/images/generations", json=body, headers=auth("sk-wrong")) as resp:
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
    async with http.get(gw.url + "/healthz") as resp:
        assert resp.status == 200


async def test_jobs_are_private_to_their_key(gateway_factory: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=keyed_config(slow=False))
    job = await submit(http, gw, response_format="url")
    done = await wait_terminal(http, gw, job["id"])
    status, body = await get_job(http, gw, job["id"], key="sk-bob")
    assert status == 404 and body["error"]["code"] == "job_not_found"
    async with http.delete(f"{gw.url}/v1/images/jobs/{job['id']}", headers=auth("sk-bob")) as resp:
        assert resp.status == 404
    unsigned = done["result"]["data"][0]["url"].split("?")[0]
    async with http.get(unsigned, headers=auth("sk-bob")) as resp:
        assert resp.status == 404
    async with http.get(unsigned, headers=auth("sk-alice")) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"


async def test_cancel_running_and_queued(gateway_factory: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=keyed_config(), worker_concurrency=1)
    running = await submit(http, gw)
    queued = await submit(http, gw)
    for _ in range(100):
        if (await get_job(http, gw, running["id"]))[1]["status"] == "running":
            break
        await asyncio.sleep(0.01)
    for job in (running, queued):
        async with http.delete(f"{gw.url}/v1/images/jobs/{job['id']}", headers=auth("sk-alice")) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["status"] == "cancelled", body
            assert body["error"]["code"] == "job_cancelled"
    async with http.delete(f"{gw.url}/v1/images/jobs/{running['id']}", headers=auth("sk-alice")) as resp:
        assert resp.status == 409
    # the worker is free again and the cancelled jobs never turn into successes
    third = await submit(http, gw)
    assert (await wait_terminal(http, gw, third["id"]))["status"] == "succeeded"
    for job in (running, queued):
        assert (await get_job(http, gw, job["id"]))[1]["status"] == "cancelled"


async def test_sync_wait_timeout_returns_the_job(gateway_factory: GatewayFactory,
                                                 http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=keyed_config(), sync_timeout=0.1)
    async with http.post(gw.url + "/v1/images/generations", json={"prompt": "p", "size": "64x64"},
                         headers=auth("sk-alice")) as resp:
        assert resp.status == 202
        job = await resp.json()
    assert job["status"] in ("queued", "running")
    assert (await wait_terminal(http, gw, job["id"]))["status"] == "succeeded"


class Subscriber:
    """A python-socketio client on /image-progress recording every event per job."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.client = socketio.AsyncClient()
        self.events: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self.finished: dict[str, asyncio.Event] = {}
        for name in ("progress", "completed", "failed", "partial_image"):
            self.client.on(name, self._handler(name), namespace="/image-progress")

    def _handler(self, name: str) -> Any:
        async def handle(data: dict[str, Any]) -> None:
            self.events.setdefault(data["job_id"], []).append((name, data))
            if name in ("completed", "failed"):
                self.finished.setdefault(data["job_id"], asyncio.Event()).set()
        return handle

    async def connect(self) -> None:
        await self.client.connect(self.url, namespaces=["/image-progress"], auth={"api_key": self.key},
                                  transports=["websocket"])

    async def subscribe(self, job_id: str) -> dict[str, Any]:
        self.finished.setdefault(job_id, asyncio.Event())
        ack: dict[str, Any] = await self.client.call("subscribe", {"job_id": job_id}, namespace="/image-progress",
                                                     timeout=10)
        return ack

    async def wait(self, job_id: str, timeout: float = 30) -> list[tuple[str, dict[str, Any]]]:
        await asyncio.wait_for(self.finished[job_id].wait(), timeout)
        await asyncio.sleep(0.05)  # anything arriving after the terminal event would be a bug: catch it
        return self.events[job_id]


def assert_monotonic_then_completed(events: list[tuple[str, dict[str, Any]]]) -> None:
    names = [name for name, _ in events]
    assert names[-1] == "completed" and names.count("completed") == 1 and "failed" not in names
    values = [data["progress"] for name, data in events if name == "progress"]
    assert values == sorted(values), values
    assert all(0 <= v <= 100 for v in values)


async def test_socketio_progress_monotonic_then_completed(gateway_factory: GatewayFactory,
                                                          http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=keyed_config())
    sub = Subscriber(gw.url, "sk-alice")
    await sub.connect()
    try:
        job = await submit(http, gw)
        ack = await sub.subscribe(job["id"])
        assert ack["job_id"] == job["id"]
        events = await sub.wait(job["id"])
        assert_monotonic_then_completed(events)
        assert len([1 for name, _ in events if name == "progress"]) >= 5  # a real progress bar, not 0 then 100
        stages = {data["stage"] for name, data in events if name == "progress"}
        assert any(s.startswith("painting") for s in stages)
        completed = events[-1][1]
        assert completed["status"] == "succeeded" and completed["result"]["data"][0]["b64_json"]

        # a late subscriber gets the current state first: here the terminal event, exactly once
        late = await sub.subscribe(job["id"])
        assert late["status"] == "succeeded"
        await asyncio.sleep(0.1)
        assert [n for n, _ in sub.events[job["id"]]].count("completed") == 2  # one per subscription

        # progress reported after the end (a flush late) is neither stored nor sent
        seen = list(sub.events[job["id"]])
        await gw.app[DISPATCHER].lifecycle.progress(job["id"], 50, "a flush late")
        await asyncio.sleep(0.1)
        assert sub.events[job["id"]] == seen
        record = await gw.app[STORE].get(job["id"])
        assert record is not None and (record.status, record.progress, record.stage) == ("succeeded", 100, "done")
    finally:
        await sub.client.disconnect()


async def test_a_terminal_event_held_up_holds_back_no_other_job(gateway_factory: GatewayFactory,
                                                                http: aiohttp.ClientSession, redis_url: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis mode, events from a worker elsewhere: a completed event's images are read back from storage to
    render it (an object store's round trip, a thread for a large file). Held up there, it must not hold back
    the events of other jobs behind it in the front end's one Redis listener."""
    gw = await gateway_factory(config=keyed_config(), redis_url=redis_url)  # no worker: the test is the worker
    storage = gw.app[STORAGE]
    assert gw.app[HUB].storage is storage  # the hub renders completed events through it
    reading, gate = asyncio.Event(), asyncio.Event()
    read = storage.get

    async def held_read(name: str) -> bytes | None:
        reading.set()
        await gate.wait()
        return await read(name)

    monkeypatch.setattr(storage, "get", held_read)
    manager = JobEventManager(gw.app[REDIS_FACTORY], write_only=True)  # another host: its events come via Redis
    dispatcher = gw.app[DISPATCHER]
    worker = Lifecycle(dispatcher.store, dispatcher.lifecycle.limiter, dispatcher.settlement,
                       ProgressPublisher(manager))
    sub = Subscriber(gw.url, "sk-alice")
    await sub.connect()
    try:
        ending, going_on = (await submit(http, gw))["id"], (await submit(http, gw))["id"]
        started = {}
        for job_id in (ending, going_on):
            await sub.subscribe(job_id)
            record = await gw.app[STORE].get(job_id)
            assert record is not None
            started[job_id] = await worker.start(job_id, record.owner, 60.0)
        name = image_name(ending, 0, "png")
        await storage.put(name, png())
        ended = started[ending]
        assert ended is not None
        assert await worker.succeed(ended, StoredResult(created=int(time.time()), images=[StoredImage(name=name)]))
        await asyncio.wait_for(reading.wait(), 10)  # the front end is rendering the completed event

        await worker.progress(going_on, 50, "halfway")  # published after it, on the same channel
        async with asyncio.timeout(10):
            # the Subscriber keeps a record of events, not a signal per event: polled, for 10 s at most
            while not any(data.get("progress") == 50 for _, data in sub.events.get(going_on, [])):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert not sub.finished[ending].is_set()  # still held up

        gate.set()
        events = await sub.wait(ending)
        assert events[-1][0] == "completed" and events[-1][1]["result"]["data"][0]["b64_json"]
    finally:
        gate.set()
        await sub.client.disconnect()
        await manager.close()


async def test_socketio_refuses_bad_keys_and_hides_other_jobs(gateway_factory: GatewayFactory,
                                                              http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=keyed_config())
    intruder = Subscriber(gw.url, "sk-wrong")
    try:
        await intruder.connect()
        raise AssertionError("connection with a bad key was accepted")
    except socketio.exceptions.ConnectionError:
        pass
    bob = Subscriber(gw.url, "sk-bob")
    await bob.connect()
    try:
        job = await submit(http, gw)
        ack = await bob.subscribe(job["id"])
        assert ack["error"]["code"] == "not_found"
        await asyncio.sleep(0.6)
        assert job["id"] not in bob.events
    finally:
        await bob.client.disconnect()


async def test_failed_job_reaches_subscribers_and_sync_clients(gateway_factory: GatewayFactory,
                                                               http: aiohttp.ClientSession) -> None:
    config = keyed_config()
    config.models["imagegw-local"].timeout = 0.1  # 20 steps of 20 ms cannot finish in time
    gw = await gateway_factory(config=config)
    sub = Subscriber(gw.url, "sk-alice")
    await sub.connect()
    try:
        job = await submit(http, gw)
        await sub.subscribe(job["id"])
        events = await sub.wait(job["id"])
        assert [n for n, _ in events].count("failed") == 1 and events[-1][0] == "failed"
        assert events[-1][1]["error"]["code"] == "upstream_timeout"
    finally:
        await sub.client.disconnect()
    async with http.post(gw.url + "/v1/images/generations", json={"prompt": "p", "size": "64x64"},
                         headers=auth("sk-alice")) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "upstream_timeout"


async def test_bad_provider_options_stop_start_up(gateway_factory: GatewayFactory) -> None:
    config = GatewayConfig.model_validate({
        "providers": {"local": {"type": "local", "options": {"steps": 0}}},
        "models": {"broken": {"deployments": [{"provider": "local"}]}},
    })
    try:
        await gateway_factory(config=config)
    except ValueError as exc:
        assert "models.broken.deployments.0" in str(exc) and "steps" in str(exc)
    else:
        raise AssertionError("a provider with invalid options started")


def test_a_record_is_stored_as_json_text_per_field_and_read_back_whole() -> None:
    now = time.time()
    record = JobRecord(id="e" * 32, owner="key:alice", model="imagegw-local", created_at=now, started_at=now + 0.25,
                       finished_at=now + 1e-7, status="succeeded", progress=100, stage="done", attempts=2,
                       spec=ImageSpec(model="imagegw-local", prompt="a \"quoted\" é", size="64x64", n=2),
                       result=StoredResult(created=int(now), size="64x64", provider="local",
                                           images=[StoredImage(name="e" * 32 + "/0.png")]))
    stored = record.to_hash()
    for name, value in record.model_dump(mode="json", exclude_none=True).items():
        assert stored[name] == (value if isinstance(value, str) else json.dumps(value))
    assert JobRecord.from_hash({k.encode(): v.encode() for k, v in stored.items()}) == record
