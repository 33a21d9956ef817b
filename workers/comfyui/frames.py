"""ComfyUI's binary WebSocket frames: a big-endian uint32 event type, then an event-specific body."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
IMAGE_FORMATS = {1: "jpeg", 2: "png"}


@dataclass(frozen=True)
class BinaryFrame:
    event: int
    image: bytes | None = None
    image_format: str | None = None
    metadata: dict[str, Any] | None = None  # type 4: prompt_id, node_id, display_node_id...
    node_id: str | None = None  # type 3
    text: str | None = None


def decode(frame: bytes) -> BinaryFrame | None:
    """Decode one binary frame; None for event types this client does not know (newer servers add some)."""
    if len(frame) < 4:
        return None
    (event,) = struct.unpack(">I", frame[:4])
    body = frame[4:]
    if event == PREVIEW_IMAGE and len(body) >= 4:
        (fmt,) = struct.unpack(">I", body[:4])
        return BinaryFrame(event, image=body[4:], image_format=IMAGE_FORMATS.get(fmt, "png"))
    if event == PREVIEW_IMAGE_WITH_METADATA and len(body) >= 4:
        (length,) = struct.unpack(">I", body[:4])
        try:
            metadata = json.loads(body[4:4 + length])
        except ValueError:
            return None
        image = body[4 + length:]
        fmt = str(metadata.get("image_type", "")).removeprefix("image/") or _sniff(image)
        fmt = "jpeg" if fmt == "jpg" else fmt
        return BinaryFrame(event, image=image, image_format=fmt, metadata=metadata)
    if event == TEXT and len(body) >= 4:
        (length,) = struct.unpack(">I", body[:4])
        return BinaryFrame(event, node_id=body[4:4 + length].decode(errors="replace"),
                           text=body[4 + length:].decode(errors="replace"))
    return None


def _sniff(image: bytes) -> str:
    return "jpeg" if image.startswith(b"\xff\xd8") else "png"
