"""`imagegw check-config`: every problem of the config file, its workflow templates and the storage settings,
each named by file, line and key, instead of the first one found at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiohttp
import yaml
from pydantic import ValidationError

from service.settings import ConfigError, GatewayConfig, Settings, _line_of, load_config

MAX_PRESIGN_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class Finding:
    level: Literal["error", "warning"]
    where: str | None  # a key path in the config file ("models.sdxl.deployments.0"), a setting's variable, or
    message: str  # None when the message already says where (the file does not load)
    line: int | None = None

    def render(self, path: Path | None) -> str:
        if self.where is None:
            return self.message
        origin = f"{path}:{self.line}" if path and self.line else str(path or "built-in config")
        return f"{origin}: {self.level}: {self.where}: {self.message}"


async def check(settings: Settings) -> tuple[GatewayConfig | None, list[Finding]]:
    """The parsed config (None when it does not even parse) and everything wrong with it."""
    try:
        config = load_config(settings.config)
    except ConfigError as exc:
        # one line per schema error, each already naming file, line and key; a YAML error spans several lines
        lines = str(exc).splitlines()
        if not all(line.startswith(str(settings.config)) for line in lines):
            lines = [str(exc)]
        return None, [Finding("error", None, line) for line in lines]
    tree = yaml.compose(settings.config.read_text()) if settings.config else None
    findings = _check_settings(settings) + _check_keys(config)
    findings += await _check_providers(config)
    return config, [_located(f, tree) for f in findings]


def _located(finding: Finding, tree: yaml.Node | None) -> Finding:
    if tree is None or finding.where is None or finding.where.startswith("IMAGEGW_"):
        return finding
    loc = tuple(int(p) if p.isdigit() else p for p in finding.where.split("."))
    return Finding(finding.level, finding.where, finding.message, _line_of(tree, loc))


def _check_settings(settings: Settings) -> list[Finding]:
    found = []
    if settings.storage == "s3":
        if not settings.s3_bucket:
            found.append(Finding("error", "IMAGEGW_S3_BUCKET", "IMAGEGW_STORAGE=s3 needs a bucket"))
        if settings.url_ttl > MAX_PRESIGN_SECONDS:
            found.append(
                Finding(
                    "error",
                    "IMAGEGW_URL_TTL",
                    f"{settings.url_ttl} s is longer than presigned S3 "
                    f"links can last ({MAX_PRESIGN_SECONDS} s)",
                )
            )
    return found


def _check_keys(config: GatewayConfig) -> list[Finding]:
    return [
        Finding(
            "error", f"keys.{i}.key_env", f"key {key.name!r}: environment variable {key.key_env!r} is not set"
        )
        for i, key in enumerate(config.keys)
        if key.key_env is not None and not os.environ.get(key.key_env)
    ]


async def _check_providers(config: GatewayConfig) -> list[Finding]:
    """Build every provider and check every deployment as a worker would at start-up, collecting all failures
    (cross-references, families and provider types were checked when the file loaded)."""
    from workers.providers import PROVIDER_TYPES
    from workers.providers.base import Deployment, Provider

    found: list[Finding] = []
    providers: dict[str, Provider] = {}
    async with aiohttp.ClientSession() as http:
        for name, provider_config in config.providers.items():
            cls = PROVIDER_TYPES.get(provider_config.type)
            if cls is None:
                found.append(
                    Finding(
                        "error",
                        f"providers.{name}.type",
                        f"unknown provider type "
                        f"{provider_config.type!r}; known: {', '.join(sorted(PROVIDER_TYPES))}",
                    )
                )
                continue
            if provider_config.api_key_env and not os.environ.get(provider_config.api_key_env):
                found.append(
                    Finding(
                        "warning",
                        f"providers.{name}.api_key_env",
                        f"environment variable {provider_config.api_key_env!r} is not set here",
                    )
                )
            try:
                providers[name] = cls(name, provider_config, http)
            except ValueError as exc:
                found += _errors(f"providers.{name}", exc)
        try:
            for model, model_config in config.models.items():
                for i, dep in enumerate(model_config.deployments):
                    provider = providers.get(dep.provider)
                    if provider is None:
                        continue  # already reported on the provider
                    deployment = Deployment.resolve(
                        model, i, dep.provider, config.providers[dep.provider], dep
                    )
                    try:
                        provider.check_deployment(deployment)
                    except ValueError as exc:
                        found += _errors(f"models.{model}.deployments.{i}", exc)
        finally:
            for provider in providers.values():
                await provider.close()
    return found


def _errors(where: str, exc: ValueError) -> list[Finding]:
    """One finding per pydantic error (options are models), else the message as it is."""
    if isinstance(exc, ValidationError):
        return [
            Finding(
                "error",
                ".".join([where, "options", *map(str, err["loc"])]) if err["loc"] else where,
                err["msg"],
            )
            for err in exc.errors()
        ]
    return [Finding("error", where, str(exc))]
