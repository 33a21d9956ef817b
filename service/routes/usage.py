"""`GET /v1/usage`: what a key's jobs made and cost, in total and per UTC day. Admins see every key's."""

from __future__ import annotations

import datetime as dt
import math

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import InvalidRequest, NotFound
from service.openapi import api
from service.routes.responses import model_response
from service.schemas import validation_error
from service.state import REDIS, principal
from service.usage import UsageReport, UsageStore

TIME_HELP = "unix seconds, or an ISO 8601 date or date-time (UTC unless it has an offset)"


class UsageQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, description="a key id (admins only; others see their own key)")
    model: str | None = None
    start: str | None = Field(None, description=f"from this time, inclusive: {TIME_HELP}")
    end: str | None = Field(None, description=f"until this time, exclusive: {TIME_HELP}")


def parse_time(value: str | None, param: str) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            raise InvalidRequest(f"Invalid '{param}': expected {TIME_HELP}.", param=param) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        seconds = moment.timestamp()
    if not math.isfinite(seconds):
        raise InvalidRequest(f"Invalid '{param}': expected {TIME_HELP}.", param=param)
    return seconds


@api("Usage and estimated cost: totals and per-day rows", tags="Usage", responses={200: UsageReport},
     errors=(400, 404), query=UsageQuery)
async def get_usage(request: web.Request) -> web.Response:
    caller = principal(request)
    try:
        query = UsageQuery.model_validate(dict(request.query))
    except ValidationError as exc:
        raise validation_error(exc) from None
    key = query.key
    if not caller.admin:
        if key is not None and key != caller.key_id:
            raise NotFound(f"No API key found with id '{key}'.", param="key", code="key_not_found")
        key = caller.key_id
    report = await UsageStore(request.app[REDIS]).report(
        key=key, model=query.model, start=parse_time(query.start, "start"), end=parse_time(query.end, "end"))
    return model_response(report)


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/usage", get_usage)
