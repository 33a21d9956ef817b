"""Large answers without copies: the upstream answer split as it arrives (long strings set aside), the PNG
integrity check that replaces a full decode, and the streamed images response."""

from __future__ import annotations

import base64
import io
import json
import random
import zlib
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from service.errors import UpstreamError
from service.image_checks import decodes, png_is_whole
from service.results import HeldResult, render_answer, render_result
from service.routes.responses import B64_STEP, model_response, spliced_response
from service.schemas import ImageData, ImagesResponse
from service.state import DISPATCHER, STORAGE
from service.storage import Storage
from tests.conftest import Gateway
from workers.providers.base import decode_b64_image
from workers.providers.json_stream import LONG_STRING, MAX_SPLIT_STRINGS, JsonSplitter, RawString


def split(body: bytes, sizes: list[int], raw_keys: frozenset[str] = frozenset()) -> Any:
    splitter = JsonSplitter()
    pos = 0
    for size in sizes:
        splitter.feed(body[pos:pos + size])
        pos += size
    splitter.feed(body[pos:])
    return splitter.parse(raw_keys)


def taken(value: Any) -> Any:
    if isinstance(value, RawString):
        return value.take().decode()
    if isinstance(value, dict):
        return {key: taken(item) for key, item in value.items()}
    if isinstance(value, list):
        return [taken(item) for item in value]
    return value


