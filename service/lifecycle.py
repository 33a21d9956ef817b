"""A job's moves that span several concerns, each one atomic Redis round trip: admitted and created (already
running when this process runs it inline), started by a worker, progressing, finished. Each concern builds its own step
(service/limits.py, service/jobs.py, service/settlement.py, service/progress.py); this module only chains them.
"""

from __future__ import annotations

import time
from typing import Any

from service.auth import Principal
from service.jobs import (
    ACTIVE,
    CREATE,
    PROGRESS,
    TRANSITION,
    JobFailure,
    JobRecord,
    JobStore,
    StoredResult,
    failed_fields,
    started_fields,
    succeeded_fields,
)
from service.limits import ADMIT, STARTED, Limiter
from service.progress import PUBLISH, ProgressPublisher
from service.schemas import JobStatus
from service.scripts import Chain
from service.settlement import SETTLE, Settlement

RUNNING: frozenset[JobStatus] = frozenset({"running"})


class Lifecycle:
    def __init__(self, store: JobStore, limiter: Limiter, settlement: Settlement,
                 publisher: ProgressPublisher) -> None:
        self.store = store
        self.limiter = limiter
        self.settlement = settlement
        self.publisher = publisher
        self._create = Chain(store.redis, ADMIT, CREATE)
        self._start = Chain(store.redis, TRANSITION, STARTED, PUBLISH)
        self._progress = Chain(store.redis, PROGRESS, PUBLISH)
        self._finish = Chain(store.redis, TRANSITION, SETTLE, PUBLISH)

    async def create(self, record: JobRecord, principal: Principal, *, inline: bool, run_for: float
                     ) -> JobRecord:
        """Admit and store a new job: queued for a worker (woken in the same move), or for inline dispatch
        already running here. `run_for` is its model's timeout. Raises the error of the limit that refused it;
        then nothing was taken. An inline job has no opening event: nobody knows its id yet, and whoever
        subscribes later gets the record's state first, which is that event's."""
        if inline:
            record = record.model_copy(update={"status": "running", "stage": "starting", "attempts": 1,
                                               "started_at": time.time()})
        replies = await self._create(
            self.limiter.admit_call(principal, record.id, record.spec.n, queued=not inline, run_for=run_for),
            self.store.create_call(record, enqueue=not inline, run_for=run_for),
        )
        Limiter.check(replies[0])
        return record

    async def start(self, job_id: str, owner: str, run_for: float) -> JobRecord | None:
        """A worker takes the job: running, its limit slot now lapsing with `run_for` (its model's timeout),
        its opening event published. None when it is not queued or running (cancelled, or ended by an
        earlier attempt)."""
        opening = self.publisher.progress_message(job_id, 0, "starting")
        replies = await self._start(
            self.store.transition_call(job_id, ACTIVE, started_fields()),
            Limiter.started_call(owner, job_id, run_for),
            self.publisher.publish_call(opening),
        )
        record = JobStore.transitioned(replies[0])
        if record is not None:
            await self.publisher.published(opening)
        return record

    async def progress(self, job_id: str, percent: int, stage: str) -> None:
        """A running job's progress, stored for late subscribers and announced; neither once it has ended."""
        message = self.publisher.progress_message(job_id, percent, stage)
        replies = await self._progress(self.store.progress_call(job_id, percent, stage),
                                       self.publisher.publish_call(message))
        if replies[0][0] == 1:
            await self.publisher.published(message)

    async def succeed(self, record: JobRecord, result: StoredResult) -> JobRecord | None:
        """running -> succeeded; None if the job was cancelled meanwhile. The record given back (and to the
        requests waiting here) holds `result` itself: the images a `HeldResult` holds answer them."""
        # only progress changes a running job's record, and a success overwrites it: the record this move
        # leaves is known without reading it back
        return await self._end(record, RUNNING, succeeded_fields(result), known=True)

    async def fail(self, record: JobRecord, failure: JobFailure) -> JobRecord | None:
        """queued or running -> failed; None if the job had already ended. The stored progress may be newer
        than `record`'s: the record is read back."""
        return await self._end(record, ACTIVE, failed_fields(failure), known=False)

    async def _end(self, record: JobRecord, allowed: frozenset[JobStatus], fields: dict[str, Any], *,
                   known: bool) -> JobRecord | None:
        """The terminal transition, the job's settlement (before the announcement: a client told "done" has
        its slot back) and the terminal event, together or not at all. `known`: `record` with `fields` is
        exactly what the transition leaves, so it is not read back."""
        # a success's result may hold its images (a `HeldResult`, never persisted) for the answer made here
        ending = record.model_copy(update=fields)
        announcement = self.publisher.finished_message(ending)
        replies = await self._finish(
            self.store.transition_call(record.id, allowed, fields, read_back=not known),
            self.settlement.settle_call(ending),
            self.publisher.publish_call(announcement),
        )
        if replies[0][0] != 1:
            return None
        done = ending if known else JobStore.transitioned(replies[0])
        await self.publisher.published(announcement, ended=done)
        return done
