"""Whether an image's bytes are whole: a truncated or corrupt picture is refused, whether a client uploaded it
(service/uploads.py) or an upstream returned it (workers/router.py)."""

from __future__ import annotations

import io
import struct

from isal import isal_zlib
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# bytes per pixel sample group, by PNG colour type (grey, RGB, grey+alpha, RGBA); palette images go to Pillow
PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
PNG_FILTERS = bytes(range(5))
# inflated a slice at a time: checking a picture costs no memory the size of its pixels
INFLATE_STEP = 1 << 20
INLINE_CHECK_BYTES = 256 * 1024  # inflated pixel bytes checked on the event loop: well under a millisecond


def decodes(data: bytes) -> bool:
    """Whether every pixel decodes: a valid header says nothing about a body cut short or corrupted on its
    way. A PNG is checked by its own integrity layers (`png_is_whole`), anything else decoded by Pillow."""
    if data.startswith(PNG_SIGNATURE) and (whole := png_is_whole(data)) is not None:
        return whole
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:  # noqa: BLE001 - a decoder fed untrusted bytes fails in many ways; all mean "broken"
        return False
    return True


def cheap_to_check(data: bytes) -> bool:
    """Whether `decodes` costs less than a hop to a thread: a PNG whose pixels inflate to a few hundred KiB
    (the header says so, however small the file: a tiny file can inflate to a huge image)."""
    if not data.startswith(PNG_SIGNATURE) or len(data) < 33:
        return False
    length, kind = struct.unpack_from(">I4s", data, len(PNG_SIGNATURE))
    rows = _png_rows(data[16:16 + length]) if kind == b"IHDR" else None
    return rows is not None and rows[1] <= INLINE_CHECK_BYTES


def png_is_whole(data: bytes) -> bool | None:
    """A PNG checked by its own integrity layers, about ten times faster than decoding it with Pillow: every
    chunk's CRC, the zlib stream of the pixels (inflated by ISA-L, ~4x zlib's speed) to its Adler-32 and exact
    length, a valid filter type on every row, and an IEND. None for what this does not cover (interlaced,
    palette or unusual images)."""
    view = memoryview(data)
    pos, rows, inflater, inflated = len(PNG_SIGNATURE), None, isal_zlib.decompressobj(), 0
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data) or isal_zlib.crc32(view[pos + 4:end]) != int.from_bytes(data[end:end + 4]):
            return False
        if kind == b"IHDR":
            rows = _png_rows(data[pos + 8:end])
            if rows is None:
                return None
        elif kind == b"IDAT":
            if rows is None:
                return False
            row_size, expected = rows
            chunk: bytes | memoryview = view[pos + 8:end]
            while True:
                try:
                    out = inflater.decompress(chunk, INFLATE_STEP)
                except Exception:  # noqa: BLE001 - IsalError (its stub types it badly): broken deflate or Adler-32
                    return False
                # each row opens with its filter type, 0 to 4
                if out[-inflated % row_size::row_size].translate(None, PNG_FILTERS):
                    return False
                inflated += len(out)
                if inflated > expected:
                    return False
                chunk = inflater.unconsumed_tail
                # ISA-L, unlike zlib, can take all the input and still hold output back when the step filled up
                # (a flat picture inflates a thousandfold): ask again until a call gives less than a step
                if not chunk and (len(out) < INFLATE_STEP or inflater.eof):
                    break
        elif kind == b"IEND":
            return rows is not None and inflater.eof and inflated == rows[1]
        pos = end + 4
    return False


def _png_rows(header: bytes) -> tuple[int, int] | None:
    """(bytes per row with its filter byte, bytes of all rows) from an IHDR; None when Pillow must judge."""
    if len(header) != 13:
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", header)
    channels = PNG_CHANNELS.get(colour)
    limit = Image.MAX_IMAGE_PIXELS  # Pillow refuses twice this as a decompression bomb; so does this check
    if (channels is None or interlace or compression or filtering or depth not in (1, 2, 4, 8, 16)
            or not width * height or (limit is not None and width * height > 2 * limit)):
        return None
    row_size = 1 + (width * channels * depth + 7) // 8
    return row_size, row_size * height
