"""The built-in offline renderer: a deterministic picture drawn from the prompt with Pillow, no network at all."""

from __future__ import annotations

import asyncio
import hashlib
import random

from PIL import Image, ImageDraw, ImageFont
from pydantic import Field

from service.schemas import ImageSpec
from workers.imaging import encode
from workers.providers.base import (
    Deployment,
    GeneratedImage,
    ImageRequest,
    ProgressReporter,
    Provider,
    ProviderOptions,
    ProviderResult,
)

AUTO_SIZE = (1024, 1024)


class LocalOptions(ProviderOptions):
    steps: int = Field(4, ge=1, le=1000, description="painting steps, each reported as progress")
    step_delay: float = Field(0.0, ge=0, le=60, description="seconds to pause per step (demos, tests)")


class Painter:
    """Draws one image for a prompt; the same prompt, seed and index always give the same picture."""

    def __init__(self, spec: ImageSpec, index: int) -> None:
        digest = hashlib.sha256(f"{spec.prompt}\0{spec.seed}\0{index}".encode()).digest()
        self.rng = random.Random(digest)
        dims = spec.dimensions()
        self.width, self.height = dims if dims else AUTO_SIZE
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


class LocalRenderer(Provider):
    """Renders offline: the default back end of embedded mode, and the stand-in for any model in a demo."""

    type = "local"
    Options = LocalOptions

    async def generate(self, request: ImageRequest, deployment: Deployment, progress: ProgressReporter
                       ) -> ProviderResult:
        spec = request.spec
        options = self.options(deployment)
        assert isinstance(options, LocalOptions)
        painters = [Painter(spec, i) for i in range(spec.n)]
        partials_at = {round(options.steps * (k + 1) / (spec.partial_images + 1)) for k in range(spec.partial_images)}
        await progress.update(0.0, "composing")
        for step in range(1, options.steps + 1):
            if options.step_delay:
                await asyncio.sleep(options.step_delay)
            if step in partials_at and step < options.steps:
                preview = await asyncio.to_thread(self._preview, painters[0], step / options.steps)
                await progress.partial_image(preview, "png")
            await progress.update(0.9 * step / options.steps, f"painting {step}/{options.steps}")
        await progress.update(0.95, "encoding")
        images = await asyncio.to_thread(self._finish, painters, spec)
        width, height = painters[0].width, painters[0].height
        return ProviderResult(
            images=images,
            usage=None,
            size=f"{width}x{height}",
            quality=spec.quality if spec.quality not in (None, "auto") else "standard",
            background="transparent" if spec.background == "transparent" else "opaque",
        )

    @staticmethod
    def _preview(painter: Painter, fraction: float) -> bytes:
        # coarser while early: drawn small, then scaled up
        scale = max(0.1, fraction)
        image = painter.paint(fraction)
        small = image.resize((max(1, int(image.width * scale / 4)), max(1, int(image.height * scale / 4))))
        return encode(small.resize(image.size, Image.Resampling.NEAREST), "png", None)

    @staticmethod
    def _finish(painters: list[Painter], spec: ImageSpec) -> list[GeneratedImage]:
        return [
            GeneratedImage(data=encode(p.paint(1.0), spec.output_format, spec.output_compression),
                           format=spec.output_format)
            for p in painters
        ]
