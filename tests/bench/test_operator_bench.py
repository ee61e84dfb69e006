"""The operator benchmark, run small, so that it cannot rot: 20 FineTuneJobs, 2 s idle windows.

It runs as a subprocess, as documented (`python bench/operator/run.py`), and only its output's shape and
the reconciliation of every FineTuneJob are checked here; the numbers belong to bench/results/.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_operator_bench_runs_small(tmp_path: pathlib.Path) -> None:
    output = tmp_path / "operator.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "operator" / "run.py"), "--count", "20", "--idle-seconds", "2",
         "--output", str(output), "--workdir", str(tmp_path / "work"), "--timeout", "40"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    result = json.loads(output.read_text())

    assert result["count"] == 20
    assert result["reconcile"]["reconciled"] == 20
    assert set(result["reconcile"]["create_to_job_seconds"]) == {"p50", "p95", "p99", "max", "mean"}
    assert result["reconcile"]["all_jobs_seconds"] > 0
    assert result["until_running"]["writes"] > 0 and result["until_running"]["events"] > 0
    assert result["until_running"]["reads"] == 0  # reconciled from the watch-fed cache
    assert result["until_running"]["by_call"]["create jobs"] == 20
    assert result["until_running"]["list_watch_streams"] > 0
    assert result["peak_rss_mb"] > 0
    for window in ("idle_polling_default", "idle_polling_off"):
        assert result[window]["seconds"] == 2
        assert result[window]["cpu_seconds"] >= 0
    assert {"cpu_model", "cores", "load_average_before", "load_average_after", "python", "kopf"} <= set(
        result["machine"]
    )
    assert set(result["targets"]) == {
        "all_reconciled_seconds",
        "p95_seconds",
        "peak_rss_mb",
        "writes_per_finetunejob",
        "idle_cpu_percent_polling_off",
    }
    assert result["operator"]["log_tracebacks"] == 0, (tmp_path / "work" / "operator.log").read_text()
