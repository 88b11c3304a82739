"""Run ``loadtest/locustfile.py`` headless against a stack and record how it was run.

    python -m loadtest.run --host http://127.0.0.1:8000 --users 8 --duration 60s
    python -m loadtest.run --host ... --steps 1,2,4,8 --step-s 15     # a staircase of users

This is what ``make loadtest`` calls. It writes Locust's CSVs under the ``--csv``
prefix (``_stats_history.csv`` per second; ``_final_stats.csv``, ``_final_failures.csv``,
``_final_exceptions.csv`` once every request has ended) plus ``<prefix>_run.json``
(command, options, start and end time) for ``make bench-report``. It exits non-zero
when any request failed or a task raised — also during the stop timeout, which
Locust's own exit code does not see.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def locust_command(args: argparse.Namespace) -> list[str]:
    locustfile = os.path.relpath(LOCUSTFILE) if not os.path.relpath(LOCUSTFILE).startswith("..") else str(LOCUSTFILE)
    users, duration = args.users, args.duration
    if args.steps:  # the step shape decides; -u/-t only restate it
        steps = [int(x) for x in args.steps.split(",")]
        users, duration = max(steps), f"{len(steps) * args.step_s:g}s"
    cmd = [sys.executable, "-m", "locust", "-f", locustfile, "--headless", "--host", args.host,
           "-u", str(users), "-r", str(args.spawn_rate), "-t", duration, "--csv", args.csv,
           "--csv-full-history", "--only-summary", "--stop-timeout", str(args.stop_timeout),
           "--exit-code-on-error", "1", "--model", args.model, "--max-tokens", str(args.max_tokens)]
    return cmd + list(args.user_classes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", required=True, help="the stack, e.g. http://127.0.0.1:8000")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--spawn-rate", type=float, default=1.0, help="users started per second")
    ap.add_argument("--duration", default="60s", help="Locust run time, e.g. 20s, 5m")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--csv", default="loadtest/results/locust", help="prefix of the CSV files")
    ap.add_argument("--steps", default="", help="e.g. 1,2,4,8: user counts held --step-s each (overrides -u/-t)")
    ap.add_argument("--step-s", type=float, default=15.0)
    ap.add_argument("--stop-timeout", type=int, default=60, help="seconds running requests may finish at the end")
    ap.add_argument("user_classes", nargs="*", help="only these user classes (default: all enabled ones)")
    args = ap.parse_args(argv)

    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    prefix = ""
    if args.steps:
        env.update(LOCUST_STEPS=args.steps, LOCUST_STEP_S=f"{args.step_s:g}")
        prefix = f"LOCUST_STEPS={args.steps} LOCUST_STEP_S={args.step_s:g} "
    cmd = locust_command(args)
    command = prefix + "locust " + " ".join(shlex.quote(c) for c in cmd[3:])
    print(f"[loadtest] {command}", flush=True)
    started = time.time()
    code = subprocess.call(cmd, env=env)
    failures = final_failures(args.csv)
    if code == 0 and failures:
        code = 1
    record = {"host": args.host, "users": args.users, "spawn_rate": args.spawn_rate, "duration": args.duration,
              "steps": args.steps, "step_s": args.step_s, "model": args.model, "max_tokens": args.max_tokens,
              "user_classes": args.user_classes, "command": command, "started": started, "ended": time.time(),
              "exit_code": code}
    Path(f"{args.csv}_run.json").write_text(json.dumps(record, indent=2))
    print(f"[loadtest] exit code {code}: {failures} failed requests or task errors; CSVs: {args.csv}_*.csv"
          + ("" if code == 0 else f" — see {args.csv}_final_failures.csv and _final_exceptions.csv"), flush=True)
    return code


def final_failures(prefix: str) -> int:
    """Failed requests plus task exceptions, from the CSVs written after the last user stopped."""
    total = 0
    try:
        with open(f"{prefix}_final_stats.csv", newline="") as f:
            total += sum(int(r["Failure Count"]) for r in csv.DictReader(f) if r["Name"] == "Aggregated")
        with open(f"{prefix}_final_exceptions.csv", newline="") as f:
            total += sum(int(r["Count"]) for r in csv.DictReader(f))
    except FileNotFoundError:
        return 1  # Locust did not get to the end
    return total


if __name__ == "__main__":
    sys.exit(main())
