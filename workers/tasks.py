"""The job function: load the job, run it through the router, store the images, announce the end."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from service.errors import GatewayError, InternalError, UpstreamTimeout
from service.jobs import JobFailure, JobRecord, StoredImage, StoredResult
from service.logs import JOB_ID
from service.results import HeldResult
from service.storage import image_name
from workers.imaging import convert, image_size
from workers.providers.base import ImageRequest, InputImage
from workers.resources import WorkerResources, resources
from workers.router import RoutedResult

log = logging.getLogger(__name__)

# arq re-runs a job whose worker died; past this many starts the job is failed instead of tried again
MAX_ATTEMPTS = 3


class JobProgress:
    """The `ProgressReporter` a provider gets: monotonic percent, at most one event per interval, the
    latest state always flushed, and the job record kept current for late subscribers."""

    def __init__(self, res: WorkerResources, job_id: str) -> None:
        self.res = res
        self.job_id = job_id
        self.interval = res.settings.progress_interval
        self.percent = 0
        self.stage = "starting"
        self.sent = (0, "starting")  # the job's start recorded and published this opening state
        self.last_sent_at = time.monotonic()
        self.partials = 0
        self.closed = False
        # waits out the interval, then starts the flush: a timer, since cancelling a waiting task would leave
        # an exception, its traceback and frames to the cyclic collector on every inline request
        self._timer: asyncio.TimerHandle | None = None
        self._sending: asyncio.Task[None] | None = None  # the flush under way

    async def update(self, fraction: float, stage: str) -> None:
        # 100 belongs to the terminal event; keep the bar at 99 until the images are stored
        self.percent = max(self.percent, min(99, int(fraction * 100)))
        self.stage = stage
        wait = self.last_sent_at + self.interval - time.monotonic()
        if wait <= 0:
            await self._send()
        elif self._timer is None and self._sending is None and not self.closed:
            self._timer = asyncio.get_running_loop().call_later(wait, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        self._sending = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        await self._send()
        self._sending = None
        if (self.percent, self.stage) != self.sent and not self.closed:  # updated during the send
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._start_flush)

    async def _send(self) -> None:
        state = (self.percent, self.stage)
        if state == self.sent or self.closed:
            return
        self.sent = state
        self.last_sent_at = time.monotonic()
        await self.res.lifecycle.progress(self.job_id, *state)

    async def partial_image(self, image: bytes, fmt: str) -> None:
        await self.res.publisher.partial_image(self.job_id, self.partials, image, fmt)
        self.partials += 1

    async def close(self) -> None:
        """Before the job's terminal event, which no progress event may follow: a waiting flush is dropped, a
        send half-way is waited for, and later updates are ignored."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._sending is not None:
            await asyncio.gather(self._sending, return_exceptions=True)


async def run_image_job(ctx: dict[str, Any], job_id: str, owner: str, run_for: float) -> None:
    """arq entry point. The payload is our job id plus what the start needs before the record is read (its
    owner's limit keys, its model's timeout): the record in Redis is the source of truth, so a re-run after a
    worker crash starts from the record again and finishing twice is impossible."""
    res = resources(ctx)
    if ctx.get("job_try", 1) > MAX_ATTEMPTS:
        record = await res.store.get(job_id)
        if record is not None and not record.terminal:
            await finish_failed(res, record, InternalError(
                f"The job was abandoned {MAX_ATTEMPTS} times by crashing workers.", code="worker_lost"))
        return
    await execute_job(res, job_id, owner, run_for)


async def execute_job(res: WorkerResources, job_id: str, owner: str, run_for: float) -> JobRecord | None:
    """Start the job and run it; the terminal record this run wrote, or None if another run or a cancel
    ended it."""
    JOB_ID.set(job_id)
    record = await res.lifecycle.start(job_id, owner, run_for)
    if record is None:  # cancelled before it started, or finished by an earlier attempt
        await settle_ended(res, job_id)
        return None
    return await run_started(res, record)


