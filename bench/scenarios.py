"""The scenarios of issue 8, each run side by side with its baseline in alternating rounds.

Every gateway request is a real one: validated, stored as a job, sent through the OpenAI adapter to the fake
upstream (whose call counter is checked after every gateway round), its images stored and read back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from bench.report import Row, Target, percentile, row
from bench.servers import COMFYUI_MODEL, GATEWAY_KEY, UPSTREAM_MODEL, LoadProcess, Service, Stack
from bench.upstream import noise_png
from service.constants import (
    EVENT_PROGRESS,
    JOB_KEY,
    JOB_ROOM,
    PROGRESS_NAMESPACE,
    SOCKETIO_CHANNEL,
    TERMINAL_EVENTS,
)

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
ASYNC = {"Prefer": "respond-async"}
QUEUE = "bench:queue"
COMFYUI_QUEUE = "bench:comfyui"


@dataclass
class Sizes:
    """How much work each scenario does: the full run, or the quick one (same rows, fewer samples)."""

    rounds: int
    latency_requests: int
    edit_requests: int  # each stores a 1.4 MB input: fewer than the small requests
    rate_seconds: float
    throughput_requests: int
    drain_jobs: int
    pickup_jobs: int
    slow_jobs: int
    progress_jobs: int
    subscribers: int
    fanout_events: int
    large_rounds: int
    instruction_requests: int  # counted by callgrind, each request some fifty times slower than without it

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(rounds=3, latency_requests=100, edit_requests=30, rate_seconds=2, throughput_requests=600,
                       drain_jobs=2000, pickup_jobs=100, slow_jobs=200, progress_jobs=20, subscribers=200,
                       fanout_events=500, large_rounds=1, instruction_requests=100)
        return cls(rounds=5, latency_requests=400, edit_requests=100, rate_seconds=10, throughput_requests=6000,
                   drain_jobs=10_000, pickup_jobs=300, slow_jobs=2000, progress_jobs=100, subscribers=1000,
                   fanout_events=3000, large_rounds=3, instruction_requests=300)


@dataclass
class Bench:
    stack: Stack
    load: LoadProcess
    sizes: Sizes
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)
        for r in rows:
            verdict = {True: "met", False: "MISSED", None: "-"}[r.met]
            print(f"  {r.scenario} | {r.metric}: {r.value:g} {r.unit} vs {r.baseline:g} ({verdict})",
                  flush=True)

    # requests
    def gateway_target(self, gateway: Service, model: str, *, headers: dict[str, str] | None = None,
                       status: int = 200, **params: Any) -> dict[str, Any]:
        return {"url": gateway.url + "/v1/images/generations",
                "body": {"model": model, "prompt": PROMPT, **params},
                "headers": {"Authorization": f"Bearer {GATEWAY_KEY}", **(headers or {})},
                "status": status,
                "contains": '"b64_json"' if status == 200 else '"object":"image.job"'}

    def floor_target(self, floor: Service) -> dict[str, Any]:
        """The direct request, sent to `bench.floor` (which passes it on to the upstream)."""
        return {**self.direct_target(), "url": floor.url + "/v1/images/generations"}

    def direct_target(self, **params: Any) -> dict[str, Any]:
        return {"url": self.stack.upstream_url + "/v1/images/generations",
                "body": {"model": UPSTREAM_MODEL, "prompt": PROMPT, **params},
                "headers": {"Authorization": "Bearer sk-bench-upstream"}, "contains": '"b64_json"'}

    async def upstream_calls(self) -> dict[str, int]:
        async with aiohttp.ClientSession() as http, http.get(self.stack.upstream_url + "/stats") as resp:
            calls: dict[str, int] = await resp.json()
            return calls

    async def closed(self, target: dict[str, Any], concurrency: int, count: int, **extra: Any
                     ) -> dict[str, Any]:
        result = await self.load.run("closed", target=target, concurrency=concurrency, count=count, **extra)
        return self._checked(result, target)

    async def open(self, target: dict[str, Any], rate: float, duration: float) -> dict[str, Any]:
        result = await self.load.run("open", target=target, rate=rate, duration=duration)
        return self._checked(result, target)

    def _checked(self, result: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
        """Errors are counted in the rows that show them; a round that mostly failed measures nothing."""
        if result["errors"] > len(result["latencies"]):
            raise RuntimeError(f"mostly errors against {target['url']}: {result['first_errors']}")
        if result["errors"]:
            self.notes.append(f"{result['errors']} errors against {target['url']}: {result['first_errors']}")
        return result

    async def verify_upstream(self, before: dict[str, int], expected: int, mount: str = "fast") -> None:
        after = await self.upstream_calls()
        served = after.get(mount, 0) - before.get(mount, 0)
        if served != expected:
            raise RuntimeError(f"the upstream served {served} generations for {expected} gateway answers: "
                               "something answered without calling it")

    def gateway_pids(self, gateway: Service) -> list[int]:
        """The processes doing a gateway's work: itself, and in Redis mode the running workers."""
        if gateway.name != "front":
            return [gateway.pid]
        return [gateway.pid, *(s.pid for s in self.stack.services if s.name.startswith("worker"))]

    async def latency_pair(self, gateway: dict[str, Any], direct: dict[str, Any], pids: Sequence[int], *,
                           concurrency: int = 1, count: int | None = None, rounds: int | None = None,
                           mount: str = "fast") -> tuple[dict[str, Any], dict[str, Any]]:
        """Alternating rounds, gateway first, after one warm-up round each. Also the CPU time spent per
        request: by the gateway's processes (`pids`) on one side, by the upstream on the other."""
        count = count or self.sizes.latency_requests
        gw: dict[str, Any] = {"latencies": [], "firsts": [], "elapsed": 0.0, "errors": 0, "cpu": 0.0}
        base: dict[str, Any] = {"latencies": [], "firsts": [], "elapsed": 0.0, "errors": 0, "cpu": 0.0}
        warm = min(count, 20)
        await self.closed(gateway, concurrency, warm)
        await self.closed(direct, concurrency, warm)
        for _ in range(rounds or self.sizes.rounds):
            for side, target, watched in ((gw, gateway, pids), (base, direct, [self.stack.upstream.pid])):
                before = await self.upstream_calls()
                cpu = cpu_seconds(watched)
                result = await self.closed(target, concurrency, count)
                side["cpu"] += cpu_seconds(watched) - cpu
                if target is gateway:
                    await self.verify_upstream(before, len(result["latencies"]), mount)
                side["latencies"] += result["latencies"]
                side["firsts"] += result["firsts"]
                side["elapsed"] += result["elapsed"]
                side["errors"] += result["errors"]
        return gw, base


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time the processes have used so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_row(scenario: str, gw: dict[str, Any], base: dict[str, Any]) -> Row:
    return row(scenario, "CPU per request", "ms", gw["cpu"] / len(gw["latencies"]) * 1000,
               base["cpu"] / len(base["latencies"]) * 1000, None)


