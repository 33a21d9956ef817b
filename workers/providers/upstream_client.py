"""Outbound JSON calls to an upstream API: the deployment's timeout, a cap on the answer's size, transport
failures and HTTP statuses turned into the gateway's errors, and credentials kept out of every message."""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import aiohttp
from multidict import CIMultiDictProxy

from service.errors import GatewayError, UpstreamError, UpstreamRejected, UpstreamTimeout
from workers.providers.base import Deployment
from workers.providers.json_stream import LONG_STRING, JsonSplitter

# JSON answers carry base64 images: several 4K pictures fit well below this
MAX_ANSWER_BYTES = 128 * 1024 * 1024
MAX_DETAIL_CHARS = 500

FailureKind = Literal["rejected", "auth", "rate_limited", "timeout", "failed"]

# What an HTTP status means when the provider's own error code says nothing more specific
KIND_BY_STATUS: dict[int, FailureKind] = {401: "auth", 403: "auth", 408: "timeout", 429: "rate_limited",
                                          504: "timeout"}


def kind_for_status(status: int) -> FailureKind:
    return KIND_BY_STATUS.get(status, "rejected" if 400 <= status < 500 else "failed")


def retry_after(headers: CIMultiDictProxy[str]) -> float | None:
    """Seconds from a `Retry-After` header, in either of its forms (delta-seconds or an HTTP date), or from
    OpenAI's finer `retry-after-ms`."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@dataclass
class JsonAnswer:
    status: int
    headers: CIMultiDictProxy[str]
    body: Any  # the parsed JSON, None when the answer was not JSON
    text: str  # the answer as text, its long strings (images) left out


class UpstreamClient:
    """One request's view of one deployment: posts JSON and names the upstream in every error it raises."""

    def __init__(self, http: aiohttp.ClientSession, provider_type: str, deployment: Deployment) -> None:
        self.http = http
        self.deployment = deployment
        self.who = f"Upstream '{deployment.provider}' ({provider_type}, model '{deployment.upstream_model}')"

    def redact(self, text: str) -> str:
        """`text` shortened, with the credential blanked out should the upstream echo it."""
        key = self.deployment.api_key
        if key:
            text = text.replace(key, "[redacted]")
        return text if len(text) <= MAX_DETAIL_CHARS else text[:MAX_DETAIL_CHARS] + "..."

    def failure(self, kind: FailureKind, detail: str, *, status: int | None = None, wait: float | None = None,
                code: str | None = None, param: str | None = None) -> GatewayError:
        """The gateway error for a failed call; `detail` is the upstream's own words."""
        detail = self.redact(detail)
        http = f"HTTP {status}: " if status is not None else ""
        error: GatewayError
        if kind == "rejected":
            error = UpstreamRejected(f"{self.who} rejected the request: {http}{detail}", code=code,
                                     param=param)
        elif kind == "auth":
            error = UpstreamError(f"{self.who} refused the gateway's credentials: {http}{detail}",
                                  code=code or "upstream_auth_failed")
        elif kind == "rate_limited":
            error = UpstreamError(f"{self.who} is rate limiting the gateway: {http}{detail}",
                                  code=code or "upstream_rate_limited")
        elif kind == "timeout":
            error = UpstreamTimeout(f"{self.who} timed out: {http}{detail}", code=code)
        else:
            error = UpstreamError(f"{self.who} failed: {http}{detail}", code=code)
        if wait is not None and isinstance(error, UpstreamError):
            error.retry_after = wait  # the router waits at least this long before calling it again
        return error

    async def post_json(self, url: str, payload: dict[str, Any], headers: dict[str, str], *,
                        raw_keys: frozenset[str] = frozenset()) -> JsonAnswer:
        """The JSON answer; its long strings under `raw_keys` (base64 images) are `RawString`s, taken once."""
        return await self._post(url, headers, raw_keys, json=payload)

    async def post_form(self, url: str, form: aiohttp.FormData, headers: dict[str, str], *,
                        raw_keys: frozenset[str] = frozenset()) -> JsonAnswer:
        """A multipart body (image edits with their files), answered in JSON like `post_json`."""
        return await self._post(url, headers, raw_keys, data=form)

    async def _post(self, url: str, headers: dict[str, str], raw_keys: frozenset[str], **body: Any
                    ) -> JsonAnswer:
        timeout = aiohttp.ClientTimeout(total=self.deployment.timeout)
        try:
            async with self.http.post(url, headers=headers, timeout=timeout, **body) as resp:
                answer = await self._read(resp)
                status, answer_headers = resp.status, resp.headers
        except TimeoutError:
            raise self.failure("timeout", f"no answer within {self.deployment.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise self.failure("failed", f"could not be reached ({type(exc).__name__}: {exc})",
                               code="upstream_unreachable") from None
        text = answer.text()
        try:
            parsed = answer.parse(raw_keys)
        except ValueError:
            parsed = None
        if parsed is None and status < 400:
            raise self.failure("failed", f"the answer is not JSON: {text[:200]!r}", status=status,
                               code="bad_upstream_answer")
        return JsonAnswer(status=status, headers=answer_headers, body=parsed, text=text)

    async def _read(self, resp: aiohttp.ClientResponse) -> JsonSplitter:
        """The whole body, split as it arrives, refused as soon as it grows past the cap instead of after
        buffering it all."""
        answer = JsonSplitter()
        if resp.content_length is not None and resp.content_length < LONG_STRING:
            answer.keep(await resp.read())  # the common small answer (errors, URLs): nothing to split
            return answer
        if (resp.content_length or 0) <= MAX_ANSWER_BYTES:
            async for chunk in resp.content.iter_any():
                if answer.size + len(chunk) > MAX_ANSWER_BYTES:
                    break
                answer.feed(chunk)
            else:
                return answer
        raise self.failure("failed", f"the answer is larger than {MAX_ANSWER_BYTES} bytes",
                           status=resp.status, code="upstream_answer_too_large")
