"""Input images of edits and variations: reading multipart forms as the OpenAI SDK sends them, resolving
JSON references (URL, data URL, bare base64), and checking every image before a job exists: a real
PNG/JPEG/WEBP by content, within the byte and pixel limits, fully decodable, and a mask with alpha and the
image's dimensions."""

from __future__ import annotations

import asyncio
import binascii
import io
import re
from dataclasses import dataclass, field
from typing import Any

import pybase64
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from PIL import Image

from service.errors import InvalidRequest, PayloadTooLarge
from service.fetch import UrlFetcher, too_large
from service.image_checks import decodes
from service.settings import Settings

PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
MAX_FIELD_BYTES = 1024 * 1024  # a text field (the prompt is the longest: 32000 characters)
IMAGE_FIELDS = ("image", "image[]")
ARRAY_FIELD = re.compile(r"^image\[(\d+)\]$")  # the SDK's "indices" array format
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

Source = bytes | str  # uploaded bytes, or a reference to resolve (URL, data URL, base64)


@dataclass(frozen=True)
class CheckedImage:
    """An input image that passed every check, with the facts later checks and providers need."""

    field: str  # where it came from, for error messages: image, image[1], mask
    data: bytes
    format: str  # png | jpeg | webp
    width: int
    height: int
    has_alpha: bool


@dataclass(frozen=True)
class EditInputs:
    images: list[CheckedImage]
    mask: CheckedImage | None = None


@dataclass
class Form:
    """A multipart request: its text fields and its files, in the order sent."""

    fields: dict[str, str] = field(default_factory=dict)
    images: list[bytes] = field(default_factory=list)
    mask: bytes | None = None


def is_multipart(request: web.Request) -> bool:
    return request.content_type == "multipart/form-data"


async def read_form(request: web.Request, settings: Settings, *, mask: bool) -> Form:
    """Read a multipart body within the body and per-image limits; `image`, `image[]`, `image[N]` are images
    and (when `mask`) `mask` is the mask; everything else is a text field, each at most once."""
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise PayloadTooLarge(f"The request body is too large: at most {settings.max_body_bytes} bytes.")
    try:
        return await _read_parts(request, settings, mask=mask)
    except (ValueError, HttpProcessingError) as exc:
        # how aiohttp reports a body that is not the multipart it claims to be: no or a bad boundary, a
        # body cut short, an oversized part header
        raise InvalidRequest(f"The multipart body is malformed: {exc}", code="invalid_multipart") from None


async def _read_parts(request: web.Request, settings: Settings, *, mask: bool) -> Form:
    form = Form()
    total = 0
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise InvalidRequest("Nested multipart bodies are not supported.", code="invalid_multipart")
        name = part.name or ""
        is_image = name in IMAGE_FIELDS or ARRAY_FIELD.match(name) is not None
        is_file = is_image or (mask and name == "mask")
        limit = settings.max_input_image_bytes if is_file else MAX_FIELD_BYTES
        data = await _read_part(part, limit, field=name, body_left=settings.max_body_bytes - total)
        total += len(data)
        if is_image:
            form.images.append(data)
        elif is_file:
            if form.mask is not None:
                raise InvalidRequest("Only one 'mask' may be given.", param="mask")
            form.mask = data
        elif name in form.fields:
            raise InvalidRequest(f"The parameter '{name}' was given more than once.", param=name)
        else:
            try:
                form.fields[name] = data.decode(part.get_charset("utf-8"))
            except (UnicodeDecodeError, LookupError):
                raise InvalidRequest(f"Invalid '{name}': not valid text.", param=name) from None
    return form


async def _read_part(part: BodyPartReader, limit: int, *, field: str, body_left: int) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(64 * 1024):
        data += chunk
        if len(data) > body_left:
            raise PayloadTooLarge("The request body is too large.")
        if len(data) > limit:
            raise too_large(field, limit)
    return bytes(data)


# Form values are strings; these are coerced explicitly, so the strict JSON model judges them as it would JSON
INT_FIELDS = frozenset({"n", "output_compression", "partial_images", "seed"})
BOOL_FIELDS = frozenset({"stream", "watermark"})
MAX_INT_DIGITS = 20  # beyond any accepted value (the seed is below 2**63)


def coerce_form(fields: dict[str, str]) -> dict[str, Any]:
    """Form strings to the JSON types of the request models; a value that is not one is a 400 naming it."""
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name in INT_FIELDS:
            if not re.fullmatch(r"-?[0-9]+", value.strip()):
                raise _wrong_type(name, "an integer")
            if len(value.strip()) > MAX_INT_DIGITS:  # int() refuses thousands of digits; all are out of range
                raise InvalidRequest(f"Invalid value for '{name}': out of range.", param=name)
            values[name] = int(value)
        elif name in BOOL_FIELDS:
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise _wrong_type(name, "a boolean")
            values[name] = lowered in ("true", "1")
        else:
            values[name] = value
    return values


def _wrong_type(name: str, expected: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid type for '{name}': expected {expected}, but got a string instead.",
                          param=name, code="invalid_type")