def ms(values: Sequence[float], q: float) -> float:
    return percentile(values, q) * 1000


def latency_rows(scenario: str, gw: dict[str, Any], base: dict[str, Any], p50: Target | None = None,
                 p99: Target | None = None) -> tuple[Row, Row, Row]:
    return (row(scenario, "p50 latency", "ms", ms(gw["latencies"], 50), ms(base["latencies"], 50), p50),
            row(scenario, "p99 latency", "ms", ms(gw["latencies"], 99), ms(base["latencies"], 99), p99),
            cpu_row(scenario, gw, base))


async def latency(bench: Bench, gateway: Service, model: str, scenario: str, p50: float, p99: float) -> None:
    await measure_latency(bench, bench.gateway_target(gateway, model), bench.gateway_pids(gateway), scenario,
                          Target.adds_at_most(p50, "ms"), Target.adds_at_most(p99, "ms"))


async def measure_latency(bench: Bench, target: dict[str, Any], pids: Sequence[int], scenario: str,
                          p50: Target | None = None, p99: Target | None = None) -> None:
    """`target` (the gateway, or the floor) at c=1 against the same request sent straight to the upstream."""
    gw, base = await bench.latency_pair(target, bench.direct_target(), pids)
    bench.add(*latency_rows(scenario, gw, base, p50, p99))


