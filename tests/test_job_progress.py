"""The progress a running job reports: throttled to one event per interval, the latest state always sent, and
nothing sent once the job has ended."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace
from typing import cast

from workers.resources import WorkerResources
from workers.tasks import JobProgress

INTERVAL = 0.05


class Recorder:
    """Where a job's progress goes (`Lifecycle.progress`); a send can be held half-way."""

    def __init__(self) -> None:
        self.published: list[tuple[int, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_send = asyncio.Event()

    async def progress(self, job_id: str, progress: int, stage: str) -> None:
        self.in_send.set()
        await self.gate.wait()
        self.published.append((progress, stage))


def job_progress(recorder: Recorder) -> JobProgress:
    res = SimpleNamespace(settings=SimpleNamespace(progress_interval=INTERVAL), lifecycle=recorder)
    return JobProgress(cast(WorkerResources, res), "job")


async def test_updates_within_an_interval_end_in_one_event_with_the_latest_state() -> None:
    recorder = Recorder()
    progress = job_progress(recorder)
    for step in range(1, 6):
        await progress.update(step / 10, f"step {step}")
    await asyncio.sleep(INTERVAL * 3)
    assert recorder.published == [(50, "step 5")]
    await progress.close()


async def test_an_update_made_while_a_flush_is_sent_is_sent_next() -> None:
    recorder = Recorder()
    progress = job_progress(recorder)
    recorder.gate.clear()
    await progress.update(0.1, "step 1")  # within the interval of the opening state: flushed later
    await asyncio.wait_for(recorder.in_send.wait(), 1)
    await progress.update(0.2, "step 2")  # while that flush is half-way
    recorder.gate.set()
    await asyncio.sleep(INTERVAL * 3)
    assert recorder.published == [(10, "step 1"), (20, "step 2")]
    await progress.close()


async def test_closing_waits_for_a_flush_half_sent_and_nothing_is_sent_after() -> None:
    recorder = Recorder()
    progress = job_progress(recorder)
    recorder.gate.clear()
    await progress.update(0.5, "sampling")
    await asyncio.wait_for(recorder.in_send.wait(), 1)
    closing = asyncio.create_task(progress.close())
    await asyncio.sleep(INTERVAL)
    assert not closing.done()  # the half-sent event is not left to land after the terminal one
    recorder.gate.set()
    await asyncio.wait_for(closing, 1)
    published = list(recorder.published)
    await progress.update(0.9, "decoding")  # a provider late with an update
    await asyncio.sleep(INTERVAL * 3)
    assert recorder.published == published


async def test_a_job_ended_with_a_flush_waiting_leaves_no_garbage_cycle() -> None:
    """The common inline job: one update inside the interval, the upstream's answer, the end. What it leaves
    must be freed by reference counting: with young collections rare (service/heap.py), cycles made per request
    piled up into one 76 ms pause every few thousand requests."""
    recorder = Recorder()

    async def job() -> None:  # a task of its own, as the worker runs it
        progress = job_progress(recorder)
        await progress.update(0.05, "waiting for the upstream")
        await asyncio.sleep(INTERVAL / 5)  # the upstream's answer, well within the interval
        await progress.close()

    gc.collect()
    gc.disable()
    try:
        await asyncio.create_task(job())
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert recorder.published == []
