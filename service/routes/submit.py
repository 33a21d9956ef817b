"""What every image endpoint does once its request is parsed: pick the model, refuse what it cannot do,
store the checked inputs under the new job's id, enqueue, and answer with the images, a 202 job, or an event
stream."""

from __future__ import annotations

from aiohttp import web

from service.errors import InvalidRequest, NotFound, UpstreamTimeout
from service.idempotency import idempotency_claim
from service.jobs import JobRecord, new_job_id
from service.models import PROVIDER_CAPABILITIES, FamilyRules, family_rules
from service.results import job_error, render_answer, render_job
from service.routes.responses import base_url, model_response, spliced_response, wants_async
from service.schemas import ImageSpec
from service.state import CONFIG, DISPATCHER, HUB, SETTINGS, STORAGE, principal
from service.storage import Storage, input_name, mask_name
from service.streaming import stream_job
from service.uploads import EditInputs

OPERATION_CAPABILITY = {"generate": "generation", "edit": "edit", "variation": "variation"}


def resolve_model(request: web.Request, name: str | None) -> tuple[str, FamilyRules]:
    """The public model a request names (or the default), if it exists and the caller may use it."""
    config = request.app[CONFIG]
    model = name or config.default_model
    if model is None:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model",
                             code="missing_required_parameter")
    model_config = config.models.get(model)
    if model_config is None:
        raise NotFound(f"The model '{model}' does not exist.", param="model", code="model_not_found")
    principal(request).check_model(model)
    return model, family_rules(model_config.family)


def require_operation(request: web.Request, model: str, operation: str) -> None:
    """Refuse here, before anything is stored or queued, what none of the model's providers can do (the
    router would refuse it too, but only once the job runs)."""
    config = request.app[CONFIG]
    needed = OPERATION_CAPABILITY[operation]
    types = {config.providers[d.provider].type for d in config.models[model].deployments}
    if not any(needed in PROVIDER_CAPABILITIES.get(t, frozenset()) for t in types):
        raise InvalidRequest(f"Model '{model}' cannot {operation} images.", param="model",
                             code="unsupported_operation")


async def store_inputs(storage: Storage, job_id: str, spec: ImageSpec, inputs: EditInputs) -> ImageSpec:
    """Put the checked inputs where the job's `load_request` reads them; the spec then names them."""
    names = []
    for index, image in enumerate(inputs.images):
        names.append(input_name(job_id, index, image.format))
        await storage.put(names[-1], image.data)
    mask = None
    if inputs.mask is not None:
        mask = mask_name(job_id, inputs.mask.format)
        await storage.put(mask, inputs.mask.data)
    return spec.model_copy(update={"input_images": names, "mask": mask})


async def answer(request: web.Request, spec: ImageSpec, inputs: EditInputs | None = None
                 ) -> web.StreamResponse:
    """Enqueue, then: an event stream for `stream: true`; 202 with the job for `Prefer: respond-async` or a
    timed-out wait; else the images."""
    dispatcher, storage, hub = request.app[DISPATCHER], request.app[STORAGE], request.app[HUB]
    job_id = new_job_id()
    if inputs is not None:
        spec = await store_inputs(storage, job_id, spec, inputs)
    if spec.stream:
        # before the job exists: its first partial image may come at once
        events, ending = hub.listen(job_id), hub.expect(job_id)
        try:
            record, _ = await _submit(request, spec, job_id, wait=False)
            return await stream_job(request, record, events, ending, dispatcher.store, storage,
                                    request.app[SETTINGS].sync_timeout)
        finally:
            hub.unlisten(job_id, events)
            hub.forget(job_id, ending)
    record, done = await _submit(request, spec, job_id, wait=not wants_async(request))
    if done is None:
        current = await dispatcher.store.get(record.id) or record
        return model_response(await render_job(current, storage), status=202,
                              headers={"Location": f"/v1/images/jobs/{record.id}"})
    if done.status != "succeeded":
        raise job_error(done)
    result = await render_answer(done, storage)
    assert result is not None
    return await spliced_response(request, result.response, result.mark, result.images)


async def run_to_end(request: web.Request, spec: ImageSpec, inputs: EditInputs | None = None) -> JobRecord:
    """Enqueue and wait: the succeeded record, or the job's error raised (for answers that are not images
    responses, like chat completions)."""
    job_id = new_job_id()
    if inputs is not None:
        spec = await store_inputs(request.app[STORAGE], job_id, spec, inputs)
    record, done = await _submit(request, spec, job_id, wait=True)
    if done is None:
        raise UpstreamTimeout(f"The image is not ready yet; its job '{record.id}' can be polled at "
                              f"/v1/images/jobs/{record.id}.", code="job_still_running",
                              headers={"x-imagegw-job-id": record.id})
    if done.status != "succeeded":
        raise job_error(done)
    return done


async def _submit(request: web.Request, spec: ImageSpec, job_id: str, *, wait: bool
                  ) -> tuple[JobRecord, JobRecord | None]:
    # a stream follows the events of the job it created, so it cannot answer an idempotent replay of another
    claim = None if spec.stream else await idempotency_claim(request)
    try:
        record, done = await request.app[DISPATCHER].submit(spec, principal(request), base_url(request),
                                                            wait=wait, job_id=job_id, idempotency=claim)
    except Exception:
        if spec.input_images and await request.app[DISPATCHER].store.get(job_id) is None:
            await request.app[STORAGE].delete_job(job_id)  # no job will ever read these inputs
        raise
    if record.id != job_id and spec.input_images:
        await request.app[STORAGE].delete_job(job_id)  # a replay: the first try's job has its own inputs
    return record, done

