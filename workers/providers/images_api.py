"""What the upstreams with an OpenAI-like images API share (Volcengine Ark, Zhipu / Z.ai): their
`{"error": {"code", "message", "param"}}` bodies read through a per-provider table of error codes, and the
images they hand over as links, fetched at once with a size cap."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import aiohttp

from service.errors import GatewayError
from workers.providers.base import Deployment, GeneratedImage, sniff_format
from workers.providers.upstream_client import (
    FailureKind,
    JsonAnswer,
    UpstreamClient,
    kind_for_status,
    retry_after,
)

# (fnmatch pattern on the upstream's error code, how the failure is handled, the gateway's error code or None)
ErrorRule = tuple[str, FailureKind, str | None]

CONTENT_POLICY = "content_policy_violation"
MAX_IMAGE_BYTES = 50 * 1024 * 1024


def bearer_headers(deployment: Deployment) -> dict[str, str]:
    """The deployment's own headers plus `Authorization: Bearer <key>` (none without a key: the upstream's
    401 then says so, and `imagegw check-config` warns about the unset variable)."""
    headers = dict(deployment.headers)
    if deployment.api_key:
        headers["Authorization"] = f"Bearer {deployment.api_key}"
    return headers


def error_fields(body: Any) -> tuple[str | None, str, str | None]:
    """(code, message, param) of an `{"error": {...}}` body; Zhipu's codes are numbers, Ark's names."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, "", None
    code, message, param = error.get("code"), error.get("message"), error.get("param")
    return (str(code) if code not in (None, "") else None, str(message or ""),
            param if isinstance(param, str) and param else None)


def upstream_error(client: UpstreamClient, rules: Sequence[ErrorRule], status: int, error: Any,
                   wait: float | None = None) -> GatewayError:
    """The gateway error for an upstream's error object: the first rule matching its code decides, else the
    HTTP status does."""
    code, message, param = error_fields({"error": error})
    kind, gateway_code = kind_for_status(status), None
    if code is not None:
        for pattern, rule_kind, rule_code in rules:
            if fnmatch.fnmatchcase(code, pattern):
                kind, gateway_code = rule_kind, rule_code
                break
    if gateway_code == CONTENT_POLICY:
        param = param or "prompt"
    detail = f"{message or 'no reason given'} [{code}]" if code else message or "no reason given"
    return client.failure(kind, detail, status=status, wait=wait, code=gateway_code, param=param)


def raise_for_status(client: UpstreamClient, rules: Sequence[ErrorRule], answer: JsonAnswer) -> None:
    """Nothing for a 2xx answer; the gateway error for anything else."""
    if answer.status < 300:
        return
    error = answer.body.get("error") if isinstance(answer.body, dict) else None
    if not isinstance(error, dict):
        error = {"message": answer.text}
    raise upstream_error(client, rules, answer.status, error, retry_after(answer.headers))


async def download_image(client: UpstreamClient, url: str, max_bytes: int) -> GeneratedImage:
    """Fetch an image the upstream left at a signed link (no credentials go along, and the link itself, which
    is a bearer token of sorts, stays out of error messages), refused as soon as it grows past `max_bytes`."""
    timeout = aiohttp.ClientTimeout(total=client.deployment.timeout)
    try:
        async with client.http.get(url, timeout=timeout) as resp:
            if resp.status != 200:
                raise client.failure("failed", "downloading the generated image failed", status=resp.status,
                                     code="upstream_download_failed")
            too_large = client.failure("failed", f"the generated image is larger than {max_bytes} bytes",
                                       code="upstream_answer_too_large")
            if (resp.content_length or 0) > max_bytes:
                raise too_large
            chunks, size = [], 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise client.failure(
            "timeout", f"the generated image did not arrive within {client.deployment.timeout:g} s") from None
    except aiohttp.ClientError as exc:
        raise client.failure("failed", f"the generated image could not be downloaded ({type(exc).__name__})",
                             code="upstream_download_failed") from None
    data = b"".join(chunks)
    return GeneratedImage(data=data, format=sniff_format(data))
