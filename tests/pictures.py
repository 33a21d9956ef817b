"""Input pictures for the edit, variation, chat and fetch tests, and decoding what comes back."""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageDraw


def photo(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """A busy RGB picture: every pixel differs from its neighbours, so any repaint shows."""
    width, height = size
    image = Image.new("RGB", size)
    image.putdata([((x * 4 + seed) % 256, (y * 4 + 2 * seed) % 256, (x * y + seed) % 256)
                   for y in range(height) for x in range(width)])
    return image


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def png(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    return encode(photo(size, seed))


def mask_png(size: tuple[int, int], hole: tuple[int, int, int, int]) -> bytes:
    """Opaque everywhere except the transparent rectangle `hole`: the area to edit."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle(hole, fill=(0, 0, 0, 0))
    return encode(mask)


def data_url(data: bytes, fmt: str = "png") -> str:
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"


def decode(b64: str | None) -> Image.Image:
    assert b64
    return Image.open(io.BytesIO(base64.b64decode(b64)))
