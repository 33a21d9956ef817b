"""The job API: read and cancel jobs."""

from __future__ import annotations

from aiohttp import web

from service.openapi import api
from service.results import render_job
from service.routes.responses import model_response
from service.schemas import Job
from service.state import DISPATCHER, STORAGE, principal

JOB_ID = {"job_id": "The id from the 202 answer (or the `Location` header)."}


@api("Read a job: status, progress, result or error", tags="Jobs", responses={200: Job}, errors=(404,),
     path_params=JOB_ID)
async def get_job(request: web.Request) -> web.Response:
    record = await request.app[DISPATCHER].owned(request.match_info["job_id"], principal(request))
    return model_response(await render_job(record, request.app[STORAGE]))


@api("Cancel a queued or running job", tags="Jobs", responses={200: Job}, errors=(404, 409), path_params=JOB_ID)
async def cancel_job(request: web.Request) -> web.Response:
    record = await request.app[DISPATCHER].cancel(request.match_info["job_id"], principal(request))
    return model_response(await render_job(record, request.app[STORAGE]))


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/images/jobs/{job_id}", get_job)
    app.router.add_delete("/v1/images/jobs/{job_id}", cancel_job)
