"""`POST /v1/chat/completions` (alias `/api/v1/chat/completions`) for image output, as in seed 001.

With `modalities` including "image", the last user message becomes an image job on the model the request
names: its text is the prompt, its `image_url` parts make it an edit. The images come back as `image_url`
content parts holding data URLs, and again as `images` (where OpenRouter puts them). This gateway has no text
models: a request it cannot answer with images is a 400, never a silent text-only reply.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from service.errors import InvalidRequest
from service.models import resolve_spec
from service.openapi import api
from service.results import render_result
from service.routes.responses import model_response
from service.routes.submit import require_operation, resolve_model, run_to_end
from service.schemas import (
    ChatAssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatImagePart,
    ChatImageURL,
    ChatMessage,
    ChatTextPart,
    ImageGenerationRequest,
    parse_body,
    validation_error,
)
from service.state import CONFIG, FETCHER, SETTINGS, STORAGE
from service.uploads import Source, check_inputs

MODALITIES = frozenset({"image", "text"})
IMAGE_PARAMETERS = ("n", "size", "quality", "background", "output_format", "output_compression", "seed",
                    "negative_prompt", "user")


@api("Generate or edit images through chat completions", tags="Chat", body=ChatCompletionRequest,
     responses={200: ChatCompletion}, errors=(400, 403, 404, 409, 429, 502, 503, 504),
     description="`modalities` must include `image`; the images come back as data-URL `image_url` parts.")
async def chat_completions(request: web.Request) -> web.Response:
    body = parse_body(ChatCompletionRequest, await request.read())
    check_servable(request, body)
    prompt, images, fields = user_turn(body.messages)
    values: dict[str, Any] = {"prompt": prompt, "model": body.model}
    values.update({name: getattr(body, name) for name in IMAGE_PARAMETERS if getattr(body, name) is not None})
    try:
        image_request = ImageGenerationRequest.model_validate(values)
    except ValidationError as exc:
        raise validation_error(exc) from None
    model, rules = resolve_model(request, body.model)
    inputs = None
    if images:
        require_operation(request, model, "edit")
        if image_request.size is None and rules.sizes.check("auto") is None:
            image_request = image_request.model_copy(update={"size": "auto"})
    spec = resolve_spec(image_request, model, rules, "b64_json")
    if images:
        spec = spec.model_copy(update={"operation": "edit"})
        inputs = await check_inputs(images, None, request.app[SETTINGS], request.app[FETCHER], fields=fields)
    record = await run_to_end(request, spec, inputs)
    result = await render_result(record, request.app[STORAGE])
    assert result is not None
    fmt = result.output_format or spec.output_format
    pictures = [ChatImagePart(image_url=ChatImageURL(url=f"data:image/{fmt};base64,{image.b64_json}"))
                for image in result.data]
    texts = [ChatTextPart(text=image.revised_prompt) for image in result.data if image.revised_prompt]
    message = ChatAssistantMessage(content=[*pictures, *texts], images=pictures)
    return model_response(ChatCompletion(id=f"chatcmpl-{record.id}", created=result.created, model=model,
                                         choices=[ChatChoice(index=0, message=message)]))


def check_servable(request: web.Request, body: ChatCompletionRequest) -> None:
    """Refuse what only a text model could answer, naming the parameter at fault."""
    modalities = body.modalities or []
    if "image" not in modalities:
        raise InvalidRequest("This gateway only generates images: send \"modalities\": [\"image\", \"text\"] "
                             "with an image model.", param="modalities", code="unsupported_modalities")
    unknown = sorted(set(modalities) - MODALITIES)
    if unknown:
        raise InvalidRequest(f"Invalid 'modalities': {', '.join(unknown)} is not supported; use image and "
                             "text.", param="modalities", code="unsupported_modalities")
    if body.stream:
        raise InvalidRequest("Streaming is not supported for image output through chat completions; send "
                             "'stream': false, or use /v1/images/generations with 'stream': true.",
                             param="stream", code="unsupported_parameter")
    config = request.app[CONFIG]
    name = body.model or config.default_model
    if name is not None and name not in config.models:
        raise InvalidRequest(f"Model '{name}' is not an image model on this gateway; image output needs one "
                             f"of: {', '.join(sorted(config.models))}.", param="model",
                             code="model_not_supported")


def user_turn(messages: list[ChatMessage]) -> tuple[str, list[Source], list[str]]:
    """The prompt and input images of the last user message, with the field names of the images."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.role == "user":
            break
    else:
        raise InvalidRequest("Invalid 'messages': a user message is needed.", param="messages")
    where = f"messages[{index}].content"
    texts: list[str] = []
    images: list[Source] = []
    fields: list[str] = []
    if not isinstance(message.content, list):
        texts.append(message.content or "")
    else:
        for position, part in enumerate(message.content):
            if part.type == "text" and part.text is not None:
                texts.append(part.text)
            elif part.type == "image_url" and part.image_url is not None:
                images.append(part.image_url.url)
                fields.append(f"{where}[{position}].image_url")
            else:
                raise InvalidRequest(f"Invalid '{where}[{position}]': content parts of type '{part.type}' "
                                     "are not supported; use text and image_url parts.",
                                     param=f"{where}[{position}]")
    prompt = "\n".join(t for t in texts if t.strip())
    if not prompt:
        raise InvalidRequest(f"Invalid '{where}': the user message has no text to use as the prompt.",
                             param=where, code="missing_prompt")
    return prompt, images, fields


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/api/v1/chat/completions", chat_completions)
