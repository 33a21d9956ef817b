"""JSON responses from pydantic models, and the request facts handlers share."""

from __future__ import annotations

from collections.abc import Sequence

import pybase64
from aiohttp import web
from pydantic import BaseModel

from service.state import SETTINGS

# raw bytes base64-encoded per write: whole 3-byte groups, 1 MiB of text
B64_STEP = 3 * 256 * 1024


def model_response(model: BaseModel, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=model.model_dump_json(exclude_none=True), status=status, headers=headers,
                        content_type="application/json")


async def spliced_response(request: web.Request, model: BaseModel, mark: str, payloads: Sequence[bytes]
                           ) -> web.StreamResponse:
    """`model` as `model_response` writes it, with its string values `mark` replaced in order by the base64 of
    `payloads`, encoded and written a step at a time: the answer never exists whole, its length is known."""
    parts = model.model_dump_json(exclude_none=True).encode().split(mark.encode())
    if len(parts) != len(payloads) + 1:
        raise ValueError(f"{len(parts) - 1} marks for {len(payloads)} payloads")
    length = sum(map(len, parts)) + sum(4 * ((len(p) + 2) // 3) for p in payloads)
    if length <= B64_STEP:  # small: one write with the headers beats a write per piece
        pieces = [piece for part, payload in zip(parts, payloads, strict=False)
                  for piece in (part, pybase64.b64encode(payload))]
        return web.Response(body=b"".join([*pieces, parts[-1]]), content_type="application/json")
    response = web.StreamResponse()
    response.content_type = "application/json"
    response.content_length = length
    await response.prepare(request)
    try:
        for part, payload in zip(parts[:-1], payloads, strict=True):
            await response.write(part)
            view = memoryview(payload)
            for start in range(0, len(view), B64_STEP):
                await response.write(pybase64.b64encode(view[start:start + B64_STEP]))
        await response.write(parts[-1])
        await response.write_eof()
    except ConnectionResetError:  # the client went away: nothing left to answer
        pass
    return response


def base_url(request: web.Request) -> str:
    """Where this gateway is reachable for the caller: settings.public_url, else the request's own host."""
    configured = request.app[SETTINGS].public_url
    return configured.rstrip("/") if configured else f"{request.scheme}://{request.host}"


def wants_async(request: web.Request) -> bool:
    """RFC 7240 `Prefer: respond-async`."""
    prefer = request.headers.get("Prefer", "")
    return any(p.strip().split("=")[0].lower() == "respond-async" for p in prefer.split(","))