def image_fields(count: int) -> list[str]:
    """How the images of a request are named in errors: `image` alone, else `image[0]`, `image[1]`..."""
    return ["image"] if count == 1 else [f"image[{i}]" for i in range(count)]


def decode_reference(value: str, field: str, max_bytes: int) -> bytes:
    """A data URL or bare base64 image; URLs are the fetcher's business."""
    payload = value
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise InvalidRequest(f"Invalid '{field}': data URLs must be base64-encoded.", param=field,
                                 code="invalid_image")
    payload = "".join(payload.split())  # line-wrapped base64 is common
    if len(payload) * 3 // 4 > max_bytes:
        raise too_large(field, max_bytes)
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"Invalid '{field}': expected an http(s) URL, a data URL or base64 image data.",
                             param=field, code="invalid_image") from None


async def resolve_source(source: Source, field: str, settings: Settings, fetcher: UrlFetcher) -> bytes:
    if isinstance(source, bytes):
        return source
    if source.startswith(("http://", "https://")):
        return await fetcher.fetch(source, field)
    if SCHEME.match(source) and not source.startswith("data:"):
        raise InvalidRequest(f"Invalid '{field}': only http and https URLs can be fetched.", param=field,
                             code="invalid_image_url")
    return decode_reference(source, field, settings.max_input_image_bytes)


def inspect_image(data: bytes, field: str, max_pixels: int) -> CheckedImage:
    """Identify by content, refuse huge declared dimensions, then check that every pixel decodes (a PNG by its
    integrity layers, about ten times faster than decoding it). Runs in a thread: checking is CPU work."""
    if not data:
        raise InvalidRequest(f"Invalid '{field}': the file is empty.", param=field, code="invalid_image")
    try:
        image = Image.open(io.BytesIO(data), formats=list(PIL_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own bomb guard; its warning is an error only where warnings are (tests), our check follows
        raise _too_many_pixels(field, max_pixels) from None
    except Exception:  # noqa: BLE001 - a decoder fed untrusted bytes fails in many ways; all mean "not an image"
        raise InvalidRequest(f"Invalid '{field}': not a PNG, JPEG or WEBP image.", param=field,
                             code="invalid_image_format") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise _too_many_pixels(field, max_pixels)
        if not decodes(data):
            raise InvalidRequest(f"Invalid '{field}': the image data is truncated or corrupt.", param=field,
                                 code="invalid_image")
        has_alpha = image.mode in ALPHA_MODES or "transparency" in image.info
        return CheckedImage(field=field, data=data, format=PIL_FORMATS[str(image.format)], width=width,
                            height=height, has_alpha=has_alpha)


def _too_many_pixels(field: str, max_pixels: int) -> InvalidRequest:
    return InvalidRequest(f"Invalid '{field}': the image has more than {max_pixels} pixels.", param=field,
                          code="image_too_large")


def check_mask(mask: CheckedImage, image: CheckedImage) -> None:
    """OpenAI's rules: a PNG whose transparent pixels mark where to edit, the size of the (first) image."""
    if mask.format != "png":
        raise InvalidRequest(f"Invalid 'mask': must be a PNG image, got {mask.format.upper()}.", param="mask",
                             code="invalid_image_format")
    if not mask.has_alpha:
        raise InvalidRequest("Invalid 'mask': must have an alpha channel; its transparent pixels mark where "
                             "to edit.", param="mask", code="invalid_mask")
    if (mask.width, mask.height) != (image.width, image.height):
        raise InvalidRequest(
            f"Invalid 'mask': its dimensions ({mask.width}x{mask.height}) must match those of "
            f"'{image.field}' ({image.width}x{image.height}).", param="mask", code="invalid_mask")


async def check_inputs(images: list[Source], mask: Source | None, settings: Settings, fetcher: UrlFetcher, *,
                       fields: list[str] | None = None) -> EditInputs:
    """Resolve and check every input (URLs fetched concurrently); the first failure, naming its field, wins.
    `fields` names the images in errors when they did not come from `image` parameters."""
    if not images:
        raise InvalidRequest("Missing required parameter: 'image'.", param="image",
                             code="missing_required_parameter")
    if len(images) > settings.max_input_images:
        raise InvalidRequest(f"Invalid 'image': at most {settings.max_input_images} images are supported.",
                             param="image", code="too_many_images")
    named = list(zip(fields or image_fields(len(images)), images, strict=True))
    if mask is not None:
        named.append(("mask", mask))

    async def one(name: str, source: Source) -> CheckedImage:
        data = await resolve_source(source, name, settings, fetcher)
        if len(data) > settings.max_input_image_bytes:
            raise too_large(name, settings.max_input_image_bytes)
        return await asyncio.to_thread(inspect_image, data, name, settings.max_input_pixels)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(name, source)) for name, source in named]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    checked = [task.result() for task in tasks]
    if mask is None:
        return EditInputs(images=checked)
    check_mask(checked[-1], checked[0])
    return EditInputs(images=checked[:-1], mask=checked[-1])
