"""What every job shares within one process, opened once at start-up and closed at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from arq.connections import ArqRedis

from service.jobs import JobStore
from service.lifecycle import Lifecycle
from service.limits import Limiter
from service.metrics import UpstreamErrorCounter
from service.progress import JobEventManager, ProgressPublisher
from service.settings import GatewayConfig, Settings
from service.settlement import Settlement
from service.storage import Storage
from service.webhooks import WebhookSender
from workers.router import Router

RESOURCES_KEY = "imagegw"


@dataclass
class WorkerResources:
    settings: Settings
    config: GatewayConfig
    store: JobStore
    storage: Storage
    publisher: ProgressPublisher
    router: Router
    http: aiohttp.ClientSession
    lifecycle: Lifecycle
    settlement: Settlement
    webhooks: WebhookSender


def resources(ctx: dict[str, Any]) -> WorkerResources:
    """The one typed accessor for what `on_startup` put in arq's context."""
    res: WorkerResources = ctx[RESOURCES_KEY]
    return res


@asynccontextmanager
async def open_resources(
    settings: Settings,
    config: GatewayConfig,
    redis: ArqRedis,
    storage: Storage,
    manager: JobEventManager,
) -> AsyncIterator[WorkerResources]:
    """The shared HTTP session (connection limits, no per-job sessions) and the router built on it."""
    connector = aiohttp.TCPConnector(limit=200, limit_per_host=50, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as http:
        router = Router(config, http)
        router.failure_listener = UpstreamErrorCounter(redis)
        webhooks = WebhookSender(settings)  # its own session: receivers are checked like client-given URLs
        try:
            await webhooks.open()
            store = JobStore(redis, settings.queue_name, settings.job_ttl)
            publisher = ProgressPublisher(manager)
            settlement = Settlement(redis, settings, config)
            yield WorkerResources(
                settings=settings,
                config=config,
                store=store,
                storage=storage,
                publisher=publisher,
                router=router,
                http=http,
                lifecycle=Lifecycle(store, Limiter(settings), settlement, publisher),
                settlement=settlement,
                webhooks=webhooks,
            )
        finally:
            await router.close()
            await webhooks.close()
