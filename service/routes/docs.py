"""`GET /openapi.json` (generated from the routes and their models) and `GET /docs` (Swagger UI on it)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from service.openapi import build_document
from service.routes.static import page

DOCUMENT = web.AppKey("openapi_document", dict[str, Any])


async def build_on_startup(app: web.Application) -> None:
    # the router is frozen by now, so the document is complete and can be built once
    app[DOCUMENT] = build_document(app)


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[DOCUMENT])


def setup(app: web.Application) -> None:
    app.on_startup.append(build_on_startup)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", page("docs/index.html"))
