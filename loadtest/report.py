"""Turn a Locust run (``make loadtest``) plus the request rows the stack wrote to
ClickHouse/chDB into a section of docs/BENCHMARKS.md with PNG plots.

    python -m loadtest.report --csv loadtest/results/locust          # make bench-report

Reads ``<csv>_final_stats.csv``, ``<csv>_stats_history.csv`` and ``<csv>_run.json``, and
from the metrics store (``INFERSTACK_CLICKHOUSE_URL``, or chDB in
``INFERSTACK_CHDB_PATH`` / the cache directory) the rows of the requests the run
sent. Writes (replacing a section with the same heading, leaving the others alone):

* client-side tables (Locust: requests, failures, latency; TTFT and ITL per stream);
* server-side tables (``metrics.stats`` over the run: per model and per tenant);
* per concurrency level (each user count Locust held): output tokens/s, requests in
  flight, TTFT percentiles — and two plots under docs/img/;
* the numbers behind all of it as JSON under loadtest/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtest.stats import pct

REPO = Path(__file__).resolve().parent.parent
SECTION = "Issue 6 — Locust run"


@dataclass
class Level:
    users: int
    seconds: float
    requests_finished: int
    output_tokens_per_s: float
    in_flight_mean: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    ttft_p99_ms: float


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _f(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def segments(history: list[dict[str, str]]) -> list[tuple[int, float, float]]:
    """(users, start, end) for each stretch of seconds at one user count."""
    points = sorted({(int(r["Timestamp"]), int(r["User Count"])) for r in history if r["Name"] == "Aggregated"})
    out: list[tuple[int, float, float]] = []
    for ts, users in points:
        if users <= 0:
            continue
        if out and out[-1][0] == users and out[-1][2] == ts:
            out[-1] = (users, out[-1][1], ts + 1)
        else:
            out.append((users, ts, ts + 1))
    return out


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def levels(rows: list[dict], segs: list[tuple[int, float, float]], min_seconds: float = 3.0) -> list[Level]:
    """Per user count: output tokens spread evenly over each request's decode time,
    requests in flight (admission to end), TTFT of the requests admitted then."""
    by_users: dict[int, list[tuple[float, float]]] = {}
    for users, t0, t1 in segs:
        by_users.setdefault(users, []).append((t0, t1))
    out = []
    for users, spans in sorted(by_users.items()):
        seconds = sum(t1 - t0 for t0, t1 in spans)
        if seconds < min_seconds:
            continue
        tokens = in_flight = 0.0
        finished, ttfts = 0, []
        for r in rows:
            if r["ended"] is None or r["enq"] is None:
                continue
            first = r["enq"] + r["ttft_s"] if r["ttft_s"] is not None else r["ended"]
            for t0, t1 in spans:
                in_flight += overlap(r["enq"], r["ended"], t0, t1)
                if r["completion_tokens"]:
                    decode = max(r["ended"] - first, 1e-6)
                    tokens += r["completion_tokens"] * overlap(first, first + decode, t0, t1) / decode
                if t0 <= r["ended"] < t1 and r["status"] == "finished":
                    finished += 1
                if t0 <= r["enq"] < t1 and r["ttft_s"] is not None:
                    ttfts.append(r["ttft_s"] * 1000)
        out.append(Level(users, seconds, finished, tokens / seconds, in_flight / seconds,
                         pct(ttfts, 50), pct(ttfts, 95), pct(ttfts, 99)))
    return out


def server_rows(store, since: float, until: float) -> list[dict]:
    return store.query("""
        SELECT request_id, user, status, toFloat64(enqueued_at) AS enq, toFloat64(ended_at) AS ended,
               ttft_s, latency_s, queue_wait_s, completion_tokens
        FROM requests
        WHERE enqueued_at >= toDateTime64({since:Float64}, 6, 'UTC')
          AND enqueued_at < toDateTime64({until:Float64}, 6, 'UTC')
        ORDER BY enq""", {"since": since, "until": until})


# -- plots ----------------------------------------------------------------------------


def plot_throughput(lv: list[Level], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    users = [x.users for x in lv]
    ax.plot(users, [x.output_tokens_per_s for x in lv], "o-", color="tab:blue", label="output tokens/s")
    ax.set_xlabel("concurrent Locust users")
    ax.set_ylabel("output tokens/s", color="tab:blue")
    ax.set_xticks(users)
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(users, [x.in_flight_mean for x in lv], "s--", color="tab:orange", label="requests in flight")
    ax2.set_ylabel("requests in flight (mean)", color="tab:orange")
    ax2.set_ylim(bottom=0)
    ax.set_title("Throughput vs concurrency (server side)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_ttft(lv: list[Level], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    users = [x.users for x in lv]
    for q, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-")):
        ax.plot(users, [getattr(x, f"ttft_{q}_ms") for x in lv], style, label=q)
    ax.set_xlabel("concurrent Locust users")
    ax.set_ylabel("TTFT (ms)")
    ax.set_xticks(users)
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("Time to first token by concurrency (server side)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- markdown ----------------------------------------------------------------------------


def _ms(x) -> str:
    return "-" if x is None or x != x else f"{x:.0f}"


def _p(d: dict | None, scale: float = 1000) -> str:
    if not d:
        return "-"
    return " / ".join(_ms(d[k] * scale if d[k] is not None else None) for k in ("p50", "p95", "p99"))


def client_tables(stats_rows: list[dict[str, str]]) -> list[str]:
    req = [r for r in stats_rows if r["Type"] not in ("TTFT", "ITL", "") and r["Name"] != "Aggregated"]
    out = ["| request | requests | failures | p50 ms | p95 ms | p99 ms | req/s |", "|---|---|---|---|---|---|---|"]
    for r in req:
        out.append(f"| {r['Type']} {r['Name']} | {r['Request Count']} | {r['Failure Count']} | {r['50%']} | "
                   f"{r['95%']} | {r['99%']} | {_f(r['Requests/s']):.2f} |")
    streams = sorted({r["Name"] for r in stats_rows if r["Type"] in ("TTFT", "ITL")})
    by = {(r["Type"], r["Name"]): r for r in stats_rows}
    out += ["", "| stream | TTFT p50 / p95 / p99 ms | ITL p50 / p95 / p99 ms | ITL samples |", "|---|---|---|---|"]
    for name in streams:
        t, i = by.get(("TTFT", name)), by.get(("ITL", name))
        fmt = lambda r: " / ".join(r[k] for k in ("50%", "95%", "99%")) if r else "-"  # noqa: E731
        out.append(f"| {name} | {fmt(t)} | {fmt(i)} | {i['Request Count'] if i else 0} |")
    return out


def server_tables(report: dict) -> list[str]:
    out = ["| model | requests | errors | rejected | cancelled | TTFT p50 / p95 / p99 ms | "
           "latency p50 / p95 / p99 ms | queue wait p50 / p95 / p99 ms | output tok/s | per-request tok/s p50 | "
           "KV hit |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        kv = "-" if m["kv_hit_rate"] is None else f"{m['kv_hit_rate']:.0%}"
        out.append(f"| {m['model']} | {m['requests']} | {m['errors']} | {m['rejected']} | {m['cancelled']} | "
                   f"{_p(m['ttft_s'])} | {_p(m['latency_s'])} | {_p(m['queue_wait_s'])} | "
                   f"{m['output_tokens_per_s'] or 0:.1f} | {m['request_tokens_per_s_p50'] or 0:.1f} | {kv} |")
    out += ["", "| tenant (user, tier) | requests | rejected | output tokens | TTFT p50 / p95 / p99 ms | "
                "latency p50 / p95 / p99 ms | queue wait p50 / p95 / p99 ms |", "|---|---|---|---|---|---|---|"]
    for t in report["tenants"]:
        out.append(f"| {t['user']}, {t['tier']} | {t['requests']} | {t['rejected']} | {t['completion_tokens']} | "
                   f"{_p(t['ttft_s'])} | {_p(t['latency_s'])} | {_p(t['queue_wait_s'])} |")
    return out


def level_table(lv: list[Level]) -> list[str]:
    out = ["| users | seconds | requests finished | output tok/s | requests in flight | TTFT p50 / p95 / p99 ms |",
           "|---|---|---|---|---|---|"]
    for x in lv:
        out.append(f"| {x.users} | {x.seconds:.0f} | {x.requests_finished} | {x.output_tokens_per_s:.1f} | "
                   f"{x.in_flight_mean:.1f} | {_ms(x.ttft_p50_ms)} / {_ms(x.ttft_p95_ms)} / {_ms(x.ttft_p99_ms)} |")
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def replace_section(doc: str, heading: str, body: str) -> str:
    """Swap the ``## heading`` section (up to the next ``## ``) for ``body``; append if absent."""
    pattern = re.compile(rf"^## {re.escape(heading)}.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        return pattern.sub(lambda _: body.rstrip() + "\n\n", doc, count=1).rstrip() + "\n"
    return doc.rstrip() + "\n\n" + body.rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default="loadtest/results/locust", help="the prefix given to make loadtest")
    ap.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--img-dir", default=str(REPO / "docs" / "img"))
    ap.add_argument("--json", default="",
                    help="where to keep the numbers (default loadtest/results/<date>-issue6-locust.json)")
    ap.add_argument("--heading", default=SECTION)
    ap.add_argument("--note", default="", help="a sentence about the setup, shown under the heading")
    args = ap.parse_args(argv)

    from loadtest.bench import machine
    from metrics import stats
    from metrics.settings import StoreSettings
    from metrics.store import open_store

    prefix = Path(args.csv)
    run = json.loads(Path(f"{prefix}_run.json").read_text())
    stats_rows = read_csv(Path(f"{prefix}_final_stats.csv"))
    segs = segments(read_csv(Path(f"{prefix}_stats_history.csv")))
    if not segs:
        print(f"{prefix}_stats_history.csv holds no seconds with users: was the run empty?")
        return 1
    since, until = segs[0][1] - 1, max(run["ended"], segs[-1][2]) + 1
    store = open_store(StoreSettings())
    rows = server_rows(store, since, until)
    server = stats.stats(store, until - since + 120, until=until + 120, model=run["model"])
    store.close()
    if not rows:
        print("the metrics store holds no requests from this run: is the exporter running against the same "
              "store (INFERSTACK_CLICKHOUSE_URL / INFERSTACK_CHDB_PATH)?")
        return 1
    lv = levels(rows, segs)

    img = Path(args.img_dir)
    img.mkdir(parents=True, exist_ok=True)
    plot_throughput(lv, img / "issue6-throughput.png")
    plot_ttft(lv, img / "issue6-ttft.png")
    out_path = Path(args.out)
    rel = lambda p: Path(os.path.relpath(Path(p).resolve(), out_path.resolve().parent)).as_posix()  # noqa: E731

    m = machine()
    m["cpu"] = cpu_model() or m["cpu"]
    date = time.strftime("%Y-%m-%d", time.gmtime(run["started"]))
    json_path = Path(args.json or REPO / "loadtest" / "results" / f"{date}-issue6-locust.json")
    json_path.write_text(json.dumps({"machine": m, "run": run, "levels": [asdict(x) for x in lv],
                                     "server": server, "locust": stats_rows}, indent=2, default=str))
    failures = sum(int(r["Failure Count"]) for r in stats_rows if r["Name"] == "Aggregated")
    lines = [
        f"## {args.heading} ({date})", "",
        f"- Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}; commit {m['commit']}.",
        f"- Load: `{run['command']}` against {run['host']} (model `{run['model']}`, {run['max_tokens']} output tokens "
        "per request with `ignore_eos`), then `make bench-report`. Locust failures: "
        f"**{failures}**. Numbers: `{rel(json_path)}`.",
    ]
    if args.note:
        lines.append(f"- {args.note}")
    lines += ["", "Client side (Locust; `TTFT`/`ITL` are its custom events, measured on the SSE stream):", ""]
    lines += client_tables(stats_rows)
    lines += ["", "Server side, same requests (`inferstack stats` over the run: rows the exporter wrote to the "
                  "metrics store; TTFT and queue wait measured from admission):", ""]
    lines += server_tables(server)
    lines += ["", "Per concurrency level (each user count Locust held; tokens spread over each request's decode "
                  "time, TTFT of the requests admitted at that level):", ""]
    lines += level_table(lv)
    lines += ["", f"![Throughput vs concurrency]({rel(img / 'issue6-throughput.png')}) "
                  f"![TTFT percentiles]({rel(img / 'issue6-ttft.png')})", ""]
    doc = out_path.read_text() if out_path.exists() else "# Benchmarks\n"
    out_path.write_text(replace_section(doc, args.heading, "\n".join(lines)))
    print(f"wrote the '{args.heading}' section of {out_path}, plots in {img}, numbers in {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
