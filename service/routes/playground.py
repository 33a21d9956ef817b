"""`GET /playground`: a page to try the gateway from a browser (static files, no build step)."""

from __future__ import annotations

from aiohttp import web

from service.routes.static import page


def setup(app: web.Application) -> None:
    app.router.add_get("/playground", page("playground/index.html"))
