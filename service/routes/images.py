"""`POST /v1/images/generations` and its `/api` alias."""

from __future__ import annotations

from aiohttp import web

from service.errors import InvalidRequest, NotFound
from service.models import family_rules, resolve_spec
from service.results import job_error, render_job, render_result
from service.routes.responses import base_url, model_response, wants_async
from service.schemas import ImageGenerationRequest, ImageSpec, ResponseFormat, parse_body
from service.state import CONFIG, DISPATCHER, STORAGE, principal


def generations(default_response_format: ResponseFormat) -> web.Handler:
    async def handler(request: web.Request) -> web.Response:
        caller = principal(request)
        body = parse_body(ImageGenerationRequest, await request.read())
        if body.stream:
            raise InvalidRequest("Streaming responses are not supported yet; send 'stream': false.", param="stream",
                                 code="unsupported_parameter")
        config = request.app[CONFIG]
        model = body.model or config.default_model
        if model is None:
            raise InvalidRequest("Missing required parameter: 'model'.", param="model",
                                 code="missing_required_parameter")
        model_config = config.models.get(model)
        if model_config is None:
            raise NotFound(f"The model '{model}' does not exist.", param="model", code="model_not_found")
        caller.check_model(model)
        spec = resolve_spec(body, model, family_rules(model_config.family), default_response_format)
        return await submit_and_answer(request, spec)

    return handler


async def submit_and_answer(request: web.Request, spec: ImageSpec) -> web.Response:
    """Enqueue; answer 202 with the job for `Prefer: respond-async` or a timed-out wait, else the images."""
    dispatcher, storage = request.app[DISPATCHER], request.app[STORAGE]
    wait = not wants_async(request)
    record, done = await dispatcher.submit(spec, principal(request), base_url(request), wait=wait)
    if done is None:
        current = await dispatcher.store.get(record.id) or record
        return model_response(await render_job(current, storage), status=202,
                              headers={"Location": f"/v1/images/jobs/{record.id}"})
    if done.status != "succeeded":
        raise job_error(done)
    result = await render_result(done, storage)
    assert result is not None
    return model_response(result)


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/images/generations", generations("b64_json"))
    app.router.add_post("/api/images/generations", generations("url"))
