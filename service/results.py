"""Turning job records into what clients see: the images response, the job object, the error."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import pybase64
from pydantic import PrivateAttr

from service.errors import GatewayError, InternalError, from_dict
from service.jobs import JobRecord, StoredResult
from service.schemas import ErrorBody, ImageData, ImagesResponse, Job
from service.storage import Storage


class HeldResult(StoredResult):
    """A result whose images a job run in this process still holds: its answer is made from them instead of
    reading back what was just stored. The bytes are a private attribute, never persisted or published."""

    _data: list[bytes] = PrivateAttr(default_factory=list)

    def holding(self, data: list[bytes]) -> HeldResult:
        """This result, holding `data`: the bytes of its images, in order."""
        self._data = data
        return self

    @property
    def data(self) -> list[bytes]:
        return self._data


@dataclass
class ImagesAnswer:
    """An images response whose b64_json values are all `mark`, each standing for the base64 of the next of
    `images`: the caller encodes them as it writes, so the whole answer never exists as one string."""

    response: ImagesResponse
    mark: str
    images: list[bytes]


async def result_image(record: JobRecord, index: int, storage: Storage) -> bytes:
    """The bytes of a finished job's image `index`: those its result still holds when the job ran in this
    process, else read back from storage."""
    stored = record.result
    assert stored is not None
    if isinstance(stored, HeldResult):
        return stored.data[index]
    raw = await storage.get(stored.images[index].name)
    if raw is None:
        raise InternalError(f"the images of job {record.id} are no longer stored", code="result_expired")
    return raw


async def render_answer(record: JobRecord, storage: Storage) -> ImagesAnswer | None:
    """The finished job's answer in the format the client asked for (b64_json or signed url)."""
    stored = record.result
    if stored is None:
        return None
    mark = secrets.token_hex(16)  # random: no revised prompt can hold it
    data, images = [], []
    for index, image in enumerate(stored.images):
        if record.spec.response_format == "url":
            data.append(ImageData(url=await storage.public_url(image.name, record.base_url),
                                  revised_prompt=image.revised_prompt))
            continue
        images.append(await result_image(record, index, storage))
        data.append(ImageData(b64_json=mark, revised_prompt=image.revised_prompt))
    response = ImagesResponse(
        created=stored.created,
        data=data,
        background=stored.background,
        output_format=stored.output_format,
        size=stored.size,
        quality=stored.quality,
        usage=stored.usage,
    )
    return ImagesAnswer(response, mark, images)


async def render_result(record: JobRecord, storage: Storage) -> ImagesResponse | None:
    """The answer as one model, its images encoded in it: for answers that embed it (job objects, chat)."""
    answer = await render_answer(record, storage)
    if answer is None:
        return None
    images = iter(answer.images)
    for item in answer.response.data:
        if item.b64_json is not None:
            item.b64_json = pybase64.b64encode_as_string(next(images))
    return answer.response


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