async def run_started(res: WorkerResources, record: JobRecord) -> JobRecord | None:
    """Run a job already marked running: by `execute_job`, or created so by a front end running it inline,
    which gets the terminal record back to answer its waiting request without a trip through Redis."""
    JOB_ID.set(record.id)
    progress = JobProgress(res, record.id)
    timeout = res.config.models[record.model].timeout if record.model in res.config.models else None
    failure: GatewayError | None = None
    try:
        request = await load_request(res, record)
        async with asyncio.timeout(timeout):
            routed = await res.router.generate(request, progress)
        result = await store_images(res, record, routed)
    except GatewayError as exc:
        failure = exc
    except TimeoutError:
        failure = UpstreamTimeout(f"The job did not finish within the model's timeout of {timeout:g} s.")
    except Exception:  # a bug in a provider must still end the job; CancelledError is not caught here
        log.exception("job %s failed unexpectedly", record.id)
        failure = InternalError("The image back end failed unexpectedly.")
    finally:
        await progress.close()  # before the terminal event: see `JobProgress.close`
    if failure is not None:
        return await asyncio.shield(finish_failed(res, record, failure))
    return await asyncio.shield(finish_succeeded(res, record, result))


async def load_request(res: WorkerResources, record: JobRecord) -> ImageRequest:
    """The spec plus the bytes of its input images, read back from storage where the front end put them."""
    spec = record.spec
    names = [*spec.input_images, *([spec.mask] if spec.mask else [])]
    loaded = []
    for name in names:
        data = await res.storage.get(name)
        if data is None:
            raise InternalError(f"The input image {name} of job {record.id} is no longer stored.",
                                code="input_expired")
        loaded.append(InputImage(data=data, format=name.rsplit(".", 1)[-1]))
    mask = loaded.pop() if spec.mask else None
    return ImageRequest(spec=spec, images=loaded, mask=mask)


async def store_images(res: WorkerResources, record: JobRecord, routed: RoutedResult) -> HeldResult:
    """Every image stored before the job may succeed (pollers and url answers read them there), and held on
    to for an answer made in this process."""
    spec = record.spec
    images, held = [], []
    for index, image in enumerate(routed.result.images):
        data = image.data
        if image.format != spec.output_format:
            data = await asyncio.to_thread(convert, data, spec.output_format, spec.output_compression)
        images.append(StoredImage(name=image_name(record.id, index, spec.output_format),
                                  revised_prompt=image.revised_prompt))
        held.append(data)
    # side by side: large files are written from threads, and an object store takes parallel uploads; a lone
    # image needs no task for that
    puts = [res.storage.put(image.name, data) for image, data in zip(images, held, strict=True)]
    await (puts[0] if len(puts) == 1 else asyncio.gather(*puts))
    return HeldResult(
        created=int(time.time()),
        images=images,
        size=routed.result.size or (image_size(routed.result.images[0].data) if routed.result.images else None),
        quality=routed.result.quality,
        background=routed.result.background,
        output_format=spec.output_format,
        usage=routed.result.usage,
        provider=routed.deployment.provider,
    ).holding(held)


async def finish_succeeded(res: WorkerResources, record: JobRecord, result: StoredResult) -> JobRecord | None:
    done = await res.lifecycle.succeed(record, result)
    if done is None:
        await res.storage.delete_job(record.id)  # cancelled while running: its images are not wanted
    return done


async def finish_failed(res: WorkerResources, record: JobRecord, error: GatewayError) -> JobRecord | None:
    return await res.lifecycle.fail(record, JobFailure(status=error.status, error=error.to_dict()))


async def settle_ended(res: WorkerResources, job_id: str) -> None:
    """A run of a job that has ended: the worker that ended it may have died before settling it (settling
    twice is harmless)."""
    record = await res.store.get(job_id)
    if record is not None and record.terminal:
        await res.settlement.settle(record)
