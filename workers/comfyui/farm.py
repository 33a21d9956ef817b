"""Several ComfyUI instances behind one provider: least-loaded choice, slots per instance, down-marks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp

from service.errors import UpstreamError

# instances asked for their queue at once while choosing one
PROBE_BATCH = 4


@dataclass
class Instance:
    url: str
    active: int = 0
    down_until: float = 0.0

    @property
    def healthy(self) -> bool:
        return self.down_until <= time.monotonic()


class Farm:
    """Hands out instances. An instance's load is the larger of this process's jobs on it (some not yet
    submitted) and the prompts its own `/queue` holds (ours once submitted, other workers' and other
    clients'), so `concurrency` holds across the worker processes sharing a farm, races aside."""

    def __init__(self, urls: list[str], concurrency: int, retry_after: float,
                 http: aiohttp.ClientSession) -> None:
        self.instances = [Instance(url.rstrip("/")) for url in urls]
        self.concurrency = concurrency
        self.retry_after = retry_after
        self.http = http
        self._changed = asyncio.Condition()
        self._releases = 0  # bumped on every release: a chooser that raced one looks again at once

    def mark_down(self, instance: Instance) -> None:
        instance.down_until = time.monotonic() + self.retry_after

    async def _remote_load(self, instance: Instance) -> int | None:
        try:
            async with self.http.get(instance.url + "/queue", timeout=aiohttp.ClientTimeout(total=3)) as resp:
                queue = await resp.json()
            return len(queue.get("queue_running", [])) + len(queue.get("queue_pending", []))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            self.mark_down(instance)
            return None

    async def _least_loaded(self, candidates: list[Instance]) -> Instance | None:
        """The candidate with the least load under `concurrency`, asking the `/queue` of as few as it can: in
        order of this process's own jobs, a few at a time, until none left unasked could be less loaded (an
        instance's load is at least our jobs on it). With a farm of many idle instances, a job asks a few of
        them, not all."""
        ordered = sorted(candidates, key=lambda i: i.active)  # stable: the farm's order breaks ties
        best: tuple[int, Instance] | None = None
        for start in range(0, len(ordered), PROBE_BATCH):
            batch = ordered[start:start + PROBE_BATCH]
            loads = await asyncio.gather(*(self._remote_load(i) for i in batch))
            for instance, load in zip(batch, loads, strict=True):
                if load is None:
                    continue
                effective = max(instance.active, load)
                if effective < self.concurrency and (best is None or effective < best[0]):
                    best = (effective, instance)
            rest = ordered[start + PROBE_BATCH:]
            if best is not None and (not rest or best[0] <= rest[0].active):
                break
        return best[1] if best is not None else None

    @asynccontextmanager
    async def lease(self, on_wait: Callable[[], Awaitable[None]]) -> AsyncIterator[Instance]:
        """The least-loaded healthy instance with a free slot, held for the block; while all are busy it
        calls `on_wait` once and waits."""
        instance = await self._acquire(on_wait)
        try:
            yield instance
        finally:
            async with self._changed:
                instance.active -= 1
                self._releases += 1
                self._changed.notify_all()

    async def _acquire(self, on_wait: Callable[[], Awaitable[None]]) -> Instance:
        waited = False
        while True:
            releases = self._releases
            candidates = [i for i in self.instances if i.healthy and i.active < self.concurrency]
            if not candidates and not any(i.healthy for i in self.instances):
                # everything is marked down: probe the one that has waited longest instead of failing at once
                candidates = [min(self.instances, key=lambda i: i.down_until)]
                candidates[0].down_until = 0.0
            instance = await self._least_loaded(candidates)
            if instance is not None:
                instance.active += 1
                return instance
            if not any(i.healthy for i in self.instances):
                raise UpstreamError("No ComfyUI instance is reachable.", code="upstream_unavailable")
            if not waited:
                waited = True
                await on_wait()
            async with self._changed:
                if releases != self._releases:
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._changed.wait()
