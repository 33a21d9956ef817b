"""`python -m bench [--quick] [--only GROUP,...]`: start everything on loopback, run the scenarios, print the
table and write `bench/results.json`."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from bench import scenarios
from bench.report import Target, cpu_ticks, steal_share, table, write_results
from bench.scenarios import QUEUE, Bench, Sizes
from bench.servers import Stack
from service.settings import Settings

# the inline path's round trips with none of the gateway's work (bench/floor.py), beside the gateway's rows
FLOOR = "floor: the inline path's round trips alone, Redis, "
GROUPS = ("embedded", "latency", "stream", "edit", "queue", "rate", "throughput", "large", "slow", "progress")
RESULTS = Path(__file__).resolve().parent / "results.json"
STEAL_WARNING = 0.02
# a RAM filesystem for the run's files, the gateways' stored images among them: on a disk, what creating a file
# costs can depend on what was deleted before (bench/README, "Where the files go")
RAM_FILES = Path("/dev/shm")
RAM_FILES_NEEDED = 4 << 30  # a full run stores about 2.5 GB (the large answers' and the edits' images)


def default_files() -> Path:
    if RAM_FILES.is_dir() and os.access(RAM_FILES, os.W_OK) and shutil.disk_usage(RAM_FILES).free >= RAM_FILES_NEEDED:
        return RAM_FILES
    return Path(tempfile.gettempdir())


async def run(bench: Bench, groups: set[str]) -> None:
    stack = bench.stack
    await stack.start_upstream()
    slots = Settings.model_fields["worker_concurrency"].default

    if "embedded" in groups:
        print("embedded mode", flush=True)
        gateway = await stack.start_gateway("embedded", redis=False)
        await scenarios.latency(bench, gateway, "bench-inline", "sync generate, inline, embedded, c=1", 1, 3)
        await scenarios.latency(bench, gateway, "bench-queued", "sync generate, queued, embedded, c=1", 2, 5)
        await stack.stop(gateway)

    redis_groups = groups & {"latency", "stream", "edit", "queue", "rate", "throughput", "large", "slow"}
    if redis_groups:
        print("Redis mode", flush=True)
        redis = Redis.from_url(stack.redis_url)
        front = await stack.start_gateway("front", redis=True, queue=QUEUE)
        if "queue" in groups:  # first, while the queue is empty and no worker runs
            await scenarios.drain(bench, front, redis, "worker-1")
        else:
            await stack.start_worker("worker-1", queue=QUEUE)
        floor = await stack.start_floor() if groups & {"latency", "throughput"} else None
        if "latency" in groups:
            await scenarios.latency(bench, front, "bench-inline", "sync generate, inline, Redis, c=1", 1, 3)
            assert floor is not None
            await scenarios.measure_latency(bench, bench.floor_target(floor), [floor.pid], FLOOR + "c=1")
            await scenarios.instructions(bench, "sync generate, inline, Redis, c=1, front end against the floor")
            queued = "sync generate, queued, Redis, 1 worker, c=1"
            await scenarios.latency(bench, front, "bench-queued", queued, 2, 5)
        if "stream" in groups:
            await scenarios.streaming(bench, front, "bench-inline", "stream, 2 partial images, inline, Redis, c=1")
            await scenarios.streaming(bench, front, "bench-queued",
                                      "stream, 2 partial images, queued, Redis, 1 worker, c=1")
        if "edit" in groups:
            await scenarios.edit(bench, front, "bench-inline", "edit, one input image, inline, Redis, c=1")
            queued = "edit, one input image, queued, Redis, 1 worker, c=1"
            await scenarios.edit(bench, front, "bench-queued", queued)
        if "queue" in groups:
            await scenarios.pickup(bench, front, redis)
        if "rate" in groups:
            await scenarios.fixed_rate(bench, front, "bench-inline", "300 req/s, inline, Redis")
            await scenarios.fixed_rate(bench, front, "bench-queued", "300 req/s, queued, Redis, 1 worker")
        if "throughput" in groups:
            await scenarios.throughput(bench, front, "bench-inline", "sync generate, inline, Redis, c=64",
                                       Target.at_least(1000, "req/s") & Target.ratio_at_least(0.3))
            assert floor is not None
            await scenarios.measure_throughput(bench, bench.floor_target(floor), [floor.pid], FLOOR + "c=64")
            await scenarios.throughput(bench, front, "bench-queued", "sync generate, queued, 1 worker, c=64")
        if "large" in groups:
            await scenarios.large(bench, front)
        if groups & {"slow", "throughput"}:
            await stack.start_worker("worker-2", queue=QUEUE)
        if "slow" in groups:
            await scenarios.slow_jobs(bench, front, redis, 2 * slots)
        if "throughput" in groups:
            await scenarios.throughput(bench, front, "bench-queued", "sync generate, queued, 2 workers, c=64")
        await redis.aclose()
        for service in [s for s in stack.services if s.name.startswith(("front", "worker", "floor"))]:
            await stack.stop(service)

    if "progress" in groups:
        print("progress", flush=True)
        # a front end whose queue no worker serves: its jobs stay queued and get only the bench's events
        front = await stack.start_gateway("progress", redis=True, queue="bench:parked")
        plain = await stack.start_plain_ws()
        await scenarios.progress_fanout(bench, front, plain)
        await stack.stop(front)
        # then real jobs, on a fresh front end that knows the farm (the config is written when the farm starts)
        farm = await stack.start_comfyui(bench.sizes.progress_jobs)
        front = await stack.start_gateway("progress-comfyui", redis=True, queue=scenarios.COMFYUI_QUEUE)
        await scenarios.comfyui_progress(bench, front, plain, farm)


async def main(quick: bool, groups: set[str], output: Path, redis: str, files: Path) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="imagegw-bench-", dir=files))
    stack = Stack(workdir)
    started, ticks = time.monotonic(), cpu_ticks()
    mode = "quick" if quick else "full"
    try:
        await stack.start_redis(unix=redis == "unix")
        bench = Bench(stack, await stack.start_load(), Sizes.for_mode(quick))
        try:
            await run(bench, groups)
        finally:
            steal = steal_share(ticks)
            if steal is not None and steal > STEAL_WARNING:
                bench.notes.append(f"the hypervisor gave {steal:.0%} of this machine's CPU time to other guests "
                                   "during the run (steal time): figures are slower and noisier than its own")
            print()
            print(table(bench.rows))
            for note in bench.notes:
                print("note:", note)
            print(f"\n{mode} run, Redis over {redis}, files in {files}, {time.monotonic() - started:.0f} s; "
                  f"results in {output}")
            write_results(output, bench.rows, mode, redis, str(files), bench.notes, steal)
    finally:
        await stack.close()
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def cli() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (under five minutes)")
    parser.add_argument("--only", help=f"comma-separated groups: {', '.join(GROUPS)}")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"default {RESULTS}")
    parser.add_argument("--redis", choices=("tcp", "unix"), default="tcp",
                        help="how every process reaches the run's Redis: loopback TCP (default) or a Unix socket")
    parser.add_argument("--files", type=Path, default=default_files(),
                        help="where the run keeps its files, the images the gateways store included (default "
                             f"{default_files()})")
    args = parser.parse_args()
    groups = set(args.only.split(",")) if args.only else set(GROUPS)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C: the processes get stopped
    if unknown := groups - set(GROUPS):
        parser.error(f"unknown groups: {', '.join(sorted(unknown))}")
    return asyncio.run(main(args.quick, groups, args.output, args.redis, args.files))


if __name__ == "__main__":
    sys.exit(cli())
