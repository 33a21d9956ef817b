"""`POST /v1/images/generations` and its `/api` alias."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from service.errors import InvalidRequest
from service.models import resolve_spec
from service.openapi import PREFER_HEADER, api
from service.routes.edits import edit_from_json
from service.routes.submit import answer, resolve_model
from service.schemas import ImageGenerationRequest, ImagesResponse, Job, ResponseFormat, parse_body
from service.streaming import EVENT_STREAM


def generations(default_response_format: ResponseFormat) -> Handler:
    @api("Create images from a prompt", tags="Images", body=ImageGenerationRequest,
         responses={200: (ImagesResponse, EVENT_STREAM), 202: Job}, headers=PREFER_HEADER,
         errors=(400, 403, 404, 409, 429, 502, 503, 504),
         description=f"Default `response_format` here: `{default_response_format}`. An `image` (URL, data "
                     "URL or base64, one or a list) makes it an edit. With `stream: true` the answer is "
                     "server-sent events: `image_generation.partial_image`, `image_generation.completed` (or "
                     "`image_edit.*`), or `error`.")
    async def handler(request: web.Request) -> web.StreamResponse:
        body = parse_body(ImageGenerationRequest, await request.read())
        if body.image is not None:  # seed 002: an input image makes it an edit
            return await edit_from_json(request, body, default_response_format)
        if body.mask is not None or body.input_fidelity is not None:
            param = "mask" if body.mask is not None else "input_fidelity"
            raise InvalidRequest(f"'{param}' needs an input 'image'.", param=param)
        model, rules = resolve_model(request, body.model)
        return await answer(request, resolve_spec(body, model, rules, default_response_format))

    return handler


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/images/generations", generations("b64_json"))
    app.router.add_post("/api/images/generations", generations("url"))
