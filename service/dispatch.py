"""Turning a validated request into a job: queue it (or run it inline) and optionally wait for its end."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from service.auth import Principal
from service.errors import Conflict, NotFound
from service.fetch import AddressPolicy
from service.idempotency import IdempotencyClaim, IdempotencyStore
from service.jobs import JobFailure, JobRecord, JobStore, new_job_id
from service.lifecycle import Lifecycle
from service.limits import Limiter
from service.logs import JOB_ID
from service.progress import ProgressHub, ProgressPublisher
from service.schemas import ImageSpec, WebhookDelivery
from service.settings import GatewayConfig, Settings
from service.settlement import Settlement
from service.webhooks import check_webhook

log = logging.getLogger(__name__)

CAPABILITY = {"generate": "generate", "edit": "edit", "variation": "edit"}

InlineRunner = Callable[[JobRecord], Coroutine[Any, Any, JobRecord | None]]  # runs a job created running


class Dispatcher:
    def __init__(self, settings: Settings, config: GatewayConfig, store: JobStore, hub: ProgressHub,
                 publisher: ProgressPublisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self.config = config
        self.store = store
        self.hub = hub
        self.inline: InlineRunner | None = None  # set when this process can run jobs itself
        self.inline_tasks: dict[str, asyncio.Task[JobRecord | None]] = {}
        self.settlement = Settlement(store.redis, settings, config)
        self.lifecycle = Lifecycle(store, Limiter(settings), self.settlement, publisher)
        self.idempotency = IdempotencyStore(store.redis, settings.job_ttl)
        self.webhook_policy = AddressPolicy(list(settings.fetch_allowed_networks))

    def runs_inline(self, model: str) -> bool:
        return self.inline is not None and self.config.models[model].dispatch == "inline"

    async def submit(self, spec: ImageSpec, principal: Principal, base_url: str, *, wait: bool,
                     job_id: str | None = None, idempotency: IdempotencyClaim | None = None
                     ) -> tuple[JobRecord, JobRecord | None]:
        """Create the job; with `wait`, also wait for its end. Returns (record as created, terminal record or
        None when the wait timed out or was not asked for). `job_id` is given when the caller needed the id
        first: to store an edit's input images under it, or to listen to the job's events before it runs.
        With `idempotency`, a retry of an earlier request gets that request's job instead (compare the ids)."""
        principal.check_model(spec.model)
        principal.require(CAPABILITY[spec.operation])
        if spec.stream:
            principal.require("stream")
        webhook_url = spec.webhook_url or principal.webhook_url
        if webhook_url is not None:
            check_webhook(webhook_url, self.webhook_policy, principal)
            spec = spec.model_copy(update={"webhook_url": webhook_url})
        record = JobRecord(id=job_id or new_job_id(), owner=principal.owner, model=spec.model, spec=spec,
                           base_url=base_url, created_at=time.time(),
                           webhook=WebhookDelivery(url=webhook_url) if webhook_url else None)
        if idempotency is not None:
            original = await self.idempotency.claim(principal.owner, idempotency, record.id)
            if original is not None:
                return await self._replay(original, principal, wait=wait)
        JOB_ID.set(record.id)
        inline = self.runs_inline(spec.model)
        future = self.hub.expect(record.id) if wait else None
        try:
            record = await self._create(record, principal, inline=inline, idempotency=idempotency)
        except BaseException:
            if future is not None:
                self.hub.forget(record.id, future)
            raise
        log.info("job created", extra={"key_id": principal.key_id, "model": spec.model, "n": spec.n,
                                       "operation": spec.operation})
        if future is None:
            return record, None
        return record, await self.hub.wait(record.id, future, self.settings.sync_timeout)

    async def _create(self, record: JobRecord, principal: Principal, *, inline: bool,
                      idempotency: IdempotencyClaim | None) -> JobRecord:
        """Admission and the job, in one move; a refusal gives back the idempotency key. The record as
        created."""
        try:
            record = await self.lifecycle.create(record, principal, inline=inline,
                                                 run_for=self.config.models[record.model].timeout)
        except BaseException:
            if idempotency is not None:
                await asyncio.shield(self.idempotency.release(principal.owner, idempotency, record.id))
            raise
        if idempotency is not None:
            await self.idempotency.created(principal.owner, idempotency, record.id)
        if inline:
            assert self.inline is not None
            task = asyncio.create_task(self.inline(record))
            self.inline_tasks[record.id] = task
            task.add_done_callback(lambda _: self.inline_tasks.pop(record.id, None))
            task.add_done_callback(self._log_failure)
        return record

    @staticmethod
    def _log_failure(task: asyncio.Task[JobRecord | None]) -> None:
        """An inline job ends itself (its waiters get its terminal record as it ends); only a bug escapes it."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("inline job failed", exc_info=exc)

    async def _replay(self, job_id: str, principal: Principal, *, wait: bool
                      ) -> tuple[JobRecord, JobRecord | None]:
        """An idempotent retry: the first try's job, waited for like a new one."""
        future = self.hub.expect(job_id) if wait else None
        try:
            record = await self.owned(job_id, principal)
        except BaseException:
            if future is not None:
                self.hub.forget(job_id, future)
            raise
        if future is None:
            return record, None
        if record.terminal:
            self.hub.forget(job_id, future)
            return record, record
        return record, await self.hub.wait(job_id, future, self.settings.sync_timeout)

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
        await self.settlement.settle(cancelled)
        await self.publisher.finished(cancelled)
        return cancelled
