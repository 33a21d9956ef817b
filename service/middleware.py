"""The middlewares: every request is tagged, timed and counted; every failure becomes an OpenAI-shaped error;
every API call is authenticated."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from service.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    RequestTimeout,
    ServiceUnavailable,
    error_for_status,
)
from service.logs import REQUEST_ID, REQUEST_ID_HEADER, request_id_from
from service.state import KEYS, METRICS, PRINCIPAL, REQUEST_ID_KEY, SETTINGS

log = logging.getLogger(__name__)

# reachable without a key: probes, the signed-file links (the signature is the credential), the page, the
# Socket.IO transport (which authenticates in its own connect handler)
PUBLIC_PREFIXES = ("/healthz", "/readyz", "/metrics", "/v1/files/", "/playground", "/docs", "/openapi.json",
                   "/socket.io/", "/static/")


PROBES = ("/healthz", "/readyz", "/metrics")
access_log = logging.getLogger("imagegw.access")


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: the request id (the caller's X-Request-ID or a new one) for the answer and every log line,
    then one access-log line and the HTTP metrics. Paths are logged without their query (signed links)."""
    request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
    REQUEST_ID.set(request_id)
    request[REQUEST_ID_KEY] = request_id
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # what error_middleware lets through: redirects
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        elapsed = time.perf_counter() - started
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[METRICS].observe(route, request.method, status, elapsed)
        level = logging.DEBUG if request.path.startswith(PROBES) else logging.INFO
        if access_log.isEnabledFor(level):  # its fields are not gathered for nothing
            caller = request.get(PRINCIPAL)
            access_log.log(level, "%s %s %d", request.method, request.path, status,
                           extra={"method": request.method, "path": request.path, "route": route, "status": status,
                                  "duration_ms": round(elapsed * 1000, 1),
                                  "key_id": caller.key_id if caller is not None else None})


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: also streamed answers, whose headers are gone before the handler returns."""
    request_id = request.get(REQUEST_ID_KEY)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id


async def close_after_broken_body(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: aiohttp drops the connection after a request whose body failed to parse (bad
    framing or encoding), even one the handler never read; the answer says so, or the client would send its
    next request on a connection about to close."""
    if request.content.exception() is not None:
        response.force_close()
        response.headers["Connection"] = "close"  # the headers are already made: say it there too


def error_response(error: GatewayError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc)
    except web.RequestPayloadError as exc:  # the body itself is broken: bad chunked framing or encoding
        return error_response(InvalidRequest(f"The request body could not be read: {exc}",
                                             code="invalid_body"))
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
async def body_deadline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A client must finish sending its body within `body_read_timeout`. aiohttp has no such timeout, so one
    that dribbles its body (slow loris) would hold a handler, and what it buffered, for as long as it likes.
    The deadline is lifted when the last byte arrives: waiting for a job afterwards is not bounded here."""
    if request.content.is_eof():  # no body, or all of it already received
        return await handler(request)
    deadline = asyncio.timeout(request.app[SETTINGS].body_read_timeout)
    running = True

    def body_received() -> None:
        if running:
            deadline.reschedule(None)

    try:
        async with deadline:
            request.content.on_eof(body_received)
            return await handler(request)
    except TimeoutError:
        if not deadline.expired():
            raise
        response = error_response(RequestTimeout(
            f"The request body was not received within {request.app[SETTINGS].body_read_timeout:g} s."))
        response.force_close()  # the rest of the body is not wanted
        return response
    finally:
        running = False


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(PUBLIC_PREFIXES):
        request[PRINCIPAL] = await request.app[KEYS].authenticate(request.headers.get("Authorization"))
    return await handler(request)
