"""Latency percentiles (nearest-rank), in the units of the samples."""

from __future__ import annotations

import math


def percentiles(samples: list[float], points: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": …, "p95": …, "p99": …}`` of ``samples`` by the nearest-rank method."""
    ordered = sorted(samples)
    if not ordered:
        return {f"p{p}": math.nan for p in points}
    return {f"p{p}": ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] for p in points}
