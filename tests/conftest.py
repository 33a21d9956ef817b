"""Shared fixtures: a Redis server the tests own, the gateway in-process or as real processes, SDK clients."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis as redis_sync
from aiohttp import web
from arq.constants import in_progress_key_prefix

from service.app import create_app
from service.settings import LOCAL_MODELS, GatewayConfig, Settings
from service.state import REDIS

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT.parent / "shared" / "seeds"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RedisServer:
    """A redis-server process owned by the tests (never the machine's shared one)."""

    port: int
    dir: Path
    process: subprocess.Popen[bytes] | None = None
    appendonly: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `apt-get install -y redis-server` (see README)")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.dir),
                "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no", "--loglevel", "warning"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_sync.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis_sync.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self, sig: int = 15) -> None:
        if self.process is not None:
            self.process.send_signal(sig)
            self.process.wait(10)
            self.process = None

    def flush(self) -> None:
        redis_sync.Redis(port=self.port).flushall()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), dir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url


def local_config(**model_options: Any) -> GatewayConfig:
    """The offline renderer under `imagegw-local`, optionally slowed down to make progress visible."""
    return GatewayConfig.model_validate({
        "default_model": "imagegw-local",
        "providers": {"local": {"type": "local", "options": model_options}},
        "models": {name: {"family": family, "deployments": [{"provider": "local"}]}
                   for name, family in LOCAL_MODELS.items()},
    })


@dataclass
class Gateway:
    url: str
    app: web.Application
    settings: Settings

    def client(self, api_key: str = "sk-test", **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    async def idle(self, timeout: float = 20.0) -> None:
        """Until nothing is queued or running (webhook deliveries included): a test that ends then does not cut
        a job short, which the embedded worker's shutdown would report as an error."""
        redis, deadline = self.app[REDIS], time.monotonic() + timeout
        while await redis.zcard(self.settings.queue_name) or [k async for k in redis.scan_iter(
                in_progress_key_prefix + "*")]:
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway's jobs did not end")
            await asyncio.sleep(0.02)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@asynccontextmanager
async def run_app(app: web.Application, port: int) -> AsyncIterator[None]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


@pytest.fixture
async def gateway_factory(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start gateways in this test's event loop: `await gateway_factory(config=..., redis_url=..., **settings)`."""
    stack: list[Any] = []

    async def start(config: GatewayConfig | None = None, **overrides: Any) -> Gateway:
        port = free_port()
        values = {"port": port, "data_dir": tmp_path / "data", "progress_interval": 0.0, "sync_timeout": 30.0,
                  **overrides}
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        app = create_app(settings, config or local_config())
        cm = run_app(app, port)
        await cm.__aenter__()
        stack.append(cm)
        return Gateway(url=f"http://127.0.0.1:{port}", app=app, settings=settings)

    yield start
    for cm in reversed(stack):
        await cm.__aexit__(None, None, None)


class GatewayOpener:
    """`gateway, client = await opener(attempts, **provider_options)`: a gateway in front of a provider's fake,
    its config made by `config(attempts, **provider_options)`; `close` closes the SDK clients it handed out."""

    def __init__(self, factory: GatewayFactory, config: Callable[..., GatewayConfig]) -> None:
        self.factory = factory
        self.config = config
        self.clients: list[openai.AsyncOpenAI] = []

    async def __call__(self, attempts: int = 1, **options: Any) -> tuple[Gateway, openai.AsyncOpenAI]:
        gateway = await self.factory(config=self.config(attempts, **options))
        self.clients.append(gateway.client())
        return gateway, self.clients[-1]

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> Gateway:
    """Embedded mode with the offline renderer: no Redis server, no keys."""
    return await gateway_factory()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass
class Processes:
    """Real `imagegw` processes started by a test, stopped at its end."""

    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]]
    log_dir: Path

    @classmethod
    def in_dir(cls, path: Path) -> Processes:
        """Processes whose data and logs go under `path`, with the test signing secret."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGW_")}
        env.update({"IMAGEGW_DATA_DIR": str(path / "data"), "IMAGEGW_SIGNING_SECRET": "test-secret",
                    "IMAGEGW_PROGRESS_INTERVAL": "0", "PYTHONUNBUFFERED": "1"})
        return cls(env=env, procs=[], log_dir=path)

    def start(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        # logs go to a file, not a pipe: a pipe nobody reads blocks a chatty process once it is full
        with self.log_path(len(self.procs)).open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "service.cli", *args],
                                    env={**self.env, **(extra_env or {})}, cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=log)
        self.procs.append(proc)
        return proc

    def log_path(self, index: int) -> Path:
        return self.log_dir / f"process-{index}.log"

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """What `proc` has written to stderr so far."""
        return self.log_path(self.procs.index(proc)).read_text()

    def stop(self) -> None:
        """SIGTERM to every process still running, SIGKILL to those still there 15 s later."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes.in_dir(tmp_path)
    yield procs
    procs.stop()


async def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not come up")
            await asyncio.sleep(0.1)
