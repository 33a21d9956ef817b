"""The job API: read and cancel jobs."""

from __future__ import annotations

from aiohttp import web

from service.results import render_job
from service.routes.responses import model_response
from service.state import DISPATCHER, STORAGE, principal


async def get_job(request: web.Request) -> web.Response:
    record = await request.app[DISPATCHER].owned(request.match_info["job_id"], principal(request))
    return model_response(await render_job(record, request.app[STORAGE]))


async def cancel_job(request: web.Request) -> web.Response:
    record = await request.app[DISPATCHER].cancel(request.match_info["job_id"], principal(request))
    return model_response(await render_job(record, request.app[STORAGE]))


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/images/jobs/{job_id}", get_job)
    app.router.add_delete("/v1/images/jobs/{job_id}", cancel_job)
