"""Server-sent events in OpenAI's image-streaming shape, fed by one job's events.

`image_generation.partial_image` / `image_edit.partial_image` for each partial image the provider reports,
then one `*.completed` per finished image, or an `error` event when the job fails. The job is the source of
truth: the stream is only a view of it, so a client that disconnects loses nothing (the job runs on and stays
readable through the job API), and a lost event is covered by re-reading the record.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from typing import Any

import pybase64
from aiohttp import web
from PIL import Image

from service.constants import EVENT_PARTIAL_IMAGE, TERMINAL_EVENTS
from service.errors import GatewayError, InternalError
from service.jobs import JobRecord, JobStore
from service.openapi import Media
from service.progress import JobEvent, carried_record
from service.results import job_error, result_image
from service.storage import Storage

EVENT_STREAM = Media(("text/event-stream",), {"type": "string", "description": "server-sent events"})
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
log = logging.getLogger(__name__)

RECHECK_INTERVAL = 5.0  # seconds without events before the record is re-read (and a keep-alive sent)
ZERO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
              "output_tokens": 0, "total_tokens": 0}


class EventStream:
    """A prepared `text/event-stream` response."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    @classmethod
    async def open(cls, request: web.Request, headers: dict[str, str]) -> EventStream:
        response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        await response.prepare(request)
        return cls(response)

    async def send(self, event: str, data: dict[str, Any]) -> None:
        payload = json.dumps(data, separators=(",", ":"))
        await self.response.write(f"event: {event}\ndata: {payload}\n\n".encode())

    async def keep_alive(self) -> None:
        await self.response.write(b": keep-alive\n\n")


def event_prefix(record: JobRecord) -> str:
    return "image_edit" if record.spec.operation == "edit" else "image_generation"


def error_event(error: GatewayError) -> dict[str, Any]:
    return {"type": "error", "error": error.to_dict()}


def partial_event(record: JobRecord, data: dict[str, Any]) -> dict[str, Any]:
    spec = record.spec
    return {
        "type": f"{event_prefix(record)}.partial_image",
        "b64_json": data["b64_json"],
        "partial_image_index": data["partial_image_index"],
        "created_at": int(time.time()),
        "size": spec.size if spec.dimensions() else _size_of(data["b64_json"]),
        "quality": spec.quality or "auto",
        "background": spec.background or "auto",
        "output_format": data.get("output_format", spec.output_format),
    }


def _size_of(b64: str) -> str:
    """A partial image's size when the request said `auto`: read from the image header."""
    try:
        with Image.open(io.BytesIO(pybase64.b64decode(b64))) as image:
            return f"{image.width}x{image.height}"
    except (OSError, ValueError):  # a preview Pillow cannot read still goes out, sized as asked
        return "auto"


async def completed_events(record: JobRecord, storage: Storage) -> list[dict[str, Any]]:
    result = record.result
    if result is None:
        raise InternalError(f"job {record.id} succeeded without a result")
    events = []
    for index in range(len(result.images)):
        events.append({
            "type": f"{event_prefix(record)}.completed",
            "b64_json": pybase64.b64encode_as_string(await result_image(record, index, storage)),
            "created_at": result.created,
            "size": result.size or record.spec.size,
            "quality": result.quality or "auto",
            "background": result.background or "auto",
            "output_format": result.output_format or record.spec.output_format,
            # OpenAI's event always carries usage; back ends that count nothing report zeros
            "usage": result.usage or ZERO_USAGE,
        })
    return events


async def stream_job(request: web.Request, record: JobRecord, events: asyncio.Queue[JobEvent],
                     ending: asyncio.Future[JobRecord | None], store: JobStore, storage: Storage,
                     max_wait: float) -> web.StreamResponse:
    """Relay the job's events until it ends or `max_wait` seconds pass; `events` and `ending` (the hub's
    `listen` and `expect`) were registered before the job was enqueued, so nothing it published is missed, and
    a job run in this process hands over the images it still holds."""
    stream = await EventStream.open(request, {"x-imagegw-job-id": record.id})
    deadline = asyncio.get_running_loop().time() + max_wait
    try:
        error: GatewayError
        try:
            final = await _relay(stream, record, events, ending, store, deadline)
            if final is not None and final.status == "succeeded":
                for event in await completed_events(final, storage):
                    await stream.send(event["type"], event)
                return stream.response
            error = job_error(final) if final is not None else GatewayError(
                f"The job {record.id} is still running; poll GET /v1/images/jobs/{record.id} for its result.",
                code="job_still_running")
        except GatewayError as exc:
            error = exc
        except ConnectionResetError:
            raise
        except Exception:  # the headers are out, so the error middleware cannot answer: an error event must
            log.exception("the event stream of job %s failed", record.id)
            error = InternalError(f"The event stream failed; the job can still be read at "
                                  f"/v1/images/jobs/{record.id}.")
        await stream.send("error", error_event(error))
    except ConnectionResetError:
        pass  # the client went away; the job runs on and stays readable through the job API
    return stream.response


async def _relay(stream: EventStream, record: JobRecord, events: asyncio.Queue[JobEvent],
                 ending: asyncio.Future[JobRecord | None], store: JobStore, deadline: float) -> JobRecord | None:
    """Send partial images as they come; the terminal record, or None when the deadline passed first."""
    loop = asyncio.get_running_loop()
    while (remaining := deadline - loop.time()) > 0:
        try:
            event, data = await asyncio.wait_for(events.get(), min(remaining, RECHECK_INTERVAL))
        except TimeoutError:
            current = await _current(store, record.id)
            if current.terminal:
                return current
            await stream.keep_alive()
            continue
        if event == EVENT_PARTIAL_IMAGE:
            await stream.send(f"{event_prefix(record)}.partial_image", partial_event(record, data))
        elif event in TERMINAL_EVENTS:
            # the hub resolved `ending` first: with the terminal record itself when the job ran here
            ended = ending.result() if ending.done() else None
            return ended or carried_record(data) or await _current(store, record.id)
    return None


async def _current(store: JobStore, job_id: str) -> JobRecord:
    record = await store.get(job_id)
    if record is None:
        raise InternalError(f"The record of job {job_id} expired.", code="job_expired")
    return record