LONG = "A" * LONG_STRING
ANSWERS: list[Any] = [
    {"created": 1, "data": [{"b64_json": LONG + "=="}, {"b64_json": "QQ==", "revised_prompt": "a \"cat\"\\"}]},
    {"data": [{"b64_json": LONG.replace("A", "a/", 100)}], "note": "é ✓ \\\\\" \u0000 " * 3},
    {"text": "\\" * (LONG_STRING + 1), "more": ["\"" * 5, "\\\"" * LONG_STRING]},
    [1, 2.5, None, True, {"": ""}],
]


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("escape_slashes", [False, True])
def test_the_split_answer_parses_as_the_whole_one(answer: Any, escape_slashes: bool) -> None:
    body = json.dumps(answer, ensure_ascii=False).encode()
    if escape_slashes:  # as PHP's json_encode and some others write it
        body = body.replace(b"/", b"\\/")
    rng = random.Random(len(body))
    for sizes in ([], [1] * 200, [rng.randint(1, 9000) for _ in range(40)], [len(body) // 2]):
        assert split(body, sizes) == answer
        assert taken(split(body, sizes, frozenset({"b64_json", "text"}))) == answer


def test_a_short_answer_kept_whole_parses_and_reads_as_a_fed_one() -> None:
    answer = {"data": [{"b64_json": "QQ==", "revised_prompt": "a \"cat\" \\ é"}], "list": [1, 2.5, None, True]}
    body = json.dumps(answer).encode()
    kept = JsonSplitter()
    kept.keep(body)
    assert kept.parse(frozenset({"b64_json"})) == split(body, [3] * 10, frozenset({"b64_json"})) == answer
    assert kept.text() == body.decode() and kept.size == len(body)
    with pytest.raises(ValueError):
        kept.keep(b"{}")  # a second answer
    with pytest.raises(ValueError):
        JsonSplitter().keep(b'"' + b"x" * LONG_STRING + b'"')  # it may hold a long string: feed it instead


def test_an_answer_of_many_strings_is_split_only_so_far() -> None:
    answer = {"many": ["x"] * (MAX_SPLIT_STRINGS + 10), "data": [{"b64_json": LONG}]}
    parsed = split(json.dumps(answer).encode(), [5000] * 20, frozenset({"b64_json"}))
    assert parsed == answer  # the image after the limit comes back as a plain string


def test_only_long_strings_under_raw_keys_stay_raw() -> None:
    body = json.dumps({"data": [{"b64_json": LONG, "other": LONG}, {"b64_json": "short"}]}).encode()
    parsed = split(body, [1000], frozenset({"b64_json"}))
    raw = parsed["data"][0]["b64_json"]
    assert isinstance(raw, RawString) and parsed["data"][0]["other"] == LONG
    assert parsed["data"][1]["b64_json"] == "short"
    assert raw.take() == LONG.encode()
    with pytest.raises(RuntimeError):
        raw.take()


def test_text_leaves_long_strings_out_and_broken_answers_fail_to_parse() -> None:
    splitter = JsonSplitter()
    splitter.feed(b'{"error": {"message": "no"}, "junk": "' + LONG.encode() + b'"}')
    assert "no" in splitter.text() and LONG not in splitter.text()
    for broken in (b'{"a": "unterminated', b"<html>Bad gateway</html>", b'{"a": 1'):
        splitter = JsonSplitter()
        splitter.feed(broken)
        with pytest.raises(ValueError):
            splitter.parse()
        assert splitter.text() == broken.decode()


def png(mode: str, size: tuple[int, int] = (67, 31)) -> bytes:
    gradient = Image.linear_gradient("L").resize(size)
    image = gradient.quantize(16) if mode == "P" else gradient.convert(mode)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("mode", ["1", "L", "LA", "RGB", "RGBA", "I;16"])
def test_png_check_accepts_whole_pictures_of_every_kind(mode: str) -> None:
    data = png(mode)
    assert png_is_whole(data) is True and decodes(data)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_png_check_accepts_flat_pictures_that_inflate_a_thousandfold(mode: str) -> None:
    """A single colour (a logo's background, an empty mask): ISA-L takes the whole stream in one call and holds
    output back, which the check must still ask for."""
    out = io.BytesIO()
    Image.new(mode, (2048, 2048)).save(out, "PNG")
    data = out.getvalue()
    assert len(data) < 20_000
    assert png_is_whole(data) is True and decodes(data)
    assert png_is_whole(data[:-30]) is False


def test_pngs_the_check_does_not_cover_go_to_pillow() -> None:
    assert png_is_whole(png("P")) is None and decodes(png("P"))
    assert png_is_whole(rgb_png(bytes(4 * 25), 8, 4, interlace=1)) is None


def test_png_check_refuses_damaged_pictures() -> None:
    good = png("RGB", (256, 256))
    zeroed = bytearray(good)
    zeroed[len(good) // 2:len(good) // 2 + 16] = bytes(16)
    no_end = good[:-12]
    for bad in (good[: len(good) // 2], bytes(zeroed), good[:40], no_end):
        assert png_is_whole(bad) is False and not decodes(bad)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def rgb_png(rows: bytes, width: int, height: int, interlace: int = 0) -> bytes:
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, interlace])
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def test_png_check_refuses_a_bad_filter_type_behind_valid_checksums() -> None:
    """Every checksum right, one row's filter type 9: the pixels do not decode."""
    width, height = 8, 4
    rows = [bytes([0]) + bytes(range(width * 3)) for _ in range(height)]
    assert png_is_whole(rgb_png(b"".join(rows), width, height)) is True
    rows[2] = bytes([9]) + rows[2][1:]
    bad = rgb_png(b"".join(rows), width, height)
    assert png_is_whole(bad) is False and not decodes(bad)
    assert png_is_whole(rgb_png(b"".join(rows[:3]), width, height)) is False  # a row short


def test_png_check_refuses_broken_pixel_data_behind_valid_checksums() -> None:
    """Chunk CRCs written over a damaged zlib stream (an encoder's fault, not the transport's)."""
    good = png("RGB", (256, 256))
    start = good.index(b"IDAT") + 4
    length = int.from_bytes(good[start - 8:start - 4], "big")
    pixels = bytearray(good[start:start + length])
    for at in (len(pixels) // 2, len(pixels) - 2):  # inside the deflate blocks; in the Adler-32
        damaged = bytearray(pixels)
        damaged[at] ^= 0x55
        bad = good[:start - 8] + png_chunk(b"IDAT", bytes(damaged)) + good[start + length + 4:]
        assert png_is_whole(bad) is False and not decodes(bad)


@pytest.mark.parametrize("large", [False, True], ids=["one-write", "streamed"])
async def test_spliced_response_writes_what_model_response_writes(large: bool) -> None:
    mark = "5f3c" * 8
    payloads = [bytes(range(256)) * 7, b"", b"x", b"xy", png("RGB")]
    if large:  # past one base64 step: written a step at a time
        payloads.append(bytes(range(256)) * (2 * B64_STEP // 256 + 1))
    model = ImagesResponse(created=1, data=[ImageData(b64_json=mark, revised_prompt='a "cat" é ✓\n')
                                            for _ in payloads], usage={"total_tokens": 3}, size="64x64")
    whole = model.model_copy(deep=True)
    for item, payload in zip(whole.data, payloads, strict=True):
        item.b64_json = base64.b64encode(payload).decode()

    async def spliced(request: web.Request) -> web.StreamResponse:
        return await spliced_response(request, model, mark, payloads)

    async def plain(request: web.Request) -> web.StreamResponse:
        return model_response(whole)

    app = web.Application()
    app.router.add_get("/spliced", spliced)
    app.router.add_get("/plain", plain)
    async with TestClient(TestServer(app)) as client:
        answers = [await client.get(path) for path in ("/spliced", "/plain")]
        bodies = [await answer.read() for answer in answers]
    assert bodies[0] == bodies[1]
    assert answers[0].headers["Content-Type"] == answers[1].headers["Content-Type"]
    assert answers[0].headers["Content-Length"] == str(len(bodies[1]))


async def test_an_answer_is_made_from_held_images_without_reading_them_back(gateway: Gateway) -> None:
    result = await gateway.client().images.generate(prompt="two lighthouses", n=2, size="256x256")
    job_id = next((gateway.settings.data_dir / "files").glob("*/*-0.png")).name.split("-")[0]  # the only job
    record = await gateway.app[DISPATCHER].store.get(job_id)
    assert record is not None and record.result is not None
    stored = [base64.b64decode(item.b64_json or "") for item in result.data or []]
    held = HeldResult(**dict(record.result)).holding([b"held " + data for data in stored])

    class NoReads:
        async def get(self, name: str) -> bytes | None:
            raise AssertionError(f"{name} was read back")

    answer = await render_answer(record.model_copy(update={"result": held}), cast(Storage, NoReads()))
    assert answer is not None and answer.images == held.data
    assert [item.b64_json for item in answer.response.data] == [answer.mark] * 2
    # read back when nothing is held: what pollers and other front ends get
    again = await render_result(record, gateway.app[STORAGE])
    assert again is not None and [item.b64_json for item in again.data] == [item.b64_json for item in result.data or []]


def test_base64_images_decode_alike_from_text_and_from_bytes() -> None:
    data = png("RGB")
    text = base64.b64encode(data).decode()
    for value in (text, text.encode(), f"data:image/png;base64,{text}", f"data:image/png;base64,{text}".encode()):
        image = decode_b64_image(value)
        assert image.data == data and image.format == "png"
    for broken in (text[:-1], text + "!", "é" + text, b"QQ==QQ==", b"data:image/png;base64,@@@@"):
        with pytest.raises(UpstreamError):
            decode_b64_image(broken)
