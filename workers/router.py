"""From a public model name to a provider call: deployments, weights and in-flight counts."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import aiohttp

from service.errors import InvalidRequest, NotFound
from service.models import PROVIDER_CAPABILITIES
from service.schemas import ImageSpec
from service.settings import GatewayConfig
from workers.providers import PROVIDER_TYPES
from workers.providers.base import Deployment, ImageRequest, ProgressReporter, Provider, ProviderResult

OPERATION_CAPABILITY = {"generate": "generation", "edit": "edit", "variation": "variation"}


@dataclass
class RoutedResult:
    result: ProviderResult
    deployment: Deployment


class Router:
    """Owns one provider instance per configured account and picks a deployment for each call."""

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
                deployment = Deployment.resolve(model, i, dep.provider, config.providers[dep.provider], dep)
                try:
                    self.providers[dep.provider].check_deployment(deployment)
                except ValueError as exc:
                    raise ValueError(f"models.{model}.deployments.{i}: {exc}") from None
                resolved.append(deployment)
            self.deployments[model] = resolved
        self.in_flight: Counter[str] = Counter()

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
        """Weighted choice among the deployments with spare capacity, preferring the least busy."""
        free = [d for d in deployments if d.max_concurrency is None or self.in_flight[d.name] < d.max_concurrency]
        pool = free or deployments
        least = min(self.in_flight[d.name] / d.weight for d in pool)
        pool = [d for d in pool if self.in_flight[d.name] / d.weight == least]
        return random.choices(pool, weights=[d.weight for d in pool])[0]

    async def generate(self, request: ImageRequest, progress: ProgressReporter) -> RoutedResult:
        deployment = self.pick(self.candidates(request.spec))
        self.in_flight[deployment.name] += 1
        try:
            result = await self.providers[deployment.provider].generate(request, deployment, progress)
        finally:
            self.in_flight[deployment.name] -= 1
        return RoutedResult(result, deployment)

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()
