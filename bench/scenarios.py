"""The scenarios of issue 8, each run side by side with its baseline in alternating rounds.

Every gateway request is a real one: validated, stored as a job, sent through the OpenAI adapter to the fake
upstream (whose call counter is checked after every gateway round), its images stored and read back.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.report import Row, Target, percentile, row
from bench.servers import GATEWAY_KEY, UPSTREAM_MODEL, LoadProcess, Service, Stack
from service.constants import JOB_KEY
from service.settings import Settings

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
ASYNC = {"Prefer": "respond-async"}
QUEUE = "bench:queue"


@dataclass
class Sizes:
    """How much work each scenario does: the full run, or the quick one (same rows, fewer samples)."""

    rounds: int
    latency_requests: int
    rate_seconds: float
    throughput_requests: int
    drain_jobs: int
    pickup_jobs: int
    slow_jobs: int
    progress_jobs: int
    subscribers: int
    progress_events: int
    fanout_events: int
    large_rounds: int

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(rounds=3, latency_requests=100, rate_seconds=2, throughput_requests=600,
                       drain_jobs=2000, pickup_jobs=100, slow_jobs=200, progress_jobs=20, subscribers=200,
                       progress_events=200, fanout_events=500, large_rounds=1)
        return cls(rounds=5, latency_requests=400, rate_seconds=10, throughput_requests=6000,
                   drain_jobs=10_000, pickup_jobs=300, slow_jobs=2000, progress_jobs=100, subscribers=1000,
                   progress_events=1000, fanout_events=3000, large_rounds=3)


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

    def direct_target(self, **params: Any) -> dict[str, Any]:
        return {"url": self.stack.upstream_url + "/v1/images/generations",
                "body": {"model": UPSTREAM_MODEL, "prompt": PROMPT, **params},
                "headers": {"Authorization": "Bearer sk-bench-upstream"}, "contains": '"b64_json"'}

    async def upstream_calls(self) -> dict[str, int]:
        import aiohttp

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
                           concurrency: int = 1, count: int | None = None, rounds: int | None = None
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Alternating rounds, gateway first, after one warm-up round each. Also the CPU time spent per
        request: by the gateway's processes (`pids`) on one side, by the upstream on the other."""
        count = count or self.sizes.latency_requests
        gw: dict[str, Any] = {"latencies": [], "elapsed": 0.0, "errors": 0, "cpu": 0.0}
        base: dict[str, Any] = {"latencies": [], "elapsed": 0.0, "errors": 0, "cpu": 0.0}
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
                    await self.verify_upstream(before, len(result["latencies"]))
                side["latencies"] += result["latencies"]
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


async def latency(bench: Bench, gateway: Service, model: str, scenario: str, p50: float, p99: float) -> None:
    gw, base = await bench.latency_pair(bench.gateway_target(gateway, model), bench.direct_target(),
                                        bench.gateway_pids(gateway))
    bench.add(
        row(scenario, "p50 latency", "ms", ms(gw["latencies"], 50), ms(base["latencies"], 50),
            Target.adds_at_most(p50, "ms")),
        row(scenario, "p99 latency", "ms", ms(gw["latencies"], 99), ms(base["latencies"], 99),
            Target.adds_at_most(p99, "ms")),
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


async def throughput(bench: Bench, gateway: Service, model: str, scenario: str, target: Target | None = None
                     ) -> None:
    gw, base = await bench.latency_pair(bench.gateway_target(gateway, model), bench.direct_target(),
                                        bench.gateway_pids(gateway), concurrency=64,
                                        count=bench.sizes.throughput_requests, rounds=2)
    bench.add(row(scenario, "throughput", "req/s", len(gw["latencies"]) / gw["elapsed"],
                  len(base["latencies"]) / base["elapsed"], target),
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


async def wait_drained(redis: Redis, bodies: Sequence[str], within: float) -> list[dict[str, Any]]:
    """The jobs' timings once all have ended; polling is fine here, the timings come from the records."""
    deadline = time.monotonic() + within
    ended = False
    while not ended:
        await asyncio.sleep(0.05)
        queued = await redis.zcard(QUEUE)
        times = [] if queued else await job_times(redis, bodies)
        ended = bool(times) and all(t["status"] in ("succeeded", "failed", "cancelled") for t in times)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the jobs did not end within {within:g} s ({queued} still queued)")
    failed = [t for t in times if t["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(times)} jobs did not succeed: {failed[:3]}")
    return times


async def submit(bench: Bench, gateway: Service, model: str, jobs: int, concurrency: int = 16,
                 pause: float = 0.0) -> list[str]:
    target = bench.gateway_target(gateway, model, headers=ASYNC, status=202)
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
    await bench.closed(gateway_target, 1, 1)  # warm-up
    for concurrency in (1, 4):
        gw_times: list[float] = []
        base_times: list[float] = []
        growth = 0
        for _ in range(bench.sizes.large_rounds):
            start_rss = reset_peak(gateway.pid)
            result = await bench.closed(gateway_target, concurrency, concurrency)
            growth = max(growth, peak(gateway.pid) - start_rss)
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

async def progress(bench: Bench, gateway: Service, plain: Service) -> None:
    """Subscribers on the gateway's Socket.IO and on the plain WebSocket server, events published through
    Redis: delivery latency (paced), fan-out rate (back to back) and memory per idle subscriber."""
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
    # paced like real jobs: each reports at most once per progress interval (0.2 s by default), so 100 jobs
    # make 500 events/s, each reaching subscribers / jobs clients
    interval = Settings.model_fields["progress_interval"].default / len(job_ids)
    latency: dict[str, list[float]] = {"sio": [], "plain": []}
    lost = {"sio": 0, "plain": 0}
    rates: dict[str, list[float]] = {"sio": [], "plain": []}
    for _ in range(2):
        for kind in ("sio", "plain"):
            result = await bench.load.run("publish", kind=kind, redis_url=redis_url, job_ids=job_ids,
                                          events=sizes.progress_events, interval=interval)
            latency[kind] += result["latencies"]
            lost[kind] += result["expected"] - result["received"]
    for _ in range(2):
        for kind in ("sio", "plain"):
            result = await bench.load.run("publish", kind=kind, redis_url=redis_url, job_ids=job_ids,
                                          events=sizes.fanout_events, interval=0.0)
            lost[kind] += result["expected"] - result["received"]
            rates[kind].append(result["received"] / result["elapsed"])
    for kind in ("sio", "plain"):
        await bench.load.run("unsubscribe", kind=kind)
    scenario = f"progress, {sizes.progress_jobs} jobs, {sizes.subscribers:,} subscribers (Redis publish)"
    bench.add(
        row(scenario, "p50 delivery latency", "ms", ms(latency["sio"], 50), ms(latency["plain"], 50),
            Target.at_most(2, "ms")),
        row(scenario, "p99 delivery latency", "ms", ms(latency["sio"], 99), ms(latency["plain"], 99),
            Target.at_most(10, "ms")),
        row(scenario, "events lost", "events", lost["sio"], lost["plain"], Target.at_most(0, "events")),
        row("Socket.IO fan-out, one front-end process", "events delivered", "events/s", max(rates["sio"]),
            max(rates["plain"]), Target.at_least(10_000, "events/s")),
        row("idle subscribers, one front-end process", "memory per 1,000", "MiB", memory["sio"],
            memory["plain"], Target.at_most(30, "MiB")),
    )
