"""Rows, targets and their verdicts; the printed table and `bench/results.json`."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Target:
    """A target as text plus the check that decides it from (value, baseline)."""

    text: str
    check: Callable[[float, float], bool]

    @classmethod
    def adds_at_most(cls, limit: float, unit: str) -> Target:
        return cls(f"adds <= {limit:g} {unit}", lambda v, b: v - b <= limit)

    @classmethod
    def at_least(cls, limit: float, unit: str) -> Target:
        return cls(f">= {limit:g} {unit}", lambda v, b: v >= limit)

    @classmethod
    def at_most(cls, limit: float, unit: str) -> Target:
        return cls(f"<= {limit:g} {unit}", lambda v, b: v <= limit)

    @classmethod
    def ratio_at_most(cls, limit: float) -> Target:
        return cls(f"ratio <= {limit:g}", lambda v, b: b > 0 and v / b <= limit)

    @classmethod
    def ratio_at_least(cls, limit: float) -> Target:
        return cls(f"ratio >= {limit:g}", lambda v, b: b > 0 and v / b >= limit)

    def __and__(self, other: Target) -> Target:
        return Target(f"{self.text} and {other.text}", lambda v, b: self.check(v, b) and other.check(v, b))


@dataclass
class Row:
    scenario: str
    metric: str
    unit: str
    value: float
    baseline: float
    ratio: float | None
    target: str | None
    met: bool | None


def row(scenario: str, metric: str, unit: str, value: float, baseline: float, target: Target | None) -> Row:
    value, baseline = round(value, 4), round(baseline, 4)
    return Row(scenario, metric, unit, value, baseline, round(value / baseline, 3) if baseline else None,
               target.text if target else None, target.check(value, baseline) if target else None)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def table(rows: Sequence[Row]) -> str:
    header = ("scenario", "metric", "unit", "value", "baseline", "ratio", "target", "met")
    cells = [header] + [
        (r.scenario, r.metric, r.unit, _number(r.value), _number(r.baseline), _number(r.ratio),
         r.target or "-", {True: "yes", False: "NO", None: "-"}[r.met])
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "service", "workers"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty else "")


def machine() -> dict[str, object]:
    return {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "commit": commit()}


def cpu_ticks() -> tuple[int, int] | None:
    """(stolen, all) CPU time of the machine so far, in ticks, from /proc/stat (Linux; None elsewhere)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    ticks = [int(value) for value in first[1:9]]
    return ticks[7], sum(ticks)


def steal_share(start: tuple[int, int] | None) -> float | None:
    """The share of the machine's CPU time a hypervisor gave to other guests since `start`: time during which
    the processes measured wanted to run and could not."""
    end = cpu_ticks()
    if start is None or end is None or end[1] == start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def write_results(path: Path, rows: Sequence[Row], mode: str, redis: str, files: str, notes: Sequence[str],
                  steal: float | None) -> None:
    document = {**machine(), "mode": mode, "redis": redis, "files": files, "cpu_steal": steal,
                "rows": [asdict(r) for r in rows], "notes": list(notes)}
    path.write_text(json.dumps(document, indent=2) + "\n")
