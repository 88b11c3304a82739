"""A 20-second headless Locust run (``make loadtest``'s runner) against the real
stack on SmolLM2: every user class CI runs takes part, and nothing fails."""

import csv
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_locust_20s_headless_run_has_zero_failures(stack, tmp_path):
    prefix = tmp_path / "locust"
    # 7 users: the noisy tenant (fixed_count 1) and six spread 3:1:1:1 over chat stream,
    # completion, multi-turn and tool agent, so every weighted class gets a user.
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--host", stack.url, "--users", "7", "--spawn-rate", "7",
         "--duration", "20s", "--max-tokens", "8", "--csv", str(prefix)],
        # The noisy tenant at normal priority: at low it may wait out the whole 20 s behind the
        # others (aging lifts it after INFERSTACK_AGING_MAX_WAIT_S), which is the scheduler's job.
        env={**os.environ, "LOCUST_NOISY_BURST": "3", "LOCUST_NOISY_PRIORITY": "normal"},
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    with open(f"{prefix}_final_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(f"{prefix}_final_exceptions.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []  # a task that raised would not show up as a failed request
    total = next(r for r in rows if r["Name"] == "Aggregated")
    assert total["Failure Count"] == "0" and int(total["Request Count"]) > 0
    seen = {r["Name"] for r in rows if int(r["Request Count"]) > 0}
    # Each class took part (requests still running at the end finish in the stop timeout
    # and are counted in the final CSV).
    for name in ("chat stream", "completion", "multi-turn", "tool agent call"):
        assert name in seen, (name, seen, run.stderr[-3000:])
    assert any(n.startswith("noisy flood") for n in seen), seen
    assert not any(n.startswith("image job") for n in seen)  # media jobs stay out unless LOCUST_MEDIA=1
