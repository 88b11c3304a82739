"""The stats behind ``GET /v1/stats`` and ``inferstack stats``: per model and per
tenant over a time window, from the ``requests`` view (one row per request).

A request belongs to the window in which it ended. Percentiles are exact and
interpolate linearly between ranks (``quantileExactInclusive``, numpy's default), so
they can be checked by hand. Latency percentiles cover finished requests; TTFT
those that produced a token; queue wait those a worker claimed.
"""

from __future__ import annotations

import re
import time
from typing import Any

from metrics.store import Store

# The inner query renames the view's columns so that the outer aliases (which reuse
# the friendly names) never shadow a column inside another aggregate.
_ROWS = """
    SELECT model AS m, user AS u, tier AS t, status AS st, prompt_tokens AS pt, completion_tokens AS ct,
           ttft_s AS ttft, latency_s AS lat, queue_wait_s AS qw, tokens_per_s AS tps, kv_reused_tokens AS kv,
           toFloat64(enqueued_at) AS enq, toFloat64(ended_at) AS ended
    FROM requests
    WHERE ended_at >= toDateTime64({since:Float64}, 6, 'UTC') AND ended_at < toDateTime64({until:Float64}, 6, 'UTC')
      AND ({model:String} = '' OR model = {model:String})"""

_AGGREGATES = """
    count() AS requests,
    countIf(st = 'finished') AS finished,
    countIf(st = 'failed') AS errors,
    countIf(st = 'rejected') AS rejected,
    countIf(st = 'cancelled') AS cancelled,
    sum(pt) AS prompt_tokens,
    sum(ct) AS completion_tokens,
    quantilesExactInclusive(0.5, 0.95, 0.99)(ttft) AS ttft_s,
    quantilesExactInclusiveIf(0.5, 0.95, 0.99)(lat, st = 'finished') AS latency_s,
    quantilesExactInclusive(0.5, 0.95, 0.99)(qw) AS queue_wait_s,
    avg(qw) AS queue_wait_mean_s,
    quantileExactInclusive(0.5)(tps) AS request_tokens_per_s_p50,
    sum(ct) / nullIf(max(ended) - greatest(min(enq), {since:Float64}), 0) AS output_tokens_per_s,
    sumIf(kv, st != 'rejected') / nullIf(sumIf(pt, st != 'rejected'), 0) AS kv_hit_rate"""

MODEL_SQL = f"""
SELECT m AS model,{_AGGREGATES}
FROM ({_ROWS})
GROUP BY m
ORDER BY m"""

TENANT_SQL = f"""
SELECT m AS model, u AS user, t AS tier,{_AGGREGATES}
FROM ({_ROWS})
GROUP BY m, u, t
ORDER BY m, requests DESC, u, t"""

PERCENTILES = ("p50", "p95", "p99")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str | float) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` -> seconds."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
        if not m:
            raise ValueError(f"window {text!r}: use a number of seconds or e.g. 90s, 15m, 1h, 7d")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds <= 0:
        raise ValueError("window must be positive")
    return seconds


def _shape(row: dict[str, Any]) -> dict[str, Any]:
    """Percentile arrays -> ``{"p50": .., "p95": .., "p99": ..}``."""
    return {k: dict(zip(PERCENTILES, v)) if isinstance(v, list) else v for k, v in row.items()}


def stats(store: Store, window_s: float, *, until: float | None = None, model: str = "") -> dict[str, Any]:
    until = time.time() if until is None else until
    params = {"since": until - window_s, "until": until, "model": model}
    return {
        "window_s": window_s,
        "since": params["since"],
        "until": until,
        "models": [_shape(r) for r in store.query(MODEL_SQL, params)],
        "tenants": [_shape(r) for r in store.query(TENANT_SQL, params)],
    }


# -- text for the terminal --------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    for r in rows:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(report["since"]))
    until = time.strftime("%H:%M:%S", time.gmtime(report["until"]))
    out = [f"Requests that ended {since} - {until} UTC (window {report['window_s']:g} s)", ""]
    if not report["models"]:
        out.append("no requests in this window")
        return "\n".join(out)
    p = lambda d, k: _ms(d[k]) if d else "-"  # noqa: E731
    rows = [[m["model"], str(m["requests"]), str(m["errors"]), str(m["rejected"]), str(m["cancelled"]),
             f"{p(m['ttft_s'], 'p50')}/{p(m['ttft_s'], 'p95')}/{p(m['ttft_s'], 'p99')}",
             f"{p(m['latency_s'], 'p50')}/{p(m['latency_s'], 'p95')}/{p(m['latency_s'], 'p99')}",
             f"{p(m['queue_wait_s'], 'p50')}/{p(m['queue_wait_s'], 'p95')}",
             _num(m["output_tokens_per_s"]), _num(m["request_tokens_per_s_p50"]),
             _num(m["kv_hit_rate"], "{:.0%}")] for m in report["models"]]
    out.append(_table(["model", "requests", "errors", "rejected", "cancelled", "TTFT p50/95/99 ms",
                       "latency p50/95/99 ms", "queue p50/95 ms", "out tok/s", "req tok/s p50", "KV hit"], rows))
    out += ["", "per tenant:"]
    rows = [[t["model"], t["user"], t["tier"], str(t["requests"]), str(t["errors"]), str(t["rejected"]),
             str(t["completion_tokens"]), f"{p(t['ttft_s'], 'p50')}/{p(t['ttft_s'], 'p95')}",
             f"{p(t['latency_s'], 'p50')}/{p(t['latency_s'], 'p95')}",
             f"{p(t['queue_wait_s'], 'p50')}/{p(t['queue_wait_s'], 'p95')}",
             _num(t["kv_hit_rate"], "{:.0%}")] for t in report["tenants"]]
    out.append(_table(["model", "user", "tier", "requests", "errors", "rejected", "out tokens", "TTFT p50/95 ms",
                       "latency p50/95 ms", "queue p50/95 ms", "KV hit"], rows))
    return "\n".join(out)
