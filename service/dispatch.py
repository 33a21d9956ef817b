"""Turning a validated request into a job: queue it (or run it inline) and optionally wait for its end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from service.auth import Principal
from service.errors import Conflict, NotFound
from service.jobs import JobFailure, JobRecord, JobStore, new_job_id
from service.progress import ProgressHub, ProgressPublisher
from service.schemas import ImageSpec
from service.settings import GatewayConfig, Settings

InlineRunner = Callable[[str], Awaitable[None]]


class Dispatcher:
    def __init__(self, settings: Settings, config: GatewayConfig, store: JobStore, hub: ProgressHub,
                 publisher: ProgressPublisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self.config = config
        self.store = store
        self.hub = hub
        self.inline: InlineRunner | None = None  # set when this process can run jobs itself
        self.inline_tasks: dict[str, asyncio.Task[None]] = {}

    def runs_inline(self, model: str) -> bool:
        return self.inline is not None and self.config.models[model].dispatch == "inline"

    async def submit(self, spec: ImageSpec, principal: Principal, base_url: str, *, wait: bool,
                     job_id: str | None = None) -> tuple[JobRecord, JobRecord | None]:
        """Create the job; with `wait`, also wait for its end. Returns (record as created, terminal record or
        None when the wait timed out or was not asked for). `job_id` is given when the caller needed the id
        first: to store an edit's input images under it, or to listen to the job's events before it runs."""
        record = JobRecord(id=job_id or new_job_id(), owner=principal.owner, model=spec.model, spec=spec,
                           base_url=base_url, created_at=time.time())
        inline = self.runs_inline(spec.model)
        future = self.hub.expect(record.id) if wait else None
        try:
            await self.store.create(record, enqueue=not inline)
            if inline:
                assert self.inline is not None
                task = asyncio.create_task(self.inline(record.id))
                self.inline_tasks[record.id] = task
                task.add_done_callback(lambda _: self.inline_tasks.pop(record.id, None))
        except BaseException:
            if future is not None:
                self.hub.forget(record.id, future)
            raise
        if future is None:
            return record, None
        return record, await self.hub.wait(record.id, future, self.settings.sync_timeout)

    async def owned(self, job_id: str, principal: Principal) -> JobRecord:
        """The caller's job; another key's job is indistinguishable from a missing one."""
        record = await self.store.get(job_id)
        if record is None or record.owner != principal.owner:
            raise NotFound(f"No job found with id '{job_id}'.", param="job_id", code="job_not_found")
        return record

    async def cancel(self, job_id: str, principal: Principal) -> JobRecord:
        record = await self.owned(job_id, principal)
        if record.terminal:
            raise Conflict(f"Job '{job_id}' has already {record.status}.", code="job_finished")
        failure = JobFailure(status=409, error={"message": "The job was cancelled.", "type": "invalid_request_error",
                                                "param": None, "code": "job_cancelled"})
        cancelled = await self.store.cancel(job_id, failure)
        if cancelled is None:
            return await self.owned(job_id, principal)  # it finished just now
        task = self.inline_tasks.get(job_id)
        if task is not None:
            task.cancel()
        await self.publisher.finished(cancelled)
        return cancelled
