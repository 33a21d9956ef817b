"""Liveness and readiness probes."""

from __future__ import annotations

from aiohttp import web

from service.state import REDIS, SETTINGS


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when Redis answers and a worker has reported within its health-check interval."""
    redis = request.app[REDIS]
    try:
        await redis.ping()
        worker_seen = bool(await redis.exists(request.app[SETTINGS].queue_name + ":health-check"))
    except Exception as exc:  # any Redis failure means not ready; the probe itself must not fail
        return web.json_response({"status": "unavailable", "redis": False, "error": type(exc).__name__}, status=503)
    status = 200 if worker_seen else 503
    return web.json_response({"status": "ok" if worker_seen else "no_workers", "redis": True,
                              "workers": worker_seen}, status=status)


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
