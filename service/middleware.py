"""The two middlewares: every failure becomes an OpenAI-shaped error; every API call is authenticated."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from redis.exceptions import RedisError

from service.errors import GatewayError, InternalError, ServiceUnavailable, error_for_status
from service.state import KEYS, PRINCIPAL

log = logging.getLogger(__name__)

# reachable without a key: probes, the signed-file links (the signature is the credential), the page, the
# Socket.IO transport (which authenticates in its own connect handler)
PUBLIC_PREFIXES = ("/healthz", "/readyz", "/metrics", "/v1/files/", "/playground", "/docs", "/openapi.json",
                   "/socket.io/", "/static/")


def error_response(error: GatewayError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc)
    except (RedisError, OSError) as exc:
        # Redis unreachable: fail fast with a retryable status instead of hanging or a bare 500
        log.warning("storage unavailable on %s %s: %s", request.method, request.path, exc)
        return error_response(ServiceUnavailable("The gateway's job store is unavailable; retry shortly.",
                                                 headers={"Retry-After": "1"}))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.reason if exc.status != 413 else "The request body is too large."
        error = error_for_status(exc.status, f"{message} ({request.method} {request.path})")
        response = error_response(error)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:  # never a stack trace or an HTML page to the client; CancelledError passes through
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(InternalError("The server had an error while processing your request."))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(PUBLIC_PREFIXES):
        request[PRINCIPAL] = request.app[KEYS].authenticate(request.headers.get("Authorization"))
    return await handler(request)
