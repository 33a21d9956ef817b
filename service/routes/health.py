"""Liveness and readiness probes."""

from __future__ import annotations

from aiohttp import web

from service.openapi import api
from service.routes.responses import model_response
from service.schemas import Health, Readiness
from service.state import REDIS, SETTINGS


@api("Liveness probe", tags="Health", responses={200: Health}, auth="none")
async def healthz(request: web.Request) -> web.Response:
    return model_response(Health())


@api("Readiness probe: Redis answers and a worker reported recently", tags="Health",
     responses={200: Readiness, 503: Readiness}, auth="none")
async def readyz(request: web.Request) -> web.Response:
    """Ready when Redis answers and a worker has reported within its health-check interval."""
    redis = request.app[REDIS]
    try:
        await redis.ping()
        worker_seen = bool(await redis.exists(request.app[SETTINGS].queue_name + ":health-check"))
    except Exception as exc:  # any Redis failure means not ready; the probe itself must not fail
        return model_response(Readiness(status="unavailable", redis=False, error=type(exc).__name__), status=503)
    return model_response(Readiness(status="ok" if worker_seen else "no_workers", redis=True, workers=worker_seen),
                          status=200 if worker_seen else 503)


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
