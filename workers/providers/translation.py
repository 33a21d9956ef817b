"""Fitting the gateway's request to what an upstream can do: parameters refused by data, `size` to the
nearest supported aspect ratio, `n` fanned out over parallel calls, usage of those calls added up."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator

from service.errors import UpstreamRejected
from service.schemas import ImageSpec
from workers.providers.base import GeneratedImage

T = TypeVar("T")

# Said to multimodal models that have no mask parameter: the mask travels as the last image part.
MASK_INSTRUCTION = ("The last image is a mask for the first image: change only the areas where the mask is "
                    "transparent and keep everything else exactly as it is.")


def refuse_parameters(spec: ImageSpec, refused: Mapping[str, frozenset[Any] | None], who: str) -> None:
    """400 naming the first parameter the upstream cannot honour. `refused` maps a spec field to the values
    refused, or None for any value that is set."""
    for param, values in refused.items():
        value = getattr(spec, param)
        if value in (None, False, 0):
            continue
        if values is None or value in values:
            shown = f"'{param}'" if values is None else f"'{param}': '{value}'"
            raise UpstreamRejected(f"{shown} is not supported by model '{spec.model}' ({who}).", param=param,
                                   code="unsupported_parameter")


def parse_ratio(ratio: str) -> float:
    """`"16:9"` -> 1.777...; raises ValueError for anything else (config validation uses this)."""
    width, sep, height = ratio.partition(":")
    try:
        value = float(width) / float(height)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{ratio!r} is not an aspect ratio like '16:9'") from None
    if not sep or value <= 0 or not math.isfinite(value):
        raise ValueError(f"{ratio!r} is not an aspect ratio like '16:9'")
    return value


def _checked_ratio(ratio: str) -> str:
    parse_ratio(ratio)
    return ratio


# an aspect ratio in a provider's options, checked when the config is read
AspectRatio = Annotated[str, AfterValidator(_checked_ratio)]


def nearest_aspect_ratio(spec: ImageSpec, supported: tuple[str, ...]) -> str | None:
    """The supported ratio closest to the requested WIDTHxHEIGHT (on a log scale, so 2:1 and 1:2 are equally
    far from 1:1); None for `auto` or when the upstream takes no ratio at all."""
    dims = spec.dimensions()
    if dims is None or not supported:
        return None
    wanted = math.log(dims[0] / dims[1])
    return min(supported, key=lambda ratio: abs(math.log(parse_ratio(ratio)) - wanted))


def calls_for(n: int, per_call: int) -> list[int]:
    """How many images each parallel call asks for: `n` split into calls of at most `per_call`."""
    full, rest = divmod(n, per_call)
    return [per_call] * full + ([rest] if rest else [])


async def fan_out(counts: list[int], call: Callable[[int, int], Coroutine[Any, Any, T]]) -> list[T]:
    """Run `call(index, count)` for every entry of `counts` at once. The first failure cancels the other calls
    and is raised as itself (not as an ExceptionGroup), so the router sees the upstream's own error."""
    if len(counts) == 1:  # the usual case: no task group, no task, two loop turns fewer
        return [await call(0, counts[0])]
    try:
        async with asyncio.TaskGroup() as group:
            tasks: list[asyncio.Task[T]] = [group.create_task(call(index, count))
                                            for index, count in enumerate(counts)]
    except ExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return [task.result() for task in tasks]


def add_usage(usages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The usage of several calls as one: numbers added up, nested objects merged the same way."""
    total: dict[str, Any] = {}
    for usage in usages:
        for key, value in usage.items():
            if isinstance(value, dict):
                total[key] = add_usage([total.get(key) or {}, value])
            elif isinstance(value, int | float) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total or None


@dataclass
class CallResult:
    """What one upstream call of a fanned-out request produced."""

    images: list[GeneratedImage]
    usage: dict[str, Any] | None
