"""Retry policy for upstream calls: backoff delays, deployment cooldowns, the error once every try failed."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from service.errors import UpstreamError, UpstreamTimeout
from service.settings import RetryConfig
from workers.providers.base import Deployment

# Failures that calling the same deployment again cannot fix; another deployment may still serve.
# A ComfyUI node that raised (workflow_failed) fails the same way on the next run of the same workflow.
PERMANENT_CODES = frozenset({"upstream_auth_failed", "upstream_account_error", "workflow_failed"})


def backoff_delay(policy: RetryConfig, failures: int, retry_after: float | None) -> float:
    """Seconds before calling a deployment again after its `failures`-th failure in one request: exponential,
    with "equal jitter" (half fixed, half random) so retries of concurrent requests spread out, and never
    sooner than the upstream's Retry-After."""
    ceiling = min(policy.max_backoff, policy.backoff * 2 ** (failures - 1))
    return max(random.uniform(ceiling / 2, ceiling), retry_after or 0.0)


class Cooldowns:
    """Deployments that failed recently. The router skips them while another deployment can serve, so one bad
    upstream costs one failed call per cooldown instead of one per request."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def start(self, name: str, seconds: float) -> None:
        self._until[name] = max(self._until.get(name, 0.0), time.monotonic() + seconds)

    def clear(self, name: str) -> None:
        self._until.pop(name, None)

    def active(self, name: str) -> bool:
        return self._until.get(name, 0.0) > time.monotonic()


@dataclass
class Failure:
    deployment: Deployment
    error: UpstreamError


def exhausted(model: str, failures: list[Failure]) -> UpstreamError:
    """One error for a request nobody could serve, naming every upstream tried and why it failed. Each
    provider's message already names its upstream and holds no credentials."""
    if len(failures) == 1:
        return failures[0].error
    reasons = "; ".join(f"({i}) {f.error.message.rstrip('.')}" for i, f in enumerate(failures, 1))
    message = f"No upstream could serve model '{model}' after {len(failures)} attempts: {reasons}."
    if all(isinstance(f.error, UpstreamTimeout) for f in failures):
        return UpstreamTimeout(message)
    codes = {f.error.code for f in failures}
    return UpstreamError(message, code=codes.pop() if len(codes) == 1 else "upstreams_failed")
