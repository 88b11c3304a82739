"""make bench-report's arithmetic and how it edits docs/BENCHMARKS.md."""

import pytest

from loadtest.report import Level, levels, plot_throughput, plot_ttft, replace_section, segments

DOC = "# Benchmarks\n\nintro\n\n## Issue 2 — walking skeleton\n\nold numbers\n\n## Other\n\nkeep me\n"


def test_a_new_section_is_appended_and_others_stay_as_they_were():
    out = replace_section(DOC, "Issue 6 — Locust run", "## Issue 6 — Locust run (2026-11-23)\n\nnew\n")
    assert out.startswith(DOC.rstrip()) and out.endswith("## Issue 6 — Locust run (2026-11-23)\n\nnew\n")


def test_a_rerun_replaces_only_its_own_section():
    first = replace_section(DOC, "Issue 2 — walking skeleton", "## Issue 2 — walking skeleton (again)\n\nnew numbers\n")
    assert "old numbers" not in first and "new numbers" in first
    assert first.index("new numbers") < first.index("## Other") and "keep me" in first and "intro" in first


def test_segments_group_the_seconds_of_each_user_count():
    history = [{"Timestamp": str(t), "User Count": str(u), "Name": "Aggregated"}
               for t, u in [(100, 0), (101, 1), (102, 1), (103, 2), (104, 2), (105, 2), (106, 0)]]
    history.append({"Timestamp": "102", "User Count": "1", "Name": "chat stream"})
    assert segments(history) == [(1, 101, 103), (2, 103, 106)]


def test_levels_spread_tokens_over_decode_time():
    # One request per level: admitted at the start, first token after 0.5 s, 10 tokens
    # over the next 1 s. Level 2 also sees a request that ends at its boundary.
    rows = [
        {"enq": 0.0, "ended": 1.5, "ttft_s": 0.5, "completion_tokens": 10, "status": "finished"},
        {"enq": 10.0, "ended": 12.0, "ttft_s": 1.0, "completion_tokens": 20, "status": "finished"},
        {"enq": 19.0, "ended": 20.0, "ttft_s": None, "completion_tokens": 0, "status": "failed"},
    ]
    lv = levels(rows, [(1, 0, 5), (2, 10, 20)])
    assert lv[0] == Level(1, 5, 1, 10 / 5, 1.5 / 5, 500, 500, 500)
    assert lv[1].requests_finished == 1 and lv[1].output_tokens_per_s == pytest.approx(20 / 10)
    assert lv[1].in_flight_mean == pytest.approx(3 / 10) and lv[1].ttft_p50_ms == pytest.approx(1000)


def test_short_levels_are_left_out():
    assert levels([], [(1, 0, 2)]) == []


def test_plots_are_written(tmp_path):
    lv = [Level(1, 15, 10, 16.0, 1.0, 120, 150, 160), Level(4, 15, 30, 50.0, 4.0, 300, 450, 500)]
    plot_throughput(lv, tmp_path / "t.png")
    plot_ttft(lv, tmp_path / "f.png")
    for name in ("t.png", "f.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and 5_000 < len(data) < 200_000
