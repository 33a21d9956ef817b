"""The built-in offline renderer: a deterministic picture drawn from the prompt with Pillow, no network at all."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
from typing import Protocol

from PIL import Image, ImageDraw, ImageFont
from pydantic import Field

from service.schemas import ImageSpec
from workers.imaging import encode
from workers.providers.base import (
    Deployment,
    GeneratedImage,
    ImageRequest,
    InputImage,
    ProgressReporter,
    Provider,
    ProviderOptions,
    ProviderResult,
)

AUTO_SIZE = (1024, 1024)
# how much of the painting shows through where an input image is painted over
EDIT_STRENGTH = 0.6
VARIATION_STRENGTH = 0.35


class LocalOptions(ProviderOptions):
    steps: int = Field(4, ge=1, le=1000, description="painting steps, each reported as progress")
    step_delay: float = Field(0.0, ge=0, le=60, description="seconds to pause per step (demos, tests)")


class Painter:
    """Draws one image for a prompt; the same prompt, seed and index always give the same picture."""

    def __init__(self, spec: ImageSpec, index: int, size: tuple[int, int] | None = None,
                 salt: bytes = b"") -> None:
        digest = hashlib.sha256(f"{spec.prompt}\0{spec.seed}\0{index}".encode() + salt).digest()
        self.rng = random.Random(digest)
        self.width, self.height = size or spec.dimensions() or AUTO_SIZE
        self.transparent = spec.background == "transparent"
        self.prompt = spec.prompt
        self.shapes = [self._shape() for _ in range(12)]
        self.colors = (self._color(), self._color())

    def _color(self, alpha: int = 255) -> tuple[int, int, int, int]:
        return (self.rng.randrange(256), self.rng.randrange(256), self.rng.randrange(256), alpha)

    def _shape(self) -> tuple[str, tuple[float, float, float, float], tuple[int, int, int, int]]:
        x, y = self.rng.random(), self.rng.random()
        r = 0.05 + self.rng.random() * 0.25
        kind = self.rng.choice(["ellipse", "rectangle"])
        return kind, (x - r, y - r, x + r, y + r), self._color(200)

    def paint(self, fraction: float) -> Image.Image:
        """The picture with the first `fraction` of its shapes: partial renderings grow towards the final one."""
        w, h = self.width, self.height
        if self.transparent:
            image = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        else:
            top, bottom = self.colors
            gradient = Image.linear_gradient("L").resize((w, h))
            image = Image.composite(Image.new("RGBA", (w, h), bottom), Image.new("RGBA", (w, h), top), gradient)
        draw = ImageDraw.Draw(image, "RGBA")
        for kind, (x0, y0, x1, y1), color in self.shapes[: max(1, round(len(self.shapes) * fraction))]:
            box = (x0 * w, y0 * h, max(x0 * w, x1 * w), max(y0 * h, y1 * h))
            (draw.ellipse if kind == "ellipse" else draw.rectangle)(box, fill=color)
        if fraction >= 1:
            font = ImageFont.load_default(size=max(10, min(w, h) // 24))
            draw.text((w * 0.04, h * 0.9), self.prompt[:60], fill=(255, 255, 255, 255), font=font)
        return image if self.transparent else image.convert("RGB")


class Canvas(Protocol):
    width: int
    height: int

    def paint(self, fraction: float) -> Image.Image: ...


class InputCanvas:
    """An edit or variation: the (first) input image with a painting blended over it, only where the mask is
    transparent (everywhere without a mask). Further input images appear as thumbnails in the painting."""

    def __init__(self, request: ImageRequest, index: int) -> None:
        spec = request.spec
        source = _open(request.images[0])
        self.width, self.height = size = spec.dimensions() or source.size
        base = source.convert("RGBA")
        self.base = base.resize(size) if base.size != size else base
        has_alpha = source.mode in ("RGBA", "LA", "PA") or "transparency" in source.info
        self.keep_alpha = has_alpha or spec.background == "transparent"
        salt = hashlib.sha256(request.images[0].data).digest()
        self.painter = Painter(spec, index, size=size, salt=salt)
        self.strength = VARIATION_STRENGTH if spec.operation == "variation" else EDIT_STRENGTH
        self.references = [_open(image).convert("RGBA") for image in request.images[1:]]
        self.region: Image.Image | None = None
        if request.mask is not None:
            # OpenAI's rule: the fully transparent pixels of the mask are the ones to edit
            alpha = _open(request.mask).convert("RGBA").getchannel("A")
            self.region = alpha.point(lambda a: 255 if a == 0 else 0).resize(size, Image.Resampling.NEAREST)

    def paint(self, fraction: float) -> Image.Image:
        layer = self.painter.paint(fraction).convert("RGBA")
        tile = max(1, min(self.width, self.height) // 5)
        for i, reference in enumerate(self.references):
            layer.paste(reference.resize((tile, tile)), (min(i * tile, self.width - tile), 0))
        painted = Image.blend(self.base, layer, self.strength)
        image = painted if self.region is None else Image.composite(painted, self.base, self.region)
        return image if self.keep_alpha else image.convert("RGB")


def _open(image: InputImage) -> Image.Image:
    with Image.open(io.BytesIO(image.data)) as opened:
        opened.load()
        return opened.copy()


class LocalRenderer(Provider):
    """Renders offline: the default back end of embedded mode, and the stand-in for any model in a demo."""

    type = "local"
    Options = LocalOptions

    async def generate(self, request: ImageRequest, deployment: Deployment, progress: ProgressReporter
                       ) -> ProviderResult:
        spec = request.spec
        options = self.options(deployment)
        assert isinstance(options, LocalOptions)
        canvases = await asyncio.to_thread(self._canvases, request)
        # partial k shows the painting (k + 1) / (partials + 1) of the way, whatever the number of steps
        partials = [(k + 1) / (spec.partial_images + 1) for k in range(spec.partial_images)]
        await progress.update(0.0, "composing")
        for step in range(1, options.steps + 1):
            if options.step_delay:
                await asyncio.sleep(options.step_delay)
            while partials and partials[0] <= step / options.steps:
                preview = await asyncio.to_thread(self._preview, canvases[0], partials.pop(0))
                await progress.partial_image(preview, "png")
            await progress.update(0.9 * step / options.steps, f"painting {step}/{options.steps}")
        await progress.update(0.95, "encoding")
        images = await asyncio.to_thread(self._finish, canvases, spec)
        width, height = canvases[0].width, canvases[0].height
        return ProviderResult(
            images=images,
            usage=None,
            size=f"{width}x{height}",
            quality=spec.quality if spec.quality not in (None, "auto") else "standard",
            background="transparent" if spec.background == "transparent" else "opaque",
        )

    @staticmethod
    def _canvases(request: ImageRequest) -> list[Canvas]:
        spec = request.spec
        if spec.operation == "generate":
            return [Painter(spec, i) for i in range(spec.n)]
        return [InputCanvas(request, i) for i in range(spec.n)]

    @staticmethod
    def _preview(canvas: Canvas, fraction: float) -> bytes:
        # coarser while early: drawn small, then scaled up
        scale = max(0.1, fraction)
        image = canvas.paint(fraction)
        small = image.resize((max(1, int(image.width * scale / 4)), max(1, int(image.height * scale / 4))))
        return encode(small.resize(image.size, Image.Resampling.NEAREST), "png", None)

    @staticmethod
    def _finish(canvases: list[Canvas], spec: ImageSpec) -> list[GeneratedImage]:
        return [
            GeneratedImage(data=encode(c.paint(1.0), spec.output_format, spec.output_compression),
                           format=spec.output_format)
            for c in canvases
        ]
