"""One error tree: every failure the gateway reports maps to an HTTP status and the OpenAI error shape."""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    """Base of every error that reaches a client as `{"error": {...}}`."""

    status: int = 500
    type: str = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def body(self) -> dict[str, Any]:
        return {"error": self.to_dict()}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_value"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "invalid_request_error"
    default_code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    default_code = "service_unavailable"


class UpstreamError(GatewayError):
    """The upstream provider failed (5xx, bad answer, unreachable)."""

    status = 502
    type = "upstream_error"
    default_code = "upstream_error"
    # seconds the upstream asked us to wait (Retry-After): the router calls that deployment no sooner
    retry_after: float | None = None


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "upstream_timeout"


class UpstreamRejected(InvalidRequest):
    """The upstream refused the request itself (a 4xx caused by its content): never retried."""

    default_code = "upstream_rejected"


class JobCancelled(GatewayError):
    status = 409
    type = "invalid_request_error"
    default_code = "job_cancelled"


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    default_code = "internal_error"


_BY_STATUS: dict[int, type[GatewayError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    408: RequestTimeout,
    409: Conflict,
    413: PayloadTooLarge,
    429: RateLimited,
    503: ServiceUnavailable,
    504: UpstreamTimeout,
}


def error_for_status(status: int, message: str, *, code: str | None = None) -> GatewayError:
    """The gateway error for an HTTP status raised outside our handlers (aiohttp's own 404/405/413...)."""
    cls = _BY_STATUS.get(status, InvalidRequest if 400 <= status < 500 else InternalError)
    error = cls(message, code=code)
    if cls is InvalidRequest and status != 400:
        # keep the exact status of e.g. 405/415 while still using the OpenAI body shape
        error.status = status
    return error


def from_dict(status: int, error: dict[str, Any]) -> GatewayError:
    """Rebuild an error recorded on a job (status plus OpenAI body) so handlers can raise it again."""
    cls = _BY_STATUS.get(status, UpstreamError if status in (502,) else InternalError)
    rebuilt = cls(str(error.get("message", "")), param=error.get("param"), code=error.get("code"))
    rebuilt.status = status
    rebuilt.type = str(error.get("type") or cls.type)
    return rebuilt
