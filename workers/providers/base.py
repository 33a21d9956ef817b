"""The provider interface every back end implements, the progress reporter it talks to, and shared helpers."""

from __future__ import annotations

import binascii
import builtins
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import aiohttp
import pybase64
from pydantic import BaseModel, ConfigDict

from service.errors import UpstreamError, UpstreamRejected
from service.schemas import ImageSpec
from service.settings import DeploymentConfig, ProviderConfig


class ProgressReporter(Protocol):
    """How a provider tells the job what is happening. Both calls are cheap: the job throttles and keeps
    progress monotonic, so a provider may call `update` on every upstream event."""

    async def update(self, fraction: float, stage: str) -> None:
        """`fraction` of the work done (0..1) and a short human stage text ("sampling 12/30")."""

    async def partial_image(self, image: bytes, fmt: str) -> None:
        """An intermediate rendering (`fmt`: png, jpeg or webp)."""


@dataclass
class InputImage:
    """An uploaded image (or mask) for an edit or variation, already checked to be a real PNG/JPEG/WEBP."""

    data: bytes
    format: str  # png | jpeg | webp

    @property
    def content_type(self) -> str:
        return f"image/{self.format}"


@dataclass
class ImageRequest:
    """What a provider is asked to do: the validated spec plus, for edits and variations, the input bytes."""

    spec: ImageSpec
    images: list[InputImage] = field(default_factory=list)
    mask: InputImage | None = None


@dataclass
class GeneratedImage:
    data: bytes
    format: str  # png | jpeg | webp, as sniffed from the bytes
    revised_prompt: str | None = None


@dataclass
class ProviderResult:
    images: list[GeneratedImage]
    usage: dict[str, Any] | None = None
    size: str | None = None
    quality: str | None = None
    background: str | None = None


@dataclass(frozen=True)
class Deployment:
    """One deployment resolved against its provider account: what a provider call needs to know."""

    name: str  # "<model>#<index>", for logs, errors and cooldowns
    provider: str
    upstream_model: str
    base_url: str | None
    api_key: str | None = field(repr=False)  # never in a log line or traceback
    headers: dict[str, str]
    timeout: float
    weight: float
    max_concurrency: int | None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def resolve(cls, public_model: str, index: int, provider_name: str, provider: ProviderConfig,
                deployment: DeploymentConfig) -> Deployment:
        return cls(
            name=f"{public_model}#{index}",
            provider=provider_name,
            upstream_model=deployment.model or public_model,
            base_url=provider.base_url.rstrip("/") if provider.base_url else None,
            api_key=provider.api_key(),
            headers=dict(provider.headers),
            timeout=deployment.timeout or provider.timeout,
            weight=deployment.weight,
            max_concurrency=deployment.max_concurrency,
            options={**provider.options, **deployment.options},
        )


class ProviderOptions(BaseModel):
    """Provider-specific `options` from the config file; subclasses declare their fields."""

    model_config = ConfigDict(extra="forbid")


class Provider(ABC):
    """An image back end.

    One instance per provider account in the config, created at worker start-up with the worker's shared
    HTTP session. `generate` receives an `ImageRequest` (the validated `ImageSpec`, whose `operation` is
    generate, edit or variation, plus the input images of an edit), the deployment to use and a progress
    reporter, and returns the images plus usage. It raises the gateway's
    errors: `UpstreamRejected` for a request the upstream refused (never retried), `UpstreamError` /
    `UpstreamTimeout` for failures worth retrying elsewhere (set `retry_after` when the upstream said so).
    What each provider type can do (edit, variation, streaming, progress) is data in
    `service.models.PROVIDER_CAPABILITIES`, checked before `generate` is called.
    Cancellation arrives as `asyncio.CancelledError`; a provider that started remote work stops it and
    re-raises.
    """

    type: ClassVar[str]
    Options: ClassVar[builtins.type[ProviderOptions]] = ProviderOptions  # `type` is shadowed just above
    # one call runs a whole workflow that may take hours: unless the config sets a `timeout` for it, only the
    # model's timeout bounds it (not the provider's default per-call timeout)
    long_running: ClassVar[bool] = False

    def __init__(self, name: str, config: ProviderConfig, http: aiohttp.ClientSession) -> None:
        self.name = name
        self.config = config
        self.http = http

    def options(self, deployment: Deployment) -> ProviderOptions:
        return self.Options.model_validate(deployment.options)

    def check_deployment(self, deployment: Deployment) -> None:
        """Called at start-up: raise ValueError naming what is wrong (bad options, missing files...)."""
        self.options(deployment)

    @abstractmethod
    async def generate(self, request: ImageRequest, deployment: Deployment, progress: ProgressReporter
                       ) -> ProviderResult:
        ...

    async def close(self) -> None:  # noqa: B027 - an optional hook: most providers hold nothing of their own
        """Release what the provider holds beyond the shared HTTP session."""


def sniff_format(data: bytes) -> str:
    """The image format from its magic bytes; raises UpstreamError for anything that is not PNG/JPEG/WEBP."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise UpstreamError("the upstream returned data that is not a PNG, JPEG or WEBP image", code="bad_upstream_image")


def decode_b64_image(value: str | bytes, revised_prompt: str | None = None) -> GeneratedImage:
    """An image from base64 or a `data:image/...;base64,` URL, as text or as the bytes of that text (a large
    answer's image, never turned into a str)."""
    try:
        raw = value.encode() if isinstance(value, str) else value
        if raw.startswith(b"data:"):
            raw = raw.partition(b",")[2]
        data = pybase64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise UpstreamError("the upstream returned invalid base64 image data", code="bad_upstream_image") from None
    return GeneratedImage(data=data, format=sniff_format(data), revised_prompt=revised_prompt)


def reject_operation(spec: ImageSpec, provider: str) -> UpstreamRejected:
    return UpstreamRejected(f"Model '{spec.model}' ({provider}) cannot {spec.operation} images.",
                            param="model", code="unsupported_operation")
