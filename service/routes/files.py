"""`GET /v1/files/{job}/{file}`: stored images, through a signed link or the owner's key."""

from __future__ import annotations

from aiohttp import web

from service.errors import NotFound, PermissionDenied
from service.storage import RESULT_PATTERN, LocalStorage, content_type
from service.state import DISPATCHER, KEYS, STORAGE


async def get_file(request: web.Request) -> web.Response:
    name = f"{request.match_info['job_id']}/{request.match_info['file']}"
    if not RESULT_PATTERN.match(name):
        raise NotFound("No such file.", code="file_not_found")
    storage = request.app[STORAGE]
    expires, signature = request.query.get("expires"), request.query.get("signature")
    if expires is not None or signature is not None:
        assert isinstance(storage, LocalStorage)
        if not storage.signer.verify(name, expires or "", signature or ""):
            raise PermissionDenied("This link is invalid or has expired.", code="invalid_signature")
    else:
        caller = request.app[KEYS].authenticate(request.headers.get("Authorization"))
        await request.app[DISPATCHER].owned(request.match_info["job_id"], caller)
    data = await storage.get(name)
    if data is None:
        raise NotFound("No such file.", code="file_not_found")
    return web.Response(body=data, content_type=content_type(name), headers={"Cache-Control": "private, max-age=3600"})


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/files/{job_id}/{file}", get_file)
