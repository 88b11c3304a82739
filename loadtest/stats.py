from __future__ import annotations

import statistics


def pct(values: list[float], q: float) -> float:
    """Percentile by linear interpolation (numpy's default); NaN for no data."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")