async def instructions(bench: Bench, scenario: str) -> None:
    """The front end's own work per inline request as callgrind counts it, against the floor's: instructions
    repeat within a fraction of a percent from run to run (and across machines with the same software and CPU
    features: SIMD code paths are chosen by the CPU), where times on a shared machine move by a fifth. Each side
    runs under valgrind, counting only while the measured requests are sent; its answers are checked and its
    upstream calls counted like any other round's."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        bench.notes.append(f"{scenario}: not measured, valgrind is not installed (apt-get install valgrind)")
        return
    counts = []
    for side in ("gateway", "floor"):
        out = bench.stack.workdir / f"callgrind-{side}.out"
        wrapper = ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}")
        if side == "gateway":
            service = await bench.stack.start_gateway("callgrind-gateway", redis=True, wrapper=wrapper)
            target = bench.gateway_target(service, "bench-inline")
        else:
            service = await bench.stack.start_floor("callgrind-floor", wrapper=wrapper)
            target = bench.floor_target(service)
        try:
            await bench.closed(target, 1, bench.sizes.instruction_requests // 2)  # warm-up, not counted
            before = await bench.upstream_calls()
            await callgrind_control("--instr=on", service.pid)
            result = await bench.closed(target, 1, bench.sizes.instruction_requests)
            await callgrind_control("--instr=off", service.pid)
            await callgrind_control("--dump", service.pid)
            await bench.verify_upstream(before, len(result["latencies"]))
        finally:
            await bench.stack.stop(service)
        # every dump holds what was counted since the one before: their sum is the measured requests' work
        total = sum(int(line.split()[1]) for dump in out.parent.glob(out.name + "*")
                    for line in dump.read_text().splitlines() if line.startswith("totals:"))
        if not total:
            raise RuntimeError(f"callgrind counted nothing; see {out}")
        counts.append(total / len(result["latencies"]) / 1e6)
    bench.add(row(scenario, "instructions per request", "millions", counts[0], counts[1], None))


async def callgrind_control(option: str, pid: int) -> None:
    process = await asyncio.create_subprocess_exec("callgrind_control", option, str(pid),
                                                   stdout=asyncio.subprocess.DEVNULL)
    if await process.wait() != 0:
        raise RuntimeError(f"callgrind_control {option} {pid} failed")


async def edit(bench: Bench, gateway: Service, model: str, scenario: str) -> None:
    """An edit of a 1024x1024 PNG (1.4 MB, as a client would upload a picture), multipart as the SDK sends it:
    the gateway checks that every pixel of the input decodes, stores it, reads it back in the job and sends it
    on in its own multipart request. The issue sets no target for it."""
    files = {"image": base64.b64encode(noise_png(1024)).decode()}
    gateway_target = {**bench.gateway_target(gateway, model), "url": gateway.url + "/v1/images/edits",
                      "files": files}
    direct = {**bench.direct_target(), "url": bench.stack.upstream_url + "/v1/images/edits", "files": files}
    gw, base = await bench.latency_pair(gateway_target, direct, bench.gateway_pids(gateway),
                                        count=bench.sizes.edit_requests, mount="edit")
    bench.add(*latency_rows(scenario, gw, base))


async def streaming(bench: Bench, gateway: Service, model: str, scenario: str, partials: int = 2) -> None:
    """`stream: true` with partial images: when the first event arrives and when the stream ends (its completed
    event), against the upstream streaming the same events. The issue sets no target for these rows."""
    params: dict[str, Any] = {"stream": True, "partial_images": partials}
    gateway_target = {**bench.gateway_target(gateway, model, **params), "ends": "image_generation.completed"}
    direct = {**bench.direct_target(**params), "ends": "image_generation.completed"}
    gw, base = await bench.latency_pair(gateway_target, direct, bench.gateway_pids(gateway))
    if len(gw["firsts"]) != len(gw["latencies"]) or len(base["firsts"]) != len(base["latencies"]):
        raise RuntimeError("a streamed answer came without chunked framing")
    bench.add(
        row(scenario, "p50 first event", "ms", ms(gw["firsts"], 50), ms(base["firsts"], 50), None),
        row(scenario, "p50 stream end", "ms", ms(gw["latencies"], 50), ms(base["latencies"], 50), None),
        row(scenario, "p99 stream end", "ms", ms(gw["latencies"], 99), ms(base["latencies"], 99), None),
        cpu_row(scenario, gw, base),
    )


async def fixed_rate(bench: Bench, gateway: Service, model: str, scenario: str, rate: float = 300) -> None:
    gw_lat: list[float] = []
    base_lat: list[float] = []
    errors = [0, 0]
    duration = bench.sizes.rate_seconds
    await bench.closed(bench.gateway_target(gateway, model), 8, 100)  # warm-up
    for _ in range(2):
        before = await bench.upstream_calls()
        result = await bench.open(bench.gateway_target(gateway, model), rate, duration)
        await bench.verify_upstream(before, len(result["latencies"]))
        gw_lat += result["latencies"]
        errors[0] += result["errors"]
        result = await bench.open(bench.direct_target(), rate, duration)
        base_lat += result["latencies"]
        errors[1] += result["errors"]
    bench.add(
        row(scenario, "p99 latency", "ms", ms(gw_lat, 99), ms(base_lat, 99), Target.adds_at_most(10, "ms")),
        row(scenario, "errors", "requests", errors[0], errors[1], Target.at_most(0, "requests")),
    )


async def throughput(bench: Bench, gateway: Service, model: str, scenario: str, goal: Target | None = None
                     ) -> None:
    await measure_throughput(bench, bench.gateway_target(gateway, model), bench.gateway_pids(gateway), scenario,
                             goal)


async def measure_throughput(bench: Bench, target: dict[str, Any], pids: Sequence[int], scenario: str,
                             goal: Target | None = None) -> None:
    """`target` (the gateway, or the floor) at c=64 against the same request sent straight to the upstream."""
    gw, base = await bench.latency_pair(target, bench.direct_target(), pids, concurrency=64,
                                        count=bench.sizes.throughput_requests, rounds=2)
    bench.add(row(scenario, "throughput", "req/s", len(gw["latencies"]) / gw["elapsed"],
                  len(base["latencies"]) / base["elapsed"], goal),
              cpu_row(scenario, gw, base))


# queue scenarios: job timings come from the job records the gateway keeps

async def job_times(redis: Redis, bodies: Sequence[str]) -> list[dict[str, Any]]:
    ids = [json.loads(b)["id"] for b in bodies]
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hmget(JOB_KEY.format(job_id), ["status", "created_at", "started_at", "finished_at"])
        raw = await pipe.execute()
    return [{"status": s.decode() if s else None, "created": float(c), "started": float(st) if st else None,
             "finished": float(f) if f else None} for s, c, st, f in raw]


async def wait_drained(redis: Redis, bodies: Sequence[str], within: float, queue: str = QUEUE
                       ) -> list[dict[str, Any]]:
    """The jobs' timings once all have ended; polling is fine here, the timings come from the records."""
    deadline = time.monotonic() + within
    ended = False
    while not ended:
        await asyncio.sleep(0.05)
        queued = await redis.zcard(queue)
        times = [] if queued else await job_times(redis, bodies)
        ended = bool(times) and all(t["status"] in ("succeeded", "failed", "cancelled") for t in times)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the jobs did not end within {within:g} s ({queued} still queued)")
    failed = [t for t in times if t["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(times)} jobs did not succeed: {failed[:3]}")
    return times


async def submit(bench: Bench, gateway: Service, model: str, jobs: int, concurrency: int = 16,
                 pause: float = 0.0, **params: Any) -> list[str]:
    target = bench.gateway_target(gateway, model, headers=ASYNC, status=202, **params)
    result = await bench.load.run("closed", target=target, concurrency=concurrency, count=jobs, keep=True,
                                  pause=pause)
    if result["errors"]:
        raise RuntimeError(f"async submits failed: {result['first_errors']}")
    bodies: list[str] = result["bodies"]
    return bodies


async def plain_push_pop(redis: Redis, jobs: int) -> float:
    """The baseline drain: push `jobs` small payloads, then pop and acknowledge them one at a time."""
    key = "bench:plain-queue"
    await redis.delete(key)
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(jobs):
            pipe.lpush(key, json.dumps({"id": i, "prompt": PROMPT}))
        await pipe.execute()
    started = time.perf_counter()
    while await redis.rpop(key) is not None:  # type: ignore[misc]
        pass
    return jobs / (time.perf_counter() - started)


async def plain_pickup(redis_url: str, count: int) -> list[float]:
    """The baseline pickup: an idle consumer blocked in BRPOP, timed from push to pop."""
    popper, pusher = Redis.from_url(redis_url), Redis.from_url(redis_url)
    latencies: list[float] = []
    try:
        for _ in range(count):
            waiting = asyncio.create_task(popper.brpop(["bench:pickup"], timeout=5))
            await asyncio.sleep(0.01)
            await pusher.lpush("bench:pickup", repr(time.time()))
            _, raw = await waiting
            latencies.append(time.time() - float(raw))
    finally:
        await popper.aclose()
        await pusher.aclose()
    return latencies


async def drain(bench: Bench, gateway: Service, redis: Redis, worker_name: str) -> Service:
    """10,000 jobs queued with no worker running, then one worker started: jobs per second from the first
    start to the last finish (the worker's start-up is not counted)."""
    jobs = bench.sizes.drain_jobs
    before = await bench.upstream_calls()
    bodies = await submit(bench, gateway, "bench-queued", jobs, concurrency=32)
    worker = await bench.stack.start_worker(worker_name, queue=QUEUE)
    times = await wait_drained(redis, bodies, within=jobs / 50)
    await bench.verify_upstream(before, jobs)
    rate = jobs / (max(t["finished"] for t in times) - min(t["started"] for t in times))
    baseline = await plain_push_pop(redis, jobs)
    bench.add(row(f"queue drain, {jobs:,} jobs, one worker", "jobs drained", "jobs/s", rate, baseline,
                  Target.at_least(1000, "jobs/s")))
    return worker


async def pickup(bench: Bench, gateway: Service, redis: Redis) -> None:
    count = bench.sizes.pickup_jobs
    bodies = await submit(bench, gateway, "bench-queued", count, concurrency=1, pause=0.02)
    times = await wait_drained(redis, bodies, within=60)
    gw = [t["started"] - t["created"] for t in times]
    base = await plain_pickup(bench.stack.redis_url, count)
    bench.add(row("idle pickup, Redis, one worker", "p99 enqueue to start", "ms", ms(gw, 99), ms(base, 99),
                  Target.at_most(10, "ms")))


async def slow_jobs(bench: Bench, gateway: Service, redis: Redis, slots: int) -> None:
    jobs = bench.sizes.slow_jobs
    bodies = await submit(bench, gateway, "bench-slow", jobs, concurrency=16)
    times = await wait_drained(redis, bodies, within=jobs * 0.5 / slots * 3 + 30)
    took = max(t["finished"] for t in times) - min(t["created"] for t in times)
    ideal = jobs * 0.5 / slots
    bench.add(row(f"queue, {jobs:,} jobs of 0.5 s, {slots} slots", "time to drain", "s", took, ideal,
                  Target.ratio_at_most(1.05)))


# large answers: time to last byte, and the front end's peak memory (the inline model runs in it)

def _status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def reset_peak(pid: int) -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS; returns that RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status(pid)["VmRSS"]


def peak(pid: int) -> int:
    return _status(pid)["VmHWM"]


async def large(bench: Bench, gateway: Service) -> None:
    params: dict[str, Any] = {"size": "2048x2048", "n": 10}
    gateway_target = bench.gateway_target(gateway, "bench-inline", **params)
    direct = bench.direct_target(**params)
    probe = await bench.closed(direct, 1, 1, keep=True)
    body_size = len(probe["bodies"][0])
    gateway_target["min_length"] = direct["min_length"] = body_size * 9 // 10
    # growth is counted from before the first large answer: the buffers a served answer freed stay in the
    # gateway's heap for the next one (service/heap.py), and are part of what answering costs
    idle_rss = reset_peak(gateway.pid)
    await bench.closed(gateway_target, 1, 1)  # warm-up
    for concurrency in (1, 4):
        gw_times: list[float] = []
        base_times: list[float] = []
        growth = 0
        for _ in range(bench.sizes.large_rounds):
            reset_peak(gateway.pid)
            result = await bench.closed(gateway_target, concurrency, concurrency)
            growth = max(growth, peak(gateway.pid) - idle_rss)
            gw_times += result["latencies"]
            result = await bench.closed(direct, concurrency, concurrency)
            base_times += result["latencies"]
        scenario = f"large answer, n=10 of 2048x2048 ({body_size / 2**20:.0f} MiB), concurrency {concurrency}"
        bench.add(
            row(scenario, "median time to last byte", "s", percentile(gw_times, 50),
                percentile(base_times, 50), Target.ratio_at_most(1.3)),
            row(scenario, "peak memory growth", "MiB", growth / 2**20, concurrency * body_size / 2**20,
                Target.ratio_at_most(1.5)),
        )


# progress

async def progress_fanout(bench: Bench, gateway: Service, plain: Service) -> None:
    """Subscribers on the gateway's Socket.IO and on the plain WebSocket server, for jobs that stay queued (no
    worker serves the gateway's queue), events published back to back through Redis by the worker-side
    publisher: fan-out rate and memory per idle subscriber."""
    sizes = bench.sizes
    bodies = await submit(bench, gateway, "bench-queued", sizes.progress_jobs)
    job_ids = [json.loads(b)["id"] for b in bodies]
    redis_url = bench.stack.redis_url
    memory: dict[str, float] = {}
    for kind, url, pid in (("sio", gateway.url, gateway.pid), ("plain", plain.url, plain.pid)):
        before = _status(pid)["VmRSS"]
        await bench.load.run("subscribe", kind=kind, url=url, api_key=GATEWAY_KEY, job_ids=job_ids,
                             count=sizes.subscribers)
        await asyncio.sleep(1.0)
        memory[kind] = (_status(pid)["VmRSS"] - before) / 2**20 * 1000 / sizes.subscribers
    lost = {"sio": 0, "plain": 0}
    rates: dict[str, list[float]] = {"sio": [], "plain": []}
    for _ in range(2):
        for kind in ("sio", "plain"):
            result = await bench.load.run("publish", kind=kind, redis_url=redis_url, job_ids=job_ids,
                                          events=sizes.fanout_events, interval=0.0)
            lost[kind] += result["expected"] - result["received"]
            rates[kind].append(result["received"] / result["elapsed"])
    for kind in ("sio", "plain"):
        await bench.load.run("unsubscribe", kind=kind)
    if lost["sio"] or lost["plain"]:
        bench.notes.append(f"fan-out: {lost['sio']} Socket.IO and {lost['plain']} plain deliveries missing")
    bench.add(
        row("Socket.IO fan-out, one front-end process", "events delivered", "events/s", max(rates["sio"]),
            max(rates["plain"]), Target.at_least(10_000, "events/s")),
        row("idle subscribers, one front-end process", "memory per 1,000", "MiB", memory["sio"],
            memory["plain"], Target.at_most(30, "MiB")),
    )


class PublishedEvents:
    """What the workers published, read where the front ends read it: the Socket.IO Redis channel. Counts each
    job's progress events up to its terminal event: what each of its subscribers is owed (nothing follows a
    terminal event; progress published after it is counted apart), and when each (job, stage) was first read
    here: where an event's time went, the worker's side (to Redis) or the front end's (from Redis on)."""

    def __init__(self, redis_url: str) -> None:
        self.redis = Redis.from_url(redis_url)
        self.progress: Counter[str] = Counter()
        self.read_at: dict[tuple[str, str], float] = {}
        self.ended: set[str] = set()
        self.after_end = 0
        self._seen = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PublishedEvents:
        subscribed = asyncio.Event()
        self._reader = asyncio.create_task(self._read(subscribed))
        await asyncio.wait_for(subscribed.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._reader is not None
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.redis.aclose()

    async def _read(self, subscribed: asyncio.Event) -> None:
        room = JOB_ROOM.format("")
        async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(SOCKETIO_CHANNEL)
            subscribed.set()
            async for message in pubsub.listen():
                event = json.loads(message["data"])
                if event.get("namespace") != PROGRESS_NAMESPACE or not str(event.get("room")).startswith(room):
                    continue
                job_id = event["room"].removeprefix(room)
                if event["event"] == EVENT_PROGRESS and job_id in self.ended:
                    self.after_end += 1
                elif event["event"] == EVENT_PROGRESS:
                    self.progress[job_id] += 1
                    self.read_at.setdefault((job_id, event["data"][0]["stage"]), time.monotonic())
                elif event["event"] in TERMINAL_EVENTS:
                    self.ended.add(job_id)
                    self._seen.set()

    async def all_ended(self, job_ids: Sequence[str], within: float) -> None:
        """Until every job's terminal event was read, so that all it published before is counted."""
        async with asyncio.timeout(within):
            while not self.ended >= set(job_ids):
                self._seen.clear()
                await self._seen.wait()


async def run_on_farm(farm: Service, worker: Service, jobs: int) -> None:
    """Once the farm holds every job's prompt and the worker has gone quiet (its start of the jobs done), the
    farm runs them: the rows time the progress of running jobs, not the burst of their start."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(60 + jobs):
        while True:
            async with http.get(farm.url + "/held") as resp:
                if (await resp.json())["held"] == jobs:
                    break
            await asyncio.sleep(0.1)
        while True:  # quiet: under 10% of a core over 0.2 s
            used = cpu_seconds([worker.pid])
            await asyncio.sleep(0.2)
            if cpu_seconds([worker.pid]) - used < 0.02:
                break
        async with http.post(farm.url + "/release") as resp:
            resp.raise_for_status()


STEP = re.compile(r"sampling step (\d+)/(\d+)")


async def comfyui_progress(bench: Bench, gateway: Service, plain: Service, farm: Service) -> None:
    """The issue's progress row end to end: fake ComfyUI frame -> the worker's ComfyUI provider -> its progress
    reporter -> Redis -> the front end -> Socket.IO subscribers. Jobs are queued first, their subscribers
    connected, then a worker with a slot per job started, and the farm runs the prompts once it holds them all;
    each sampler step's event is timed from the send of the farm's first frame of that step (jobs are told apart
    by their prompt). The baseline publishes an event per step, at the times the farm sent them, through Redis
    to `bench.plain_ws`."""
    sizes = bench.sizes
    bodies, jobs = [], {}  # job id -> its prompt, which names it at the farm
    for i in range(sizes.progress_jobs):
        prompt = f"{PROMPT}, progress job {i}"
        bodies += await submit(bench, gateway, COMFYUI_MODEL, 1, prompt=prompt, size="256x256", quality="low")
        jobs[json.loads(bodies[-1])["id"]] = prompt
    subscribed = await bench.load.run("subscribe", kind="sio", url=gateway.url, api_key=GATEWAY_KEY,
                                      job_ids=list(jobs), count=sizes.subscribers, journal=True)
    redis = Redis.from_url(bench.stack.redis_url)
    try:
        async with PublishedEvents(bench.stack.redis_url) as published:
            worker = await bench.stack.start_worker("worker-comfyui", queue=COMFYUI_QUEUE, slots=len(jobs))
            await run_on_farm(farm, worker, len(jobs))
            await wait_drained(redis, bodies, 60 + len(jobs), COMFYUI_QUEUE)
            await published.all_ended(list(jobs), 10)
    finally:
        await redis.aclose()
    journal = await bench.load.run("journal", kind="sio", within=10)
    await bench.load.run("unsubscribe", kind="sio")
    await bench.stack.stop(worker)
    async with aiohttp.ClientSession() as http, http.get(farm.url + "/steps") as resp:
        sent = {prompt["prompt"]: prompt["steps"] for prompt in await resp.json()}

    latencies: dict[bool, list[float]] = {True: [], False: []}  # by "the job's last step"
    # each latency split where the bench read the Redis channel: (frame to Redis, Redis to subscriber)
    sides: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
    stepped = set()
    for job_id, stage, received in journal["events"]:
        if step := STEP.fullmatch(stage):
            last, at = step[1] == step[2], sent[jobs[job_id]][step[1]]
            latencies[last].append(received - at)
            if (read := published.read_at.get((job_id, stage))) is not None:
                sides[last][0].append(read - at)
                sides[last][1].append(received - read)
            stepped.add((job_id, step[1]))
    steps = sum(len(job_steps) for job_steps in sent.values())
    if len(stepped) < steps:
        bench.notes.append(f"ComfyUI progress: {steps - len(stepped)} of {steps} sampler steps had no event of "
                           "their own (coalesced by the progress interval)")
    if published.after_end:
        bench.notes.append(f"ComfyUI progress: {published.after_end} progress events were published after their "
                           "job's terminal event (no subscriber gets them: not counted as lost)")
    if latencies[True] and latencies[False]:
        bench.notes.append(f"ComfyUI progress: p99 {ms(latencies[True], 99):.3g} ms for the jobs' last steps (all "
                           f"jobs end within one step delay), {ms(latencies[False], 99):.3g} ms for the others")
    if split := ", ".join(f"{name}: {ms(sides[last][0], 99):.3g} ms to Redis (the worker), "
                          f"{ms(sides[last][1], 99):.3g} ms from Redis on (the front end)"
                          for name, last in (("last steps", True), ("other steps", False)) if sides[last][0]):
        bench.notes.append(f"ComfyUI progress, p99 of each side (read off the Redis channel by the bench): {split}")
    # each subscriber is owed every progress event its job published, then the job's terminal event
    owed = sum((published.progress[job_id] + (job_id in published.ended)) * count
               for job_id, count in subscribed["per_job"].items())
    lost = owed - len(journal["events"]) - journal["ended"]

    # the baseline: an event for each step, for its job, at the time the farm sent that step's first frame: both
    # sides get the same pacing
    schedule = sorted((at, job_id) for job_id, prompt in jobs.items() for at in sent[prompt].values())
    await bench.load.run("subscribe", kind="plain", url=plain.url, api_key=GATEWAY_KEY, job_ids=list(jobs),
                         count=sizes.subscribers)
    base = await bench.load.run("publish", kind="plain", redis_url=bench.stack.redis_url,
                                job_ids=[job_id for _, job_id in schedule], events=len(schedule),
                                at=[at - schedule[0][0] for at, _ in schedule])
    await bench.load.run("unsubscribe", kind="plain")
    every = latencies[True] + latencies[False]
    scenario = f"progress, {len(jobs)} jobs on a fake ComfyUI farm, {sizes.subscribers:,} subscribers"
    bench.add(
        row(scenario, "p50 delivery latency", "ms", ms(every, 50), ms(base["latencies"], 50),
            Target.at_most(2, "ms")),
        row(scenario, "p99 delivery latency", "ms", ms(every, 99), ms(base["latencies"], 99),
            Target.at_most(10, "ms")),
        row(scenario, "events lost", "events", lost, base["expected"] - base["received"],
            Target.at_most(0, "events")),
    )
