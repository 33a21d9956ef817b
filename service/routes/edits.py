"""`POST /v1/images/edits` (multipart as the OpenAI SDK sends it, or JSON with image references) and
`POST /v1/images/variations`."""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from service.errors import InvalidRequest
from service.models import FamilyRules, resolve_spec
from service.openapi import PREFER_HEADER, api
from service.routes.submit import answer, require_operation, resolve_model
from service.schemas import (
    ImageEditForm,
    ImageGenerationRequest,
    ImageSpec,
    ImagesResponse,
    ImageVariationForm,
    ImageVariationRequest,
    Job,
    ResponseFormat,
    parse_body,
    validation_error,
)
from service.state import FETCHER, SETTINGS
from service.streaming import EVENT_STREAM
from service.uploads import Source, check_inputs, coerce_form, is_multipart, read_form

M = TypeVar("M", bound=BaseModel)


ERRORS = (400, 403, 404, 409, 429, 502, 503, 504)


@api("Edit images", tags="Images", form=ImageEditForm, headers=PREFER_HEADER, errors=ERRORS,
     responses={200: (ImagesResponse, EVENT_STREAM), 202: Job},
     description="Multipart as the OpenAI SDK sends it (`image`, or several `image[]`, and an optional "
                 "`mask`), or a JSON body whose `image` is a URL, a data URL or base64 (one or a list). With "
                 "`stream: true` the answer is server-sent events: `image_edit.partial_image`, "
                 "`image_edit.completed`, `error`.")
async def edits(request: web.Request) -> web.StreamResponse:
    if not is_multipart(request):
        body = parse_body(ImageGenerationRequest, await request.read())
        if body.image is None:
            raise InvalidRequest("Missing required parameter: 'image'.", param="image",
                                 code="missing_required_parameter")
        return await edit_from_json(request, body, "b64_json")
    form = await read_form(request, request.app[SETTINGS], mask=True)
    for name in ("image", "mask"):
        if name in form.fields:
            raise InvalidRequest(f"Invalid '{name}': expected a file upload.", param=name,
                                 code="invalid_type")
    body = validate_form(ImageGenerationRequest, form.fields)
    return await run_edit(request, body, list(form.images), form.mask, "b64_json")


async def edit_from_json(request: web.Request, body: ImageGenerationRequest,
                         default_response_format: ResponseFormat) -> web.StreamResponse:
    """An edit whose `image` (one or a list) and `mask` are URLs, data URLs or bare base64."""
    assert body.image is not None
    images: list[Source] = [body.image] if isinstance(body.image, str) else list(body.image)
    return await run_edit(request, body, images, body.mask, default_response_format)


async def run_edit(request: web.Request, body: ImageGenerationRequest, images: list[Source],
                   mask: Source | None, default_response_format: ResponseFormat) -> web.StreamResponse:
    """Cheap refusals first (model, capability, parameters), then fetch and check the inputs, then enqueue."""
    model, rules = resolve_model(request, body.model)
    require_operation(request, model, "edit")
    if body.size is None and rules.sizes.check("auto") is None:
        # an edit keeps the input's size unless told otherwise
        body = body.model_copy(update={"size": "auto"})
    spec = resolve_spec(body, model, rules, default_response_format)
    spec = spec.model_copy(update={"operation": "edit", "input_fidelity": body.input_fidelity})
    inputs = await check_inputs(images, mask, request.app[SETTINGS], request.app[FETCHER])
    return await answer(request, spec, inputs)


@api("Create variations of an image", tags="Images", form=ImageVariationForm,
     responses={200: ImagesResponse, 202: Job}, headers=PREFER_HEADER, errors=ERRORS)
async def variations(request: web.Request) -> web.StreamResponse:
    if not is_multipart(request):
        raise InvalidRequest("Send the image as multipart/form-data with an 'image' file.", param="image",
                             code="invalid_content_type")
    form = await read_form(request, request.app[SETTINGS], mask=False)
    if "image" in form.fields:
        raise InvalidRequest("Invalid 'image': expected a file upload.", param="image", code="invalid_type")
    if len(form.images) > 1:
        raise InvalidRequest("Invalid 'image': a variation takes exactly one image.", param="image")
    body = validate_form(ImageVariationRequest, form.fields)
    model, rules = resolve_model(request, body.model)
    require_operation(request, model, "variation")
    spec = variation_spec(body, model, rules)
    inputs = await check_inputs(list(form.images), None, request.app[SETTINGS], request.app[FETCHER])
    return await answer(request, spec, inputs)


def variation_spec(body: ImageVariationRequest, model: str, rules: FamilyRules) -> ImageSpec:
    n = body.n or 1
    if n > rules.max_n:
        raise InvalidRequest(f"Invalid 'n': model '{model}' supports at most n={rules.max_n}.", param="n",
                             code="integer_above_max_value")
    size = body.size or ("auto" if rules.sizes.check("auto") is None else rules.default_size)
    reason = rules.sizes.check(size)
    if reason is not None:
        raise InvalidRequest(f"Invalid value for 'size': '{size}' is not supported by model '{model}'; "
                             f"{reason}.", param="size")
    return ImageSpec(operation="variation", model=model, prompt="", n=n, size=size, user=body.user,
                     response_format=body.response_format or "b64_json")


def validate_form(model: type[M], fields: dict[str, str]) -> M:
    """Form fields through the same strict model (and the same 400s) as a JSON body."""
    try:
        return model.model_validate(coerce_form(fields))
    except ValidationError as exc:
        raise validation_error(exc) from None


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/images/edits", edits)
    app.router.add_post("/v1/images/variations", variations)
