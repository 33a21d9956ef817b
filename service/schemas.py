"""Request and response models: the API contract the handlers parse with and answer in."""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import InvalidRequest

Quality = Literal["standard", "hd", "low", "medium", "high", "auto"]
ResponseFormat = Literal["url", "b64_json"]
OutputFormat = Literal["png", "jpeg", "webp"]
Background = Literal["transparent", "opaque", "auto"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`: every parameter of the seed documents, strictly typed like OpenAI."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int | None = Field(None, ge=1, le=10)
    quality: Quality | None = None
    response_format: ResponseFormat | None = None
    size: str | None = None
    style: Literal["vivid", "natural"] | None = None
    user: str | None = None
    background: Background | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    moderation: Literal["low", "auto"] | None = None
    partial_images: int | None = Field(None, ge=0, le=3)
    stream: bool | None = None
    webhook_url: str | None = Field(None, max_length=2048, description="POSTed the job object when it ends")
    # edits (seed 002: an `image` turns a generation into an edit): URLs, data URLs or bare base64
    image: str | list[str] | None = Field(None, min_length=1)
    mask: str | None = None
    input_fidelity: Literal["high", "low"] | None = None
    # gateway extensions used by providers that have them (Doubao, ComfyUI)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    negative_prompt: str | None = None
    watermark: bool | None = None


class ImageVariationRequest(BaseModel):
    """`POST /v1/images/variations` (dall-e-2 style): the form fields besides the `image` file."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    n: int | None = Field(None, ge=1, le=10)
    size: str | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None


class ImageEditForm(ImageGenerationRequest):
    """`POST /v1/images/edits` as multipart/form-data, the OpenAI SDK's way: the fields of a JSON edit, with
    the images as files. (A JSON body whose `image` is a URL, a data URL or base64 is accepted too.)"""

    # files here, references in JSON: a different type for the same name, which mypy calls an override
    image: bytes | None = Field(  # type: ignore[assignment]
        None, description="the image to edit: PNG, JPEG or WEBP")
    images: list[bytes] | None = Field(None, alias="image[]", description="several images to edit")
    mask: bytes | None = Field(  # type: ignore[assignment]
        None, description="a PNG whose transparent pixels mark where to edit")


class ImageVariationForm(ImageVariationRequest):
    """`POST /v1/images/variations` as multipart/form-data."""

    image: bytes = Field(description="the image to vary: PNG, JPEG or WEBP")


class ImageSpec(BaseModel):
    """A validated request with every default resolved: what a job carries to the worker and provider."""

    operation: Literal["generate", "edit", "variation"] = "generate"
    model: str
    prompt: str
    n: int = 1
    size: str
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    output_format: OutputFormat = "png"
    output_compression: int | None = None
    moderation: str | None = None
    partial_images: int = 0
    stream: bool = False
    seed: int | None = None
    negative_prompt: str | None = None
    watermark: bool | None = None
    response_format: ResponseFormat = "b64_json"
    # edits and variations: storage names of the uploaded inputs, loaded by the job before the provider runs
    input_images: list[str] = []
    mask: str | None = None
    input_fidelity: str | None = None
    webhook_url: str | None = None  # completion webhook: the request's, else the key's default

    def dimensions(self) -> tuple[int, int] | None:
        """(width, height) when `size` is WIDTHxHEIGHT, else None (auto, 1K...)."""
        return parse_dimensions(self.size)


def parse_dimensions(size: str) -> tuple[int, int] | None:
    width, sep, height = size.partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        return None
    return int(width), int(height)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """The synchronous answer and a job's `result`, as OpenAI's `ImagesResponse`."""

    created: int
    data: list[ImageData]
    background: str | None = None
    output_format: str | None = None
    size: str | None = None
    quality: str | None = None
    usage: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer: `{"error": {...}}`, as OpenAI's."""

    error: ErrorBody


class FileQuery(BaseModel):
    """`GET /v1/files/...`: a signed link carries both; without them the owner's key is needed."""

    expires: str | None = None
    signature: str | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """`GET /readyz`: Redis answers and a worker reported recently."""

    status: Literal["ok", "no_workers", "unavailable"]
    redis: bool
    workers: bool | None = None
    error: str | None = None


class WebhookAttempt(BaseModel):
    at: float
    status: int | None = Field(None, description="the receiver's HTTP status; none when it was not reached")
    error: str | None = None


class WebhookDelivery(BaseModel):
    """A job's completion webhook: where it goes and every delivery attempt so far."""

    url: str
    status: Literal["pending", "delivered", "failed"] = "pending"
    attempts: list[WebhookAttempt] = []


class Job(BaseModel):
    """`GET /v1/images/jobs/{id}`."""

    id: str
    object: Literal["image.job"] = "image.job"
    model: str
    status: JobStatus
    progress: int = Field(ge=0, le=100)
    stage: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    result: ImagesResponse | None = None
    error: ErrorBody | None = None
    webhook: WebhookDelivery | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    capabilities: dict[str, bool]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatImageURL(BaseModel):
    url: str
    detail: str | None = None


class ChatContentPart(BaseModel):
    """A user content part; only `text` and `image_url` parts mean something to an image model."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    image_url: ChatImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ChatContentPart] | None = None


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions` with `modalities` including "image" (seed 001). Text-only knobs that chat
    clients send by habit (temperature...) are accepted and ignored; the image parameters of the generations
    endpoint may be given at the top level."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[str] | None = None
    stream: bool | None = None
    n: int | None = Field(None, ge=1, le=10)
    user: str | None = None
    size: str | None = None
    quality: Quality | None = None
    background: Background | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    negative_prompt: str | None = None


class ChatImagePart(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ChatImageURL


class ChatTextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatAssistantMessage(BaseModel):
    """The images as `image_url` parts (seed 001) and again as `images`, where OpenRouter puts them."""

    role: Literal["assistant"] = "assistant"
    content: list[ChatImagePart | ChatTextPart]
    images: list[ChatImagePart]


class ChatChoice(BaseModel):
    index: int
    message: ChatAssistantMessage
    finish_reason: Literal["stop"] = "stop"


class ChatUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage = ChatUsage()


_TYPE_NAMES = {
    "int_type": "an integer",
    "string_type": "a string",
    "bool_type": "a boolean",
    "float_type": "a number",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
}


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
               dict: "an object", type(None): "null"}

M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], raw: bytes) -> M:
    """Parse a JSON body into `model`; every failure is a 400 that names the parameter, like OpenAI's."""
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, an int of 5000 digits, [[[[... nested
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> InvalidRequest:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    kind = err["type"]
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    if kind in _TYPE_NAMES:
        got = _JSON_NAMES.get(type(err["input"]), "a value")
        return InvalidRequest(
            f"Invalid type for '{param}': expected {_TYPE_NAMES[kind]}, but got {got} instead.",
            param=param,
            code="invalid_type",
        )
    return InvalidRequest(f"Invalid value for '{param}': {err['msg']}.", param=param, code="invalid_value")
