"""The application factory: routes, middleware, and one cleanup context per resource."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING

from aiohttp import web

from service.auth import KeyRing, bearer_token
from service.connections import RedisFactory, open_storage
from service.dispatch import Dispatcher
from service.fetch import UrlFetcher
from service.jobs import JobStore
from service.keys import KeyStore
from service.metrics import Metrics
from service.middleware import (
    add_request_id,
    auth_middleware,
    body_deadline_middleware,
    close_after_broken_body,
    error_middleware,
    observe_middleware,
)
from service.progress import JobEventManager, ProgressHub, ProgressNamespace, ProgressPublisher
from service.routes import admin, chat, docs, edits, files, health, images, jobs, models, playground, static
from service.routes import metrics as metrics_route
from service.routes import usage as usage_route
from service.settings import GatewayConfig, Settings, load_config
from service.socketio_server import SocketIOServer
from service.state import (
    CONFIG,
    DISPATCHER,
    FETCHER,
    HUB,
    KEYS,
    METRICS,
    REDIS,
    REDIS_FACTORY,
    SETTINGS,
    SIO,
    STORAGE,
    STORE,
)

if TYPE_CHECKING:
    from workers.worker import ImageWorker

log = logging.getLogger(__name__)

async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    redis = app[REDIS_FACTORY]()
    app[REDIS] = redis
    app[KEYS].store = KeyStore(redis)
    yield
    await redis.aclose()


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with open_storage(settings, app[REDIS]) as storage:
        app[STORAGE] = storage
        app[STORE] = JobStore(app[REDIS], settings.queue_name, settings.job_ttl)
        yield


async def progress_ctx(app: web.Application) -> AsyncIterator[None]:
    """Socket.IO on the Redis manager; the listener starts now, not at the first Socket.IO connection,
    because synchronous requests learn of their job's end through it too."""
    hub = ProgressHub(app[STORE], app[STORAGE])
    manager = JobEventManager(app[REDIS_FACTORY], write_only=False, hub=hub)
    sio = SocketIOServer(async_mode="aiohttp", client_manager=manager, cors_allowed_origins="*")
    keys = app[KEYS]

    async def authenticate(token: str | None) -> str | None:
        principal = await keys.lookup(bearer_token(token) if token else None)
        return principal.owner if principal else None

    sio.register_namespace(ProgressNamespace(hub, authenticate))
    sio.attach(app)
    hub.sio = sio
    sio.manager_initialized = True
    manager.initialize()
    await manager.subscribed()
    app[HUB] = hub
    app[SIO] = sio
    app[DISPATCHER] = Dispatcher(app[SETTINGS], app[CONFIG], app[STORE], hub, ProgressPublisher(manager))
    yield
    await hub.close()
    await manager.close()


async def fetcher_ctx(app: web.Application) -> AsyncIterator[None]:
    """The session that downloads image URLs given by clients (edits), behind its address checks."""
    fetcher = UrlFetcher(app[SETTINGS])
    await fetcher.open()
    app[FETCHER] = fetcher
    yield
    await fetcher.close()


async def in_process_worker_ctx(app: web.Application) -> AsyncIterator[None]:
    """Embedded mode runs an arq worker in this process; inline models run their jobs here directly.

    This is the one place the front end reaches into `workers`: by design, those two modes are the worker
    running inside the front end."""
    settings, config = app[SETTINGS], app[CONFIG]
    inline = any(m.dispatch == "inline" for m in config.models.values())
    if not (settings.embedded or inline):
        yield
        return
    from workers.resources import open_resources
    from workers.tasks import run_started
    from workers.worker import build_worker

    manager = app[SIO].manager
    async with open_resources(settings, config, app[REDIS], app[STORAGE], manager) as res:
        app[DISPATCHER].inline = partial(run_started, res)
        worker = None
        if settings.embedded:
            worker = build_worker(settings, config, app[REDIS_FACTORY](), res, handle_signals=False)
            worker.main_task = asyncio.create_task(worker.main())
        yield
        if worker is not None:
            await stop_worker(worker, settings.worker_grace)


async def stop_worker(worker: ImageWorker, grace: float) -> None:
    """Graceful stop of the in-process worker: take no new job, let running ones finish within `grace`,
    cancel what is left (arq re-queues it) and close the worker's own Redis connection."""
    worker.allow_pick_jobs = False
    running = [task for task in worker.tasks.values() if not task.done()]
    if running:
        await asyncio.wait(running, timeout=grace)
    assert worker.main_task is not None
    leftovers = [worker.main_task, *worker.tasks.values()]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)
    await worker.pool.aclose()


def create_app(settings: Settings, config: GatewayConfig | None = None) -> web.Application:
    config = config or load_config(settings.config)
    keys = KeyRing(config.keys, settings.admin_token, settings.webhook_secret)
    middlewares = [observe_middleware, error_middleware, body_deadline_middleware, auth_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app.on_response_prepare.extend([add_request_id, close_after_broken_body])
    app[METRICS] = Metrics()
    app[SETTINGS] = settings
    app[CONFIG] = config
    app[KEYS] = keys
    app[REDIS_FACTORY] = RedisFactory(settings)
    app.cleanup_ctx.extend([redis_ctx, storage_ctx, progress_ctx, fetcher_ctx, in_process_worker_ctx])
    images.setup(app)
    edits.setup(app)
    chat.setup(app)
    jobs.setup(app)
    models.setup(app)
    files.setup(app)
    health.setup(app)
    static.setup(app)
    playground.setup(app)
    docs.setup(app)
    admin.setup(app)
    usage_route.setup(app)
    metrics_route.setup(app)
    return app
