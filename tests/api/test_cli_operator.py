"""`kubetune operator`, the container's entrypoint, as a process: liveness, metrics, reconciliation, SIGTERM."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import urllib.request

import psutil
import pytest

from tests.api.fixtures import Cluster, free_port, operator_env, wait_for
from tests.kubeapi.fixtures import KUBECONFIG_PATH

ROOT = pathlib.Path(__file__).parents[2]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_kubetune_operator_runs_the_operator(cluster: Cluster) -> None:
    health = free_port()
    env = {
        **os.environ,
        **operator_env(KUBETUNE_HEALTH_PORT=str(health), KUBETUNE_NAMESPACES="default"),
        "KUBECONFIG": str(KUBECONFIG_PATH),
        "PYTHONPATH": os.pathsep.join(str(ROOT / part) for part in ("operator", "trainer", "cli")),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "kubetune_cli.main", "operator"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{health}/healthz"), timeout=30, what="liveness endpoint")
        metrics = f"http://127.0.0.1:{env['KUBETUNE_METRICS_PORT']}/metrics"
        assert answers(metrics)
        # KUBETUNE_LISTEN_ADDRESS=127.0.0.1: both listen on loopback only, on a host shared with others
        ports = {health, int(env["KUBETUNE_METRICS_PORT"])}
        listening = [c.laddr for c in psutil.Process(process.pid).net_connections() if c.status == psutil.CONN_LISTEN]
        assert {address.port for address in listening} >= ports, listening
        assert all(address.ip == "127.0.0.1" for address in listening if address.port in ports), listening
        cluster.apply()
        cluster.wait_job()
        cluster.wait_phase("Pending")
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "Traceback" not in output, output
