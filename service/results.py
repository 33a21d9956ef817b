"""Turning job records into what clients see: the images response, the job object, the error."""

from __future__ import annotations

import base64

from service.errors import GatewayError, InternalError, from_dict
from service.jobs import JobRecord
from service.schemas import ErrorBody, ImageData, ImagesResponse, Job
from service.storage import Storage


async def render_result(record: JobRecord, storage: Storage) -> ImagesResponse | None:
    """The finished job's answer in the format the client asked for (b64_json or signed url)."""
    stored = record.result
    if stored is None:
        return None
    data = []
    for image in stored.images:
        if record.spec.response_format == "url":
            data.append(ImageData(url=await storage.public_url(image.name, record.base_url),
                                  revised_prompt=image.revised_prompt))
            continue
        raw = await storage.get(image.name)
        if raw is None:
            raise InternalError(f"the images of job {record.id} are no longer stored", code="result_expired")
        data.append(ImageData(b64_json=base64.b64encode(raw).decode(), revised_prompt=image.revised_prompt))
    return ImagesResponse(
        created=stored.created,
        data=data,
        background=stored.background,
        output_format=stored.output_format,
        size=stored.size,
        quality=stored.quality,
        usage=stored.usage,
    )


def job_error(record: JobRecord) -> GatewayError:
    """The error a failed or cancelled job ends with, ready to raise."""
    if record.failure is None:
        return InternalError(f"job {record.id} ended without an error record")
    return from_dict(record.failure.status, record.failure.error)


async def render_job(record: JobRecord, storage: Storage) -> Job:
    return Job(
        id=record.id,
        model=record.model,
        status=record.status,
        progress=record.progress,
        stage=record.stage,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        result=await render_result(record, storage) if record.status == "succeeded" else None,
        error=ErrorBody(**record.failure.error) if record.failure else None,
        webhook=record.webhook,
    )
