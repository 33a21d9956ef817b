"""`GET /metrics`: Prometheus exposition (this front end's HTTP series plus the cluster's job series)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from service.openapi import Media, api
from service.state import HUB, METRICS, REDIS, SETTINGS


@api("Prometheus metrics", tags="Operations", responses={200: Media(("text/plain",), {"type": "string"})},
     auth="none")
async def metrics(request: web.Request) -> web.Response:
    body = await request.app[METRICS].exposition(request.app[REDIS], request.app[SETTINGS].queue_name,
                                                 request.app[HUB].subscriber_count)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
