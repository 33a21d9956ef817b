"""The package's static files: the playground and docs pages and the browser libraries they load."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def page(relative: str) -> Handler:
    """A handler answering with one HTML file from the static directory."""
    path = STATIC_DIR / relative

    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    return handler


def setup(app: web.Application) -> None:
    app.router.add_static("/static/", STATIC_DIR)
