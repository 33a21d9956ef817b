"""Usage records and their estimated cost, priced the way upstreams bill, and the queries over them.

A record is written once per finished job by its settlement (service/settlement.py) into a per-key sorted set
scored by the job's end time; queries read a time range of those sets and add them up per UTC day.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from arq.connections import ArqRedis
from pydantic import BaseModel

from service.auth import key_id_of
from service.constants import USAGE_KEYS, USAGE_LOG
from service.jobs import JobRecord
from service.schemas import parse_dimensions
from service.settings import GatewayConfig, ModelPrice

WILDCARD = "*"


class Tokens(BaseModel):
    text_input_tokens: int = 0
    image_input_tokens: int = 0
    image_output_tokens: int = 0
    text_output_tokens: int = 0

    @property
    def any(self) -> bool:
        return any((self.text_input_tokens, self.image_input_tokens, self.image_output_tokens,
                    self.text_output_tokens))


class UsageRecord(Tokens):
    """What one finished job used."""

    job_id: str
    key: str
    model: str
    provider: str | None = None
    operation: str
    status: str
    images: int
    pixels: int
    size: str | None = None
    quality: str | None = None
    cost: float | None = None  # USD; None when the price table has no entry for the model and size
    finished_at: float


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def token_counts(usage: dict[str, Any] | None) -> Tokens:
    """Tokens by kind from an upstream `usage` (OpenAI Images shape, or chat's prompt/completion names).
    Without a breakdown, input tokens count as text and output tokens as image."""
    if not usage:
        return Tokens()
    input_total = _count(usage.get("input_tokens")) or _count(usage.get("prompt_tokens")) or 0
    output_total = _count(usage.get("output_tokens")) or _count(usage.get("completion_tokens")) or 0
    inputs = usage.get("input_tokens_details") or {}
    outputs = usage.get("output_tokens_details") or {}
    text_in, image_in = _count(inputs.get("text_tokens")), _count(inputs.get("image_tokens"))
    text_out, image_out = _count(outputs.get("text_tokens")), _count(outputs.get("image_tokens"))
    if text_in is None and image_in is None:
        text_in = input_total
    if text_out is None and image_out is None:
        image_out = output_total
    return Tokens(text_input_tokens=text_in or 0, image_input_tokens=image_in or 0,
                  image_output_tokens=image_out or 0, text_output_tokens=text_out or 0)


def image_price(price: ModelPrice, size: str | None, quality: str | None) -> float | None:
    qualities = price.per_image.get(size or WILDCARD) or price.per_image.get(WILDCARD)
    if qualities is None:
        return None
    found = qualities.get(quality or WILDCARD)
    return found if found is not None else qualities.get(WILDCARD)


def estimate_cost(price: ModelPrice | None, images: int, size: str | None, quality: str | None,
                  tokens: Tokens) -> float | None:
    """Per token when the model has token prices and the upstream reported tokens, else per image."""
    if price is None:
        return None
    rates = price.per_million_tokens
    if rates is not None and tokens.any:
        per_million = (tokens.text_input_tokens * rates.text_input
                       + tokens.image_input_tokens * rates.image_input
                       + tokens.image_output_tokens * rates.image_output
                       + tokens.text_output_tokens * rates.text_output)
        return round(per_million / 1_000_000, 6)
    if images == 0:
        return 0.0
    each = image_price(price, size, quality)
    return None if each is None else round(each * images, 6)


def usage_record(record: JobRecord, config: GatewayConfig) -> UsageRecord:
    """The usage of a terminal job: what it made (nothing, when it failed) and what that cost."""
    result = record.result if record.status == "succeeded" else None
    images = len(result.images) if result else 0
    size = (result.size if result else None) or record.spec.size
    quality = (result.quality if result else None) or record.spec.quality
    dims = parse_dimensions(size) if size else None
    tokens = token_counts(result.usage if result else None)
    return UsageRecord(
        job_id=record.id, key=key_id_of(record.owner), model=record.model,
        provider=result.provider if result else None, operation=record.spec.operation, status=record.status,
        images=images, pixels=images * dims[0] * dims[1] if dims else 0, size=size, quality=quality,
        cost=estimate_cost(config.pricing.get(record.model), images, size, quality, tokens),
        finished_at=record.finished_at or record.created_at, **tokens.model_dump(),
    )


class UsageTotals(Tokens):
    jobs: int = 0
    images: int = 0
    pixels: int = 0
    cost: float = 0.0

    def add(self, record: UsageRecord) -> None:
        self.jobs += 1
        self.images += record.images
        self.pixels += record.pixels
        self.cost = round(self.cost + (record.cost or 0.0), 6)
        for name in Tokens.model_fields:
            setattr(self, name, getattr(self, name) + getattr(record, name))


class UsageDay(UsageTotals):
    date: str  # UTC, YYYY-MM-DD


class UsageReport(BaseModel):
    """`GET /v1/usage`."""

    object: str = "usage"
    key: str | None = None
    model: str | None = None
    start: float | None = None
    end: float | None = None
    totals: UsageTotals
    data: list[UsageDay]


class UsageStore:
    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis

    async def report(self, *, key: str | None, model: str | None, start: float | None,
                     end: float | None) -> UsageReport:
        """Totals and per-day rows of one key's usage (every key's when `key` is None)."""
        known = await self.redis.smembers(USAGE_KEYS) if key is None else set()  # type: ignore[misc]
        keys = [key] if key is not None else sorted(k.decode() for k in known)
        lo = "-inf" if start is None else start
        hi = "+inf" if end is None else f"({end}"  # end is exclusive
        totals = UsageTotals()
        days: dict[str, UsageDay] = {}
        for name in keys:
            for raw in await self.redis.zrangebyscore(USAGE_LOG.format(name), lo, hi):
                record = UsageRecord.model_validate_json(raw)
                if model is not None and record.model != model:
                    continue
                totals.add(record)
                date = dt.datetime.fromtimestamp(record.finished_at, dt.UTC).date().isoformat()
                days.setdefault(date, UsageDay(date=date)).add(record)
        return UsageReport(key=key, model=model, start=start, end=end, totals=totals,
                           data=[days[d] for d in sorted(days)])
