"""Job events: publishing them through Redis, and delivering them to Socket.IO subscribers and waiting requests.

Workers publish with python-socketio's Redis manager (write-only) to the room `job:{id}`. A front end does not
fan those out through rooms: its manager hands each event to the `ProgressHub`, which knows per subscriber what
it has already sent. That is what makes the guarantees hold even when a late subscriber's snapshot races a live
event: progress never goes down and exactly one terminal event reaches each subscriber.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pybase64
import socketio
from arq.connections import ArqRedis

from service.constants import (
    EVENT_COMPLETED,
    EVENT_FAILED,
    EVENT_PARTIAL_IMAGE,
    EVENT_PROGRESS,
    JOB_ROOM,
    PROGRESS_NAMESPACE,
    SOCKETIO_CHANNEL,
    TERMINAL_EVENTS,
)
from service.errors import NotFound
from service.jobs import JobRecord, JobStore
from service.results import render_result
from service.scripts import Step, StepCall
from service.socketio_server import SocketIOServer
from service.storage import Storage

log = logging.getLogger(__name__)

RedisFactory = Callable[[], ArqRedis]
JobEvent = tuple[str, dict[str, Any]]  # (event name, data) as published


class JobEventManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    """python-socketio's Redis manager on our own Redis connection (so embedded mode's in-memory Redis works),
    routing job-room events to a `ProgressHub` instead of the room list."""

    def __init__(self, redis_factory: RedisFactory, *, write_only: bool, hub: ProgressHub | None = None) -> None:
        super().__init__(channel=SOCKETIO_CHANNEL, write_only=write_only, logger=log)
        self._redis_factory = redis_factory
        self.hub = hub

    def _redis_connect(self) -> None:
        self.redis = self._redis_factory()
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.connected = True

    async def _handle_emit(self, message: dict[str, Any]) -> None:
        room = message.get("room")
        if self.hub is not None and message.get("namespace") == PROGRESS_NAMESPACE and isinstance(room, str):
            job_id = room.removeprefix(JOB_ROOM.format(""))
            data = message["data"][0] if isinstance(message.get("data"), list) else message.get("data")
            await self.hub.deliver(job_id, message["event"], data if isinstance(data, dict) else {})
            return
        if not self.write_only:
            await super()._handle_emit(message)

    async def _listen(self) -> AsyncIterator[Any]:
        """python-socketio's, without the emits this process published: it delivered them itself already (see
        `emitted_here`), and the manager would decode each one only to drop it. Matched on the text as
        `json.dumps` writes it; a message written otherwise is decoded and dropped by the manager as before."""
        head, tail = b'{"method": "emit", ', f'"host_id": "{self.host_id}"}}'.encode()
        async for data in super()._listen():
            if isinstance(data, bytes) and data.startswith(head) and data.endswith(tail):
                continue
            yield data

    async def emitted_here(self, message: dict[str, Any], ended: JobRecord | None = None) -> None:
        """Deliver in this process a message published to Redis: the listener skips this host's own messages.
        `ended` is the terminal record a job run here just wrote: requests waiting for it take it as it is,
        without re-reading it from Redis."""
        if ended is not None and self.hub is not None:
            self.hub.ended(ended)
        await self._handle_emit(message)

    async def subscribed(self, timeout: float = 5.0) -> None:
        """Wait until the listener is subscribed, so no event published after start-up is missed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # redis-py's pubsub offers no "subscribed" event to wait on; this polls only during start-up
        while not (self.pubsub is not None and self.pubsub.subscribed) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        if getattr(self, "thread", None) is not None:
            self.thread.cancel()
        if self.pubsub is not None:
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        if self.redis is not None:
            await self.redis.aclose()


# A job event published from inside one of the job's moves (service/lifecycle.py): same round trip
PUBLISH = Step("publish", """
if A[2] ~= '' then redis.call('PUBLISH', A[1], A[2]) end
return {1}
""")

EventMessage = dict[str, Any]


class ProgressPublisher:
    """What a running job says about itself; the worker side of the event stream."""

    def __init__(self, manager: JobEventManager) -> None:
        self.manager = manager

    def message(self, event: str, job_id: str, data: dict[str, Any]) -> EventMessage:
        """The message python-socketio's pub/sub managers exchange for `emit(event, data, room=job:{id})`,
        built here so that a Lua step can publish it."""
        return {"method": "emit", "event": event, "data": [{"job_id": job_id, **data}], "binary": False,
                "namespace": PROGRESS_NAMESPACE, "room": JOB_ROOM.format(job_id), "skip_sid": None,
                "callback": None, "host_id": self.manager.host_id}

    def publish_call(self, message: EventMessage | None) -> StepCall:
        """The PUBLISH step for `message` (None publishes nothing)."""
        return [], [self.manager.channel, self.manager.json.dumps(message) if message is not None else ""]

    async def published(self, message: EventMessage, ended: JobRecord | None = None) -> None:
        """After a step published `message`: this process's own listeners get it (see `emitted_here`)."""
        await self.manager.emitted_here(message, ended)

    async def _emit(self, message: EventMessage) -> None:
        await self.published(message)
        await self.manager._publish(message)

    def progress_message(self, job_id: str, progress: int, stage: str) -> EventMessage:
        return self.message(EVENT_PROGRESS, job_id, {"progress": progress, "status": "running", "stage": stage})

    async def partial_image(self, job_id: str, index: int, image: bytes, fmt: str) -> None:
        await self._emit(self.message(
            EVENT_PARTIAL_IMAGE,
            job_id,
            {"partial_image_index": index, "b64_json": pybase64.b64encode_as_string(image), "output_format": fmt},
        ))

    def finished_message(self, record: JobRecord) -> EventMessage:
        """The terminal event. A success carries its record, so front ends answer from it without reading it
        back (a failure's stored progress may be newer than the record its finisher holds: they re-read)."""
        if record.status != "succeeded":
            return self.message(EVENT_FAILED, record.id, {"status": record.status})
        return self.message(EVENT_COMPLETED, record.id,
                            {"status": record.status, "record": record.model_dump(mode="json", exclude_none=True)})

    async def finished(self, record: JobRecord) -> None:
        await self._emit(self.finished_message(record))


