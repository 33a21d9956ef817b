"""JSON responses from pydantic models, and the request facts handlers share."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

from service.state import SETTINGS


def model_response(model: BaseModel, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=model.model_dump_json(exclude_none=True), status=status, headers=headers,
                        content_type="application/json")


def base_url(request: web.Request) -> str:
    """Where this gateway is reachable for the caller: settings.public_url, else the request's own host."""
    configured = request.app[SETTINGS].public_url
    return configured.rstrip("/") if configured else f"{request.scheme}://{request.host}"


def wants_async(request: web.Request) -> bool:
    """RFC 7240 `Prefer: respond-async`."""
    prefer = request.headers.get("Prefer", "")
    return any(p.strip().split("=")[0].lower() == "respond-async" for p in prefer.split(","))
