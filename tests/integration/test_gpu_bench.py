"""loadtest/gpu_bench.py in its --smoke mode (tiny model, CPU), in a Python that cannot
import what a lent GPU machine lacks, so what docs/BENCHMARKS.md says to carry holds."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ABSENT_ON_GPU_HOST = ["redis", "pydantic", "pydantic_settings", "fastapi", "starlette", "uvicorn", "sse_starlette",
                      "orjson", "psutil", "prometheus_client", "clickhouse_connect", "chdb", "rq"]


def test_smoke_run_measures_both_systems_without_the_stacks_dependencies(tmp_path):
    out = tmp_path / "smoke.json"
    code = (f"import runpy, sys\nfor m in {ABSENT_ON_GPU_HOST!r}:\n    sys.modules[m] = None  # import fails\n"
            f"sys.argv = ['gpu_bench', '--smoke', '--out', {str(out)!r}]\n"
            "runpy.run_module('loadtest.gpu_bench', run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["system"], r["concurrency"]): r for r in result["results"]}
    assert set(rows) == {(s, c) for s in ("inferstack", "transformers-cb") for c in (1, 4)}, result["results"]
    for (system, c), row in rows.items():
        assert row["requests"] == max(2 * c, 4), row
        assert row["output_tokens"] == row["requests"] * result["output_tokens"], row  # exactly 8 each, EOS ignored
        assert row["output_tok_s"] > 0 and row["ttft_p50_ms"] > 0 and row["tpot_p50_ms"] > 0, row
    assert result["dtype"] in ("float32", "bfloat16") and result["dtype_reason"]