def carried_record(data: dict[str, Any]) -> JobRecord | None:
    """The record a success's terminal event carries (`ProgressPublisher.finished_message`); None for a
    failure, whose record is to be re-read."""
    return JobRecord.model_validate(data["record"]) if "record" in data else None


@dataclass
class _Subscriber:
    eio_sid: str  # its Engine.IO connection, where its events are written
    last_progress: int = -1


class ProgressHub:
    """Per front end: who listens to which job, and which requests wait for which job to end."""

    def __init__(self, store: JobStore, storage: Storage) -> None:
        self.store = store
        self.storage = storage
        self.sio: SocketIOServer | None = None
        self.subscribers: dict[str, dict[str, _Subscriber]] = {}
        self.waiters: dict[str, set[asyncio.Future[JobRecord | None]]] = {}
        self.listeners: dict[str, set[asyncio.Queue[JobEvent]]] = {}
        self._endings: set[asyncio.Task[None]] = set()  # terminal events being rendered and sent

    # streaming requests: every event of the job, in order, through their own queue
    def listen(self, job_id: str) -> asyncio.Queue[JobEvent]:
        """Register before the job is enqueued: partial images are events only, never in the record."""
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self.listeners.setdefault(job_id, set()).add(queue)
        return queue

    def unlisten(self, job_id: str, queue: asyncio.Queue[JobEvent]) -> None:
        listening = self.listeners.get(job_id)
        if listening is not None:
            listening.discard(queue)
            if not listening:
                del self.listeners[job_id]

    # waiting requests
    def expect(self, job_id: str) -> asyncio.Future[JobRecord | None]:
        """Register interest before the job is enqueued, so its end cannot slip by unseen."""
        future: asyncio.Future[JobRecord | None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(job_id, set()).add(future)
        return future

    def ended(self, record: JobRecord) -> None:
        """A job run in this process ended: its waiters get the terminal record itself, no re-read needed."""
        for future in self.waiters.get(record.id, ()):
            if not future.done():
                future.set_result(record)

    def forget(self, job_id: str, future: asyncio.Future[JobRecord | None]) -> None:
        waiting = self.waiters.get(job_id)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self.waiters[job_id]

    async def wait(self, job_id: str, future: asyncio.Future[JobRecord | None], timeout: float
                   ) -> JobRecord | None:
        """The terminal record, or None if `timeout` passes first. The pub/sub push is the fast path; a
        slow re-read of the record covers a message lost while Redis reconnected."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    async with asyncio.timeout(min(remaining, 2.0)):
                        ended = await asyncio.shield(future)
                    if ended is not None:
                        return ended
                except TimeoutError:
                    pass
                record = await self.store.get(job_id)
                if record is None or record.terminal:
                    return record
        finally:
            self.forget(job_id, future)

    # subscribers
    def add(self, sid: str, job_id: str) -> None:
        assert self.sio is not None
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, PROGRESS_NAMESPACE)
        if eio_sid is not None:  # None: the client went away meanwhile
            self.subscribers.setdefault(job_id, {}).setdefault(sid, _Subscriber(eio_sid))

    def remove(self, sid: str, job_id: str | None = None) -> None:
        jobs = [job_id] if job_id else list(self.subscribers)
        for jid in jobs:
            subs = self.subscribers.get(jid)
            if subs is not None:
                subs.pop(sid, None)
                if not subs:
                    del self.subscribers[jid]

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self.subscribers.values())

    async def snapshot(self, sid: str, record: JobRecord) -> None:
        """A new subscriber's first view: the current state, through the same filter as live events."""
        if record.terminal:
            await self._terminal(record.id, record, self._take_subscribers(record.id, only=sid))
        else:
            await self._progress(record.id, {"job_id": record.id, "progress": record.progress,
                                             "status": record.status, "stage": record.stage}, only=sid)

    async def deliver(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        for queue in self.listeners.get(job_id, ()):
            queue.put_nowait((event, data))
        if event in TERMINAL_EVENTS:
            waiting = [future for future in self.waiters.get(job_id, ()) if not future.done()]
            if not waiting and job_id not in self.subscribers:
                return
            ended = carried_record(data)
            for future in waiting:
                future.set_result(ended)
            if targets := self._take_subscribers(job_id):
                # rendering may read the images back (from a thread, or an object store): meanwhile the events
                # of every other job go on, rather than wait behind this one in the listener
                task = asyncio.create_task(self._terminal(job_id, ended, targets))
                self._endings.add(task)
                task.add_done_callback(self._ending_done)
        elif event == EVENT_PROGRESS:
            await self._progress(job_id, data)
        else:
            await self._send(event, data, list(self.subscribers.get(job_id, {}).values()))

    async def _progress(self, job_id: str, data: dict[str, Any], only: str | None = None) -> None:
        targets = []
        for sid, sub in self.subscribers.get(job_id, {}).items():
            if (only is None or sid == only) and data["progress"] >= sub.last_progress:
                sub.last_progress = data["progress"]
                targets.append(sub)
        await self._send(EVENT_PROGRESS, data, targets)

    def _take_subscribers(self, job_id: str, only: str | None = None) -> list[_Subscriber]:
        """The subscribers a terminal event goes to, unsubscribed at once: nothing follows a terminal event, so
        dropping the subscription before any await makes it the only one each gets, and lets a later subscribe
        start afresh."""
        targets = {sid: sub for sid, sub in self.subscribers.get(job_id, {}).items() if only is None or sid == only}
        for sid in targets:
            self.remove(sid, job_id)
        return list(targets.values())

    async def _terminal(self, job_id: str, record: JobRecord | None, targets: list[_Subscriber]) -> None:
        """The terminal event to `targets`, from `record` (None: the record read back)."""
        if not targets:
            return
        ended = record or await self.store.get(job_id)
        if ended is None:
            return
        event, payload = await self.terminal_payload(ended)
        await self._send(event, payload, targets)

    def _ending_done(self, task: asyncio.Task[None]) -> None:
        self._endings.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a terminal event could not be sent", exc_info=task.exception())

    async def close(self) -> None:
        """Stop sending the terminal events still being rendered (the server is going away)."""
        for task in list(self._endings):
            task.cancel()
        await asyncio.gather(*self._endings, return_exceptions=True)

    async def terminal_payload(self, record: JobRecord) -> tuple[str, dict[str, Any]]:
        if record.status == "succeeded":
            result = await render_result(record, self.storage)
            return EVENT_COMPLETED, {"job_id": record.id, "status": record.status, "progress": 100,
                                     "result": result.model_dump(exclude_none=True) if result else None}
        error = record.failure.error if record.failure else None
        return EVENT_FAILED, {"job_id": record.id, "status": record.status, "progress": record.progress,
                              "error": error}

    async def _send(self, event: str, data: dict[str, Any], targets: list[_Subscriber]) -> None:
        if self.sio is not None and targets:
            await self.sio.fan_out(event, data, [sub.eio_sid for sub in targets], PROGRESS_NAMESPACE)


Authenticator = Callable[[str | None], Awaitable[str | None]]


class ProgressNamespace(socketio.AsyncNamespace):  # type: ignore[misc]
    """`/image-progress`: connect with `auth={"api_key": ...}`, then `subscribe` with a job id."""

    def __init__(self, hub: ProgressHub, authenticate: Authenticator) -> None:
        super().__init__(PROGRESS_NAMESPACE)
        self.hub = hub
        self.authenticate = authenticate

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        token = None
        if isinstance(auth, dict):
            token = auth.get("api_key") or auth.get("token") or auth.get("authorization")
        token = token or environ.get("HTTP_AUTHORIZATION")
        owner = await self.authenticate(token)
        if owner is None:
            raise socketio.exceptions.ConnectionRefusedError(
                {"message": "Invalid or missing API key.", "type": "invalid_request_error",
                 "param": None, "code": "invalid_api_key"}
            )
        await self.save_session(sid, {"owner": owner})

    async def on_subscribe(self, sid: str, data: Any) -> dict[str, Any]:
        job_id = data.get("job_id") if isinstance(data, dict) else data
        if not isinstance(job_id, str):
            return {"error": {"message": "subscribe needs a job_id", "type": "invalid_request_error",
                              "param": "job_id", "code": "missing_required_parameter"}}
        owner = (await self.get_session(sid))["owner"]
        record = await self.hub.store.get(job_id)
        if record is None or record.owner != owner:  # checked before subscribing: no event may reach another key
            return {"error": NotFound(f"No job found with id '{job_id}'.", param="job_id").to_dict()}
        self.hub.add(sid, job_id)  # then read again, so nothing published since the first read is missed
        record = await self.hub.store.get(job_id) or record
        await self.hub.snapshot(sid, record)
        return {"job_id": job_id, "status": record.status}

    async def on_unsubscribe(self, sid: str, data: Any) -> None:
        job_id = data.get("job_id") if isinstance(data, dict) else data
        if isinstance(job_id, str):
            self.hub.remove(sid, job_id)

    async def on_disconnect(self, sid: str, *args: Any) -> None:
        self.hub.remove(sid)
