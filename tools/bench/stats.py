"""Latency statistics: nearest-rank percentiles, per-op summaries, drift over a run."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

# (op, start, seconds) of one timed operation; start is time.perf_counter()
Record = tuple[str, float, float]


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[i]


def summarize(lat: list[float]) -> dict:
    return {
        "n": len(lat),
        "p50": pct(lat, 50),
        "p95": pct(lat, 95),
        "p99": pct(lat, 99),
        "max": max(lat) if lat else float("nan"),
        "mean": statistics.fmean(lat) if lat else float("nan"),
    }


def drift(recs: list[Record], ops: Sequence[str], windows: int = 10) -> dict[str, list[float]]:
    """P95 per op in consecutive windows of the run (in start order)."""
    recs = sorted(recs, key=lambda r: r[1])
    out: dict[str, list[float]] = {}
    if len(recs) < windows * 4:
        return out
    size = len(recs) // windows
    for w in range(windows):
        part = recs[w * size : (w + 1) * size]
        for op in ops:
            xs = [r[2] for r in part if r[0] == op]
            out.setdefault(op, []).append(pct(xs, 95) if xs else float("nan"))
    return out


def tenths_p95(xs: list[float]) -> list[float]:
    """P95 of each tenth of a series in run order (none below ten values)."""
    if len(xs) < 10:
        return []
    return [pct(xs[w * len(xs) // 10 : (w + 1) * len(xs) // 10], 95) for w in range(10)]


def drift_ratio(p95s: list[float]) -> float | None:
    """How much a run's P95 grew: the median of the last three windows over the median of the
    first three (windows without ops left out; None below six measured windows)."""
    xs = [x for x in p95s if x == x]
    if len(xs) < 6:
        return None
    return sorted(xs[-3:])[1] / sorted(xs[:3])[1]
