"""The operator benchmark's real-control-plane backend, run small so that it cannot rot: 5 FineTuneJobs on a
control plane of its own (bench/operator/cluster.py), 1 s idle windows. Only the output's shape and the
apiserver-counted requests are checked, not the timings."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_operator_bench_runs_small_on_a_real_control_plane(tmp_path: pathlib.Path) -> None:
    output = tmp_path / "operator.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "operator" / "run.py"), "--backend", "cluster", "--count", "5",
         "--idle-seconds", "1", "--output", str(output), "--workdir", str(tmp_path / "work"), "--timeout", "60"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    result = json.loads(output.read_text())
    assert result["reconcile"]["reconciled"] == 5
    assert set(result["reconcile"]["create_to_job_seconds"]) == {"p50", "p95", "p99", "max", "mean"}
    counted = result["until_running"]
    assert result["operator"]["authenticated_as"].startswith("system:serviceaccount:")
    # Counted by the apiserver's audit log: one ConfigMap and one Job each, no reads (the cache serves them).
    assert counted["by_call"]["create jobs"] == 5 and counted["by_call"]["create configmaps"] == 5
    assert counted["reads"] == 0
    assert counted["by_call"]["patch finetunejobs/status"] >= 5
    assert {"kube-apiserver", "etcd"} <= set(counted["control_plane_cpu_seconds"])
    assert result["operator"]["log_tracebacks"] == 0, (tmp_path / "work" / "operator-cluster.log").read_text()
