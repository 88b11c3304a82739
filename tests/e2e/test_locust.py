"""A 20-second headless Locust run (``make loadtest``'s runner) against the real
stack on SmolLM2: every user class CI runs sends requests, and none fails."""

import csv
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_locust_20s_headless_run_has_zero_failures(stack, tmp_path):
    prefix = tmp_path / "locust"
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--host", stack.url, "--users", "4", "--spawn-rate", "4",
         "--duration", "20s", "--max-tokens", "8", "--csv", str(prefix)],
        env={**os.environ, "LOCUST_NOISY_BURST": "3"}, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    assert rows[("", "Aggregated")]["Failure Count"] == "0"
    for key in [("POST", "chat stream"), ("POST", "completion"), ("POST", "multi-turn"), ("TTFT", "chat stream"),
                ("ITL", "chat stream"), ("TTFT", "multi-turn")]:
        assert int(rows[key]["Request Count"]) > 0, key
    assert sum(int(r["Request Count"]) for (t, n), r in rows.items() if n.startswith("noisy flood")) > 0
    assert not any(n.startswith("image job") for _, n in rows)  # media jobs stay out unless LOCUST_MEDIA=1
