"""Process settings (environment, prefix IMAGEGW_) and the gateway config file (providers, models, keys)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything a process needs to start, read from `IMAGEGW_*` variables; built once at the entry point."""

    model_config = SettingsConfigDict(env_prefix="IMAGEGW_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = Field(None, description="unset = embedded mode: in-memory Redis and in-process worker")
    config: Path | None = Field(None, description="path of the YAML config file")
    data_dir: Path = Path(".imagegw")
    public_url: str | None = Field(None, description="base URL put in signed links; default: the request's host")
    url_ttl: int = Field(3600, ge=1, description="lifetime of signed file URLs, seconds")
    signing_secret: SecretStr | None = None
    sync_timeout: float = Field(300.0, gt=0, description="how long a synchronous request waits before answering 202")
    max_body_bytes: int = 40 * 1024 * 1024
    body_read_timeout: float = Field(
        30.0, gt=0, description="seconds a client may take to send its request body; a slower one gets 408"
    )
    job_ttl: int = Field(24 * 3600, ge=60, description="how long job records and their files are kept, seconds")
    queue_name: str = "imagegw:queue"
    uvloop: bool = Field(True, description="run `serve` and `worker` on uvloop, a faster event loop (where installed)")
    worker_concurrency: int = Field(10, ge=1, description="jobs one worker process runs at once")
    worker_poll_fallback: float = Field(
        0.5, gt=0, description="seconds between queue scans when no wake-up arrives (missed-notification safety net)"
    )
    job_lease: float = Field(15.0, ge=1, description="seconds after which a dead worker's job is run again")
    worker_grace: float = Field(
        30.0, ge=0, description="seconds a stopping worker lets its jobs finish, a front end its requests"
    )
    progress_interval: float = Field(0.2, ge=0, description="minimum seconds between two progress events of a job")
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = Field("json", description="json: one object per line, for log shippers")
    # multi-tenancy: the admin API, admission control, usage and completion webhooks
    admin_token: SecretStr | None = Field(None, description="Bearer token of the /admin API; also turns dev mode off")
    max_queue_depth: int | None = Field(None, ge=1, description="waiting jobs beyond which new work gets 503")
    usage_retention: int = Field(400 * 24 * 3600, ge=3600, description="how long usage records are kept, seconds")
    webhook_secret: SecretStr | None = Field(
        None, description="signs the webhooks of config-file keys (keys created through the admin API have their own)"
    )
    webhook_timeout: float = Field(10.0, gt=0, description="seconds one webhook delivery attempt may take")
    webhook_retry_for: float = Field(3600.0, ge=0, description="how long a failing webhook is retried, seconds")
    webhook_backoff: float = Field(2.0, gt=0, description="seconds before the first webhook retry, doubled up to 5 min")
    # input images of edits and variations (uploads, base64 and fetched URLs alike)
    max_input_image_bytes: int = Field(25 * 1024 * 1024, ge=1, description="largest accepted input image, bytes")
    max_input_pixels: int = Field(40_000_000, ge=1, description="largest declared width x height of an input image")
    max_input_images: int = Field(16, ge=1, description="most input images one edit may carry")
    fetch_timeout: float = Field(20.0, gt=0, description="seconds to download one image URL, redirects included")
    fetch_max_redirects: int = Field(5, ge=0)
    fetch_allowed_networks: list[IPvAnyNetwork] = Field(
        [], description="CIDRs image URLs may reach although they are loopback/private/link-local (tests, intranets)"
    )
    # where finished images live: a local directory served through signed /v1/files links, or an S3 bucket whose
    # presigned links clients download from directly (credentials: the standard AWS_* variables)
    storage: Literal["local", "s3"] = "local"
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = Field(None, description="an S3-compatible service (MinIO, R2...); unset = AWS")
    s3_public_endpoint_url: str | None = Field(
        None, description="endpoint put in presigned links when clients reach the service at another address"
    )
    s3_region: str | None = Field(None, description="default: AWS_REGION / AWS_DEFAULT_REGION")
    s3_prefix: str = Field("imagegw/", description="key prefix of every object the gateway writes")
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    storage_sweep_interval: float = Field(
        3600.0, gt=0, description="seconds between deletions of stored images older than job_ttl")

    @property
    def embedded(self) -> bool:
        return not self.redis_url


Capability = Literal["generate", "edit", "stream", "admin"]
DEFAULT_CAPABILITIES: tuple[Capability, ...] = ("generate", "edit", "stream")


class KeyLimits(BaseModel):
    """Per-key admission limits; unset = unlimited. Jobs count as concurrent from submission to their end and
    as queued until a worker starts them."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=1, description="accepted image requests in any 60 s")
    images_per_minute: int | None = Field(None, ge=1, description="images requested (n) in any 60 s")
    concurrent_jobs: int | None = Field(None, ge=1, description="unfinished jobs (queued or running)")
    queued_jobs: int | None = Field(None, ge=1, description="jobs waiting for a worker")


class KeyConfig(BaseModel):
    """A bearer key declared in the config file; the key itself comes from the file or an env variable."""

    model_config = ConfigDict(extra="forbid")

    name: str
    key: SecretStr | None = None
    key_env: str | None = None
    models: list[str] | None = Field(None, description="models this key may use; unset = all")
    capabilities: list[Capability] = list(DEFAULT_CAPABILITIES)
    limits: KeyLimits = KeyLimits()
    image_budget: int | None = Field(None, ge=0, description="images this key may create in all; unset = no cap")
    webhook_url: str | None = Field(None, description="default completion webhook of this key's jobs")

    @model_validator(mode="after")
    def _one_source(self) -> KeyConfig:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give exactly one of 'key' or 'key_env'")
        return self

    def secret(self) -> str | None:
        if self.key is not None:
            return self.key.get_secret_value()
        return os.environ.get(self.key_env or "")


class ProviderConfig(BaseModel):
    """An upstream account: which adapter speaks to it, where, and with which credentials."""

    model_config = ConfigDict(extra="forbid")

    type: str
    base_url: str | None = None
    api_key_env: str | None = None
    headers: dict[str, str] = {}
    timeout: float = Field(120.0, gt=0)
    options: dict[str, Any] = {}

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class DeploymentConfig(BaseModel):
    """One place a public model can be served: a provider plus the upstream model name and its limits."""

    model_config = ConfigDict(extra="forbid")

    provider: str
    model: str | None = Field(None, description="upstream model name; default: the public name")
    weight: float = Field(1.0, gt=0)
    max_concurrency: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0)
    options: dict[str, Any] = {}


class RetryConfig(BaseModel):
    """How the router retries a model's failed upstream calls; the model's `timeout` bounds them all."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(3, ge=1, description="upstream calls per request, fallbacks to other deployments included")
    backoff: float = Field(0.5, ge=0, description="seconds before calling a failed deployment again in the same "
                                                  "request; doubled after each failure, with jitter")
    max_backoff: float = Field(8.0, ge=0)
    cooldown: float = Field(30.0, ge=0, description="seconds a failed deployment is skipped while another can serve")


class ModelConfig(BaseModel):
    """A public model name: its validation rules (family), where it runs, and how it is dispatched."""

    model_config = ConfigDict(extra="forbid")

    family: str = "generic"
    deployments: list[DeploymentConfig] = Field(min_length=1)
    dispatch: Literal["queue", "inline"] = "queue"
    timeout: float = Field(600.0, gt=0, description="budget for the whole job, retries and fallbacks included")
    retry: RetryConfig = RetryConfig()
    description: str | None = None


class TokenPrices(BaseModel):
    """USD per million tokens, for each kind of token upstreams bill at its own rate."""

    model_config = ConfigDict(extra="forbid")

    text_input: float = Field(0.0, ge=0)
    image_input: float = Field(0.0, ge=0)
    image_output: float = Field(0.0, ge=0)
    text_output: float = Field(0.0, ge=0)


class ModelPrice(BaseModel):
    """How a model's upstream bills: per token when the upstream reports token usage, else per image."""

    model_config = ConfigDict(extra="forbid")

    per_million_tokens: TokenPrices | None = None
    per_image: dict[str, dict[str, float]] = Field(
        {}, description='size -> quality -> USD per image; "*" matches any size or quality'
    )


class GatewayConfig(BaseModel):
    """The config file: providers, public models and static keys."""

    model_config = ConfigDict(extra="forbid")

    default_model: str | None = None
    providers: dict[str, ProviderConfig] = {}
    models: dict[str, ModelConfig] = {}
    keys: list[KeyConfig] = []
    pricing: dict[str, ModelPrice] = Field({}, description="estimated cost by public model name")

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        from service.models import FAMILIES, PROVIDER_CAPABILITIES

        for name, provider in self.providers.items():
            if provider.type not in PROVIDER_CAPABILITIES:
                raise ValueError(f"providers.{name}.type: unknown provider type {provider.type!r}; "
                                 f"known: {', '.join(sorted(PROVIDER_CAPABILITIES))}")
        for name, model in self.models.items():
            if model.family not in FAMILIES:
                raise ValueError(f"models.{name}.family: unknown model family {model.family!r}; "
                                 f"known: {', '.join(sorted(FAMILIES))}")
            for i, deployment in enumerate(model.deployments):
                if deployment.provider not in self.providers:
                    raise ValueError(
                        f"models.{name}.deployments.{i}.provider: unknown provider {deployment.provider!r}"
                    )
        if self.default_model is not None and self.default_model not in self.models:
            raise ValueError(f"default_model: {self.default_model!r} is not in models")
        for name in self.pricing:
            if name not in self.models:
                raise ValueError(f"pricing.{name}: {name!r} is not in models")
        return self


class ConfigError(Exception):
    """The config file is unusable; the message names the file, line and key at fault."""


LOCAL_MODELS = {
    "imagegw-local": "generic",
    "dall-e-2": "dall-e-2",
    "dall-e-3": "dall-e-3",
    "gpt-image-1": "gpt-image",
    "gpt-image-1-mini": "gpt-image",
    "gpt-image-1.5": "gpt-image",
}


def builtin_config() -> GatewayConfig:
    """The config used without a file: the offline renderer under its own name and the OpenAI model names."""
    return GatewayConfig(
        default_model="imagegw-local",
        providers={"local": ProviderConfig(type="local")},
        models={
            name: ModelConfig(
                family=family,
                deployments=[DeploymentConfig(provider="local")],
                description="built-in offline renderer",
            )
            for name, family in LOCAL_MODELS.items()
        },
    )


def load_config(path: Path | None) -> GatewayConfig:
    if path is None:
        return builtin_config()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        tree = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = err["msg"]
            if not loc and msg.startswith("Value error, "):
                # cross-reference errors carry their key path at the start of the message
                key, _, msg = msg.removeprefix("Value error, ").partition(": ")
                loc = tuple(int(p) if p.isdigit() else p for p in key.split("."))
            where = ".".join(str(p) for p in loc) or "(top level)"
            line = _line_of(tree, loc)
            lines.append(f"{path}:{line}: {where}: {msg}" if line else f"{path}: {where}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    _resolve_paths(config, path.parent)
    return config


def _resolve_paths(config: GatewayConfig, base: Path) -> None:
    """Option values that name files (ComfyUI workflows) are relative to the config file, not the cwd."""
    option_sets = [p.options for p in config.providers.values()]
    option_sets += [d.options for m in config.models.values() for d in m.deployments]
    for options in option_sets:
        workflow = options.get("workflow")
        if isinstance(workflow, str) and not Path(workflow).is_absolute():
            options["workflow"] = str(base / workflow)


def _line_of(node: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """The 1-based line of the deepest YAML node on the key path `loc`."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
