"""`GET /v1/files/{job}/{file}`: stored images, through a signed link or the owner's key."""

from __future__ import annotations

from aiohttp import web

from service.errors import NotFound, PermissionDenied
from service.openapi import IMAGE_TYPES, Media, api
from service.schemas import FileQuery
from service.state import DISPATCHER, KEYS, STORAGE
from service.storage import RESULT_PATTERN, LocalStorage, content_type


@api("Download a result image", tags="Files", responses={200: Media(IMAGE_TYPES)}, errors=(401, 403, 404),
     query=FileQuery, auth="optional",
     description="With `expires` and `signature` from a signed `url` result no key is needed; otherwise the "
                 "job owner's key is.")
async def get_file(request: web.Request) -> web.Response:
    name = f"{request.match_info['job_id']}/{request.match_info['file']}"
    if not RESULT_PATTERN.match(name):
        raise NotFound("No such file.", code="file_not_found")
    storage = request.app[STORAGE]
    query = FileQuery.model_validate(dict(request.query))
    if query.expires is not None or query.signature is not None:
        # only local storage signs links to this route; object storage hands out its own presigned URLs
        signer = storage.signer if isinstance(storage, LocalStorage) else None
        if signer is None or not signer.verify(name, query.expires or "", query.signature or ""):
            raise PermissionDenied("This link is invalid or has expired.", code="invalid_signature")
    else:
        caller = await request.app[KEYS].authenticate(request.headers.get("Authorization"))
        await request.app[DISPATCHER].owned(request.match_info["job_id"], caller)
    data = await storage.get(name)
    if data is None:
        raise NotFound("No such file.", code="file_not_found")
    return web.Response(body=data, content_type=content_type(name), headers={"Cache-Control": "private, max-age=3600"})


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/files/{job_id}/{file}", get_file)
