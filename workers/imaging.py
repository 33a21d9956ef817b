"""Pillow helpers shared by providers and the job: encoding to the requested format."""

from __future__ import annotations

import io

from PIL import Image


def encode(image: Image.Image, fmt: str, compression: int | None) -> bytes:
    """Encode in `fmt` (png, jpeg, webp); JPEG has no alpha, so it is flattened onto white."""
    out = io.BytesIO()
    if fmt == "jpeg":
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            flat = Image.new("RGB", image.size, "white")
            flat.paste(image, mask=image.getchannel("A"))
            image = flat
        image.save(out, "JPEG", quality=compression if compression is not None else 95)
    elif fmt == "webp":
        image.save(out, "WEBP", quality=compression if compression is not None else 100)
    else:
        image.save(out, "PNG", compress_level=3)
    return out.getvalue()


def image_size(data: bytes) -> str | None:
    """WIDTHxHEIGHT from the image header, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return f"{image.width}x{image.height}"
    except OSError:
        return None


def convert(data: bytes, fmt: str, compression: int | None) -> bytes:
    """Re-encode an upstream image into the format the client asked for."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return encode(image, fmt, compression)
