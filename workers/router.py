"""From a public model name to a provider call: deployments, load spreading, retries, fallback, cooldowns."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from service.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
from service.image_checks import cheap_to_check, decodes
from service.models import PROVIDER_CAPABILITIES
from service.schemas import ImageSpec
from service.settings import GatewayConfig
from workers.providers import PROVIDER_TYPES
from workers.providers.base import Deployment, ImageRequest, ProgressReporter, Provider, ProviderResult
from workers.retry import PERMANENT_CODES, Cooldowns, Failure, backoff_delay, exhausted

log = logging.getLogger(__name__)

OPERATION_CAPABILITY = {"generate": "generation", "edit": "edit", "variation": "variation"}

FailureListener = Callable[[str, GatewayError], Awaitable[None]]  # (provider account, error)


@dataclass
class RoutedResult:
    result: ProviderResult
    deployment: Deployment


class Router:
    """Owns one provider instance per configured account and routes each call over a model's deployments.

    A call goes to the healthy deployment with the least in-flight work per unit of weight, ties broken by
    smooth weighted round robin (so sequential traffic splits exactly by weight). A deployment that fails is
    put in cooldown and skipped by later calls while another can serve. Within one call, failures worth
    retrying (429, 5xx, timeouts, connection errors) move on to a deployment not tried yet, or call a failed
    one again after an exponential backoff that honours Retry-After, up to the model's `retry.attempts` and
    within its `timeout`. A request the upstream rejected (UpstreamRejected) is never retried.
    """

    def __init__(self, config: GatewayConfig, http: aiohttp.ClientSession) -> None:
        self.config = config
        self.providers: dict[str, Provider] = {}
        for name, provider_config in config.providers.items():
            cls = PROVIDER_TYPES.get(provider_config.type)
            if cls is None:
                raise ValueError(f"providers.{name}.type: unknown provider type {provider_config.type!r}; "
                                 f"known: {', '.join(sorted(PROVIDER_TYPES))}")
            self.providers[name] = cls(name, provider_config, http)
        self.deployments: dict[str, list[Deployment]] = {}
        for model, model_config in config.models.items():
            resolved = []
            for i, dep in enumerate(model_config.deployments):
                provider_config = config.providers[dep.provider]
                deployment = Deployment.resolve(model, i, dep.provider, provider_config, dep)
                if (self.providers[dep.provider].long_running and dep.timeout is None
                        and "timeout" not in provider_config.model_fields_set):
                    deployment = dataclasses.replace(deployment, timeout=model_config.timeout)
                try:
                    self.providers[dep.provider].check_deployment(deployment)
                except ValueError as exc:
                    raise ValueError(f"models.{model}.deployments.{i}: {exc}") from None
                resolved.append(deployment)
            self.deployments[model] = resolved
        self.in_flight: Counter[str] = Counter()
        self.rotation: defaultdict[str, float] = defaultdict(float)  # smooth weighted round robin state
        self.cooldowns = Cooldowns()
        self.slots = {d.name: asyncio.Semaphore(d.max_concurrency)
                      for ds in self.deployments.values() for d in ds if d.max_concurrency is not None}
        self.failure_listener: FailureListener | None = None  # told of every failed upstream call (metrics)

    def candidates(self, spec: ImageSpec) -> list[Deployment]:
        deployments = self.deployments.get(spec.model)
        if not deployments:
            raise NotFound(f"The model '{spec.model}' does not exist.", param="model", code="model_not_found")
        needed = OPERATION_CAPABILITY[spec.operation]
        able = [d for d in deployments
                if needed in PROVIDER_CAPABILITIES.get(self.config.providers[d.provider].type, frozenset())]
        if not able:
            raise InvalidRequest(f"Model '{spec.model}' cannot {spec.operation} images.", param="model",
                                 code="unsupported_operation")
        return able

    def pick(self, deployments: list[Deployment]) -> Deployment:
        """Out of cooldown if possible, with spare capacity if possible, least busy for its weight, then the
        one whose turn it is by weight."""
        pool = [d for d in deployments if not self.cooldowns.active(d.name)] or deployments
        pool = ([d for d in pool if d.max_concurrency is None or self.in_flight[d.name] < d.max_concurrency]
                or pool)
        least = min(self.in_flight[d.name] / d.weight for d in pool)
        pool = [d for d in pool if self.in_flight[d.name] / d.weight == least]
        for d in pool:
            self.rotation[d.name] += d.weight
        chosen = max(pool, key=lambda d: self.rotation[d.name])
        self.rotation[chosen.name] -= sum(d.weight for d in pool)
        return chosen

    async def generate(self, request: ImageRequest, progress: ProgressReporter) -> RoutedResult:
        spec = request.spec
        deployments = self.candidates(spec)
        model = self.config.models[spec.model]
        policy = model.retry
        loop = asyncio.get_running_loop()
        deadline = loop.time() + model.timeout
        failures: list[Failure] = []
        retry_at: dict[str, float] = {}  # deployments that failed in this request -> when to call them again
        for attempt in range(1, policy.attempts + 1):
            untried = [d for d in deployments if d.name not in retry_at]
            if untried:
                deployment, wait = self.pick(untried), 0.0
            else:
                deployment = min(deployments, key=lambda d: retry_at[d.name])
                wait = retry_at[deployment.name] - loop.time()
            if loop.time() + wait >= deadline:
                break  # the next call could not start within the model's timeout
            if attempt > 1:
                await progress.update(0.0, f"retrying ({attempt}/{policy.attempts})")
            if wait > 0:
                await asyncio.sleep(wait)
            started = loop.time()
            try:
                result = await self._call(deployment, request, progress, deadline)
            except UpstreamRejected as exc:
                log.info("%s: attempt %d/%d on %s rejected, not retried: %s", spec.model, attempt,
                         policy.attempts, deployment.name, exc.message)
                await self._failed(deployment, exc)
                raise
            except UpstreamError as exc:
                failures.append(Failure(deployment, exc))
                await self._failed(deployment, exc)
                self.cooldowns.start(deployment.name, max(policy.cooldown, exc.retry_after or 0.0))
                tries = sum(f.deployment.name == deployment.name for f in failures)
                retry_at[deployment.name] = (math.inf if exc.code in PERMANENT_CODES
                                             else loop.time() + backoff_delay(policy, tries, exc.retry_after))
                log.warning("%s: attempt %d/%d on %s failed after %.2f s: %s", spec.model, attempt,
                            policy.attempts, deployment.name, loop.time() - started, exc.message)
                continue
            self.cooldowns.clear(deployment.name)
            log.info("%s: attempt %d/%d on %s succeeded in %.2f s", spec.model, attempt, policy.attempts,
                     deployment.name, loop.time() - started)
            return RoutedResult(result, deployment)
        raise exhausted(spec.model, failures)

    async def _call(self, deployment: Deployment, request: ImageRequest, progress: ProgressReporter,
                    deadline: float) -> ProviderResult:
        """One provider call within the deployment's concurrency limit and timeout, capped by the deadline."""
        loop = asyncio.get_running_loop()
        provider = self.providers[deployment.provider]
        slot = self.slots.get(deployment.name) or contextlib.nullcontext()
        timeout = deployment.timeout
        self.in_flight[deployment.name] += 1
        try:
            async with slot:
                timeout = min(timeout, deadline - loop.time())
                async with asyncio.timeout(timeout):
                    result = await provider.generate(request, deployment, progress)
                    await self._check_images(deployment, result)
                    return result
        except TimeoutError:
            raise UpstreamTimeout(f"Upstream '{deployment.provider}' (model '{deployment.upstream_model}') "
                                  f"did not answer within {timeout:.3g} s.") from None
        finally:
            self.in_flight[deployment.name] -= 1

    async def _failed(self, deployment: Deployment, error: GatewayError) -> None:
        if self.failure_listener is not None:
            await self.failure_listener(deployment.provider, error)

    @staticmethod
    async def _check_images(deployment: Deployment, result: ProviderResult) -> None:
        """A truncated or corrupt image is the upstream's failure (worth another try), never a result. Large
        images are checked side by side, in threads (inflating their pixels releases the GIL); small ones
        right here, cheaper than the hop."""
        small = {i: decodes(image.data) for i, image in enumerate(result.images) if cheap_to_check(image.data)}
        large = [i for i in range(len(result.images)) if i not in small]
        checked = await asyncio.gather(*(asyncio.to_thread(decodes, result.images[i].data) for i in large))
        whole = small | dict(zip(large, checked, strict=True))
        for index in range(len(result.images)):
            if not whole[index]:
                raise UpstreamError(f"Upstream '{deployment.provider}' (model '{deployment.upstream_model}') "
                                    f"returned a truncated or corrupt image (image {index}).",
                                    code="bad_upstream_image")

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()
