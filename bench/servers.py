"""Everything a run starts on loopback, each in its own process: Redis, the fake upstream, the fake ComfyUI
farm, the baseline WebSocket server, gateways in embedded and Redis mode, workers. All of it is stopped when the
run ends."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from service.constants import WAKE_CHANNEL

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"
UPSTREAM_MODEL = "gpt-image-1"
GATEWAY_KEY = "sk-bench-gateway"  # a config-file key: every request is authenticated, as in production

# public model -> (dispatch, upstream mount): all served by the real OpenAI adapter against the fake upstream
MODELS = {
    "bench-inline": ("inline", "/v1"),
    "bench-queued": ("queue", "/v1"),
    "bench-slow": ("queue", "/slow/v1"),
}
# served by the real ComfyUI adapter against the fake farm (bench/comfyui.py), with deploy/'s workflow and
# the bindings of deploy/gateway.comfyui.yaml
COMFYUI_MODEL = "bench-comfyui"
COMFYUI_WORKFLOW = ROOT / "deploy" / "workflows" / "sd-txt2img.json"
COMFYUI_INPUTS = {"prompt": "6.text", "negative_prompt": "7.text", "width": "5.width", "height": "5.height",
                  "n": "5.batch_size", "seed": "3.seed", "steps": "3.steps"}
# seconds per sampler step at the farm. A step is published at once only if it comes one progress interval
# (0.2 s by default) after the job's previous event; before the first step, that is the flush of the stages
# before it, itself one interval after the job's first event: hence over twice the interval
COMFYUI_STEP_DELAY = 0.5


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the bench process dies, however it dies (Linux)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def gateway_config(upstream_url: str, comfyui_urls: list[str]) -> dict[str, object]:
    mounts = sorted({mount for _, mount in MODELS.values()})
    def provider(mount: str) -> str:
        return "upstream" + mount.replace("/", "-")

    providers: dict[str, object] = {provider(mount): {"type": "openai", "base_url": upstream_url + mount,
                                                      "api_key_env": UPSTREAM_KEY_ENV} for mount in mounts}
    models: dict[str, object] = {name: {"family": "generic", "dispatch": dispatch,
                                        "deployments": [{"provider": provider(mount), "model": UPSTREAM_MODEL}]}
                                 for name, (dispatch, mount) in MODELS.items()}
    if comfyui_urls:
        providers["comfyui"] = {"type": "comfyui",
                                "options": {"instances": comfyui_urls, "instance_concurrency": 1}}
        models[COMFYUI_MODEL] = {"family": "generic", "deployments": [{"provider": "comfyui", "options": {
            "workflow": str(COMFYUI_WORKFLOW), "inputs": COMFYUI_INPUTS}}]}
    return {"default_model": "bench-inline", "providers": providers, "models": models,
            "keys": [{"name": "bench", "key": GATEWAY_KEY}]}


@dataclass
class Service:
    name: str
    process: asyncio.subprocess.Process
    url: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid


class Stack:
    """The processes of one run, started on demand and all stopped by `close`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.services: list[Service] = []
        self.redis_url = ""
        self.upstream_url = ""
        self.upstream: Service  # set by start_upstream
        self.comfyui_urls: list[str] = []
        self.config_path = workdir / "config.yaml"

    async def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None, stdin: bool = False
                     ) -> Service:
        log = (self.workdir / f"{name}.log").open("ab")  # noqa: ASYNC230 - a local file, opened once per process
        process = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, env=env or self._env(), stdout=asyncio.subprocess.PIPE, stderr=log,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL, limit=1 << 28,
            preexec_fn=_die_with_parent)
        log.close()
        service = Service(name, process)
        self.services.append(service)
        return service

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGW_")}
        env.update({UPSTREAM_KEY_ENV: "sk-bench-upstream", "PYTHONUNBUFFERED": "1"}, **extra)
        return env

    async def _ready_line(self, service: Service) -> list[str]:
        """What the process printed after "ready" (its addresses, for some)."""
        assert service.process.stdout is not None
        line = await asyncio.wait_for(service.process.stdout.readline(), 60)
        if not line.startswith(b"ready"):
            raise RuntimeError(f"{service.name} did not start; see {self.workdir / service.name}.log")
        return line.decode().split()[1:]

    def _write_config(self) -> None:
        """Read by each gateway and worker when it starts."""
        self.config_path.write_text(yaml.safe_dump(gateway_config(self.upstream_url, self.comfyui_urls)))

    async def start_redis(self, unix: bool = False) -> str:
        """Redis for the run, reached by every process over loopback TCP or, with `unix`, a Unix socket."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install -y redis-server)")
        port, socket_path = free_port(), self.workdir / "redis.sock"
        await self._spawn("redis", binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "warning",
                          *(("--unixsocket", str(socket_path), "--unixsocketperm", "700") if unix else ()))
        self.redis_url = f"unix://{socket_path}?db=0" if unix else f"redis://127.0.0.1:{port}/0"
        redis = Redis.from_url(self.redis_url)
        try:
            for _ in range(250):
                try:
                    await redis.ping()
                    return self.redis_url
                except RedisConnectionError:
                    await asyncio.sleep(0.02)
        finally:
            await redis.aclose()
        raise RuntimeError("redis-server did not start")

    async def start_upstream(self) -> str:
        port = free_port()
        service = await self._spawn("upstream", sys.executable, "-m", "bench.upstream", str(port))
        await self._ready_line(service)
        self.upstream = service
        self.upstream_url = service.url = f"http://127.0.0.1:{port}"
        self._write_config()
        return self.upstream_url

    async def start_comfyui(self, count: int, step_delay: float = COMFYUI_STEP_DELAY) -> Service:
        """`count` fake ComfyUI instances (bench/comfyui.py), served to the gateways started after it as model
        `bench-comfyui`; the service's URL is the farm's own (`/held`, `/release`, `/steps`)."""
        port = free_port()
        service = await self._spawn("comfyui", sys.executable, "-m", "bench.comfyui", str(port), str(count),
                                    str(step_delay))
        self.comfyui_urls = await self._ready_line(service)
        service.url = f"http://127.0.0.1:{port}"
        self._write_config()
        return service

    async def start_floor(self, name: str = "floor", wrapper: Sequence[str] = ()) -> Service:
        """`bench.floor`: the inline path's round trips with none of the gateway's work, on the run's Redis; run
        under `wrapper` when given."""
        port, folder = free_port(), self.workdir / "floor"
        folder.mkdir(exist_ok=True)
        service = await self._spawn(name, *wrapper, sys.executable, "-m", "bench.floor", str(port),
                                    self.upstream_url, self.redis_url, str(folder))
        await self._ready_line(service)
        service.url = f"http://127.0.0.1:{port}"
        return service

    async def start_load(self) -> LoadProcess:
        return LoadProcess(await self._spawn("load", sys.executable, "-m", "bench.load", stdin=True))

    async def start_plain_ws(self) -> Service:
        port = free_port()
        service = await self._spawn("plain_ws", sys.executable, "-m", "bench.plain_ws", str(port),
                                    self.redis_url)
        await self._ready_line(service)
        service.url = f"http://127.0.0.1:{port}"
        return service

    def _gateway_env(self, name: str, redis: bool, queue: str) -> dict[str, str]:
        extra = {"IMAGEGW_CONFIG": str(self.config_path), "IMAGEGW_DATA_DIR": str(self.workdir / "data"),
                 "IMAGEGW_SIGNING_SECRET": "bench-secret", "IMAGEGW_LOG_LEVEL": "WARNING",
                 "IMAGEGW_QUEUE_NAME": queue}
        if redis:
            extra["IMAGEGW_REDIS_URL"] = self.redis_url
        return self._env(**extra)

    async def start_gateway(self, name: str, *, redis: bool, queue: str = "bench:queue",
                            wrapper: Sequence[str] = ()) -> Service:
        """`imagegw serve`: embedded mode (`redis=False`) or the front end of Redis mode; run under `wrapper`
        (a profiler's command line) when given."""
        port = free_port()
        env = self._gateway_env(name, redis, queue)
        env["IMAGEGW_PORT"] = str(port)
        service = await self._spawn(name, *wrapper, sys.executable, "-m", "service.cli", "serve", env=env)
        service.url = f"http://127.0.0.1:{port}"
        await self._wait_http(service, service.url + "/healthz")
        return service

    async def start_worker(self, name: str, *, queue: str = "bench:queue", slots: int | None = None) -> Service:
        """`imagegw worker` (with `slots` jobs at once instead of the default), returned once it listens for
        wake-ups (so it is ready to take jobs)."""
        env = self._gateway_env(name, True, queue)
        if slots is not None:
            env["IMAGEGW_WORKER_CONCURRENCY"] = str(slots)
        redis = Redis.from_url(self.redis_url)
        try:
            before = await self._wake_listeners(redis)
            service = await self._spawn(name, sys.executable, "-m", "service.cli", "worker", env=env)
            deadline = time.monotonic() + 60
            while await self._wake_listeners(redis) <= before:
                if service.process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start; see {self.workdir / name}.log")
                await asyncio.sleep(0.02)
        finally:
            await redis.aclose()
        return service

    @staticmethod
    async def _wake_listeners(redis: Redis) -> int:
        counts = await redis.pubsub_numsub(WAKE_CHANNEL)
        return int(counts[0][1])

    async def _wait_http(self, service: Service, url: str) -> None:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if service.process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{service.name} did not start; see {self.workdir / service.name}.log")
                await asyncio.sleep(0.05)

    async def stop(self, service: Service) -> None:
        if service.process.returncode is None:
            service.process.terminate()
            try:
                await asyncio.wait_for(service.process.wait(), 15)
            except TimeoutError:
                service.process.kill()
                await service.process.wait()
        if service in self.services:
            self.services.remove(service)

    async def close(self) -> None:
        for service in reversed(list(self.services)):
            await self.stop(service)


class LoadProcess:
    """The client side of `bench.load`: one command out, one JSON answer back."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def run(self, op: str, **command: object) -> dict[str, Any]:
        process = self.service.process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps({"op": op, **command}).encode() + b"\n")
        await process.stdin.drain()
        line = await process.stdout.readline()
        if not line:
            raise RuntimeError("the load generator died; see its log")
        answer: dict[str, Any] = json.loads(line)
        return answer
