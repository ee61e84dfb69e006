"""The control-plane harness itself: `python -m tests.cluster up|down` and that no process outlives it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.cluster.conftest import wait_for
from tests.cluster.controlplane import STATE_FILE, _alive

REPO_ROOT = Path(__file__).resolve().parents[2]


def cluster_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.cluster", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=180)  # fmt: skip


def test_up_prints_a_working_kubeconfig_and_down_ends_every_process(tmp_path: Path) -> None:
    up = cluster_command("up", "--dir", str(tmp_path))
    assert up.returncode == 0, up.stderr
    kubeconfig = Path(up.stdout.strip())
    state = json.loads((tmp_path / STATE_FILE).read_text())
    pids = state["pids"]
    try:
        assert len(pids) == 6  # etcd, apiserver, controller-manager, scheduler, kwok, kueue
        nodes = subprocess.run(
            [str(Path(state["binaries"]) / "kubectl"), f"--kubeconfig={kubeconfig}", "get", "nodes", "-o", "name"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.split()  # fmt: skip
        assert sorted(nodes) == ["node/cpu-node-1", "node/gpu-node-1", "node/gpu-node-2", "node/loopback-node"]
        assert cluster_command("up", "--dir", str(tmp_path)).returncode == 1  # one cluster per directory
    finally:
        down = cluster_command("down", "--dir", str(tmp_path))
    assert down.returncode == 0, down.stderr
    assert not [pid for pid in pids if _alive(pid)]
    assert not (tmp_path / STATE_FILE).exists()


def test_components_die_with_the_session_that_started_them(tmp_path: Path) -> None:
    """A test session killed with SIGKILL (no cleanup) takes its control plane with it."""
    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from tests.cluster.controlplane import ControlPlane\n"
        f"plane = ControlPlane(Path({str(tmp_path)!r}))\n"
        "plane.start()\n"
        "print(json.dumps([c.process.pid for c in plane.components]), flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["operator", "trainer", "cli", "."])}
    session = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert session.stdout is not None
        pids = json.loads(session.stdout.readline())
        assert len(pids) == 6 and all(_alive(pid) for pid in pids)
    finally:
        session.send_signal(signal.SIGKILL)
        session.wait()
        session.stdout.close()
    wait_for(lambda: not [pid for pid in pids if _alive(pid)], 30, "the components to exit with their session")
