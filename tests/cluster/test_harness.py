"""The control-plane harness itself: `python -m tests.cluster up|down` and that no process outlives it."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.__main__ import NODE_STATE_FILE
from tests.cluster.conftest import require_node, wait_for
from tests.cluster.controlplane import STATE_FILE, ControlPlane, _alive
from tests.cluster.node import PAUSE_IMAGE, REAL_NODE_TAINT, RealNode
from tests.images.containers import BUILD_TIMEOUT_SECONDS, build_images, require_docker

REPO_ROOT = Path(__file__).resolve().parents[2]


def cluster_command(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.cluster", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


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


def interfaces() -> set[str]:
    listed = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in listed.splitlines()}


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 600)
def test_up_with_a_node_runs_pods_and_down_leaves_no_process_mount_cgroup_or_interface(tmp_path: Path) -> None:
    require_docker()
    require_node()
    build_images()  # the node's pause image is made from build.sh's local base
    before = interfaces()
    up = cluster_command("up", "--dir", str(tmp_path), "--node", timeout=600)
    assert up.returncode == 0, up.stderr
    kubeconfig = Path(up.stdout.strip())
    state = json.loads((tmp_path / STATE_FILE).read_text())
    node = RealNode.from_state(ControlPlane(tmp_path), json.loads((tmp_path / NODE_STATE_FILE).read_text()))
    kubectl = [str(Path(state["binaries"]) / "kubectl"), f"--kubeconfig={kubeconfig}"]
    try:
        # A pod on the node: a sandbox with its network namespace, veth, cgroups and mounts, all of which `down` undoes.
        toleration = {"key": REAL_NODE_TAINT["key"], "operator": "Exists", "effect": REAL_NODE_TAINT["effect"]}
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "sleeper", "namespace": "default"},
            "spec": {
                "nodeName": node.name,
                "tolerations": [toleration],
                "containers": [{"name": "sleep", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}],
            },
        }

        def applied() -> bool:  # refused until the controller-manager has made the namespace's ServiceAccount
            applying = [*kubectl, "apply", "-f", "-"]
            return (
                subprocess.run(applying, input=json.dumps(pod), capture_output=True, text=True, timeout=60).returncode
                == 0
            )

        def pod_ip() -> str:
            query = [*kubectl, "get", "pod", "sleeper", "-o", "jsonpath={.status.podIP}"]
            return subprocess.run(query, capture_output=True, text=True, timeout=60).stdout.strip()

        wait_for(applied, 60, "the pod to be created")
        wait_for(lambda: pod_ip() and ipaddress.ip_address(pod_ip()) in node.subnet, 120, "the pod's IP on the bridge")
        assert node.processes() and node.mounts() and node.bridge_exists()
        assert interfaces() - before  # the bridge and the pod's veth
    finally:
        down = cluster_command("down", "--dir", str(tmp_path), timeout=300)
    assert down.returncode == 0, down.stderr
    assert not [pid for pid in state["pids"] + node.pids if _alive(pid)]
    assert not node.processes(), node.processes()  # no kubelet, containerd or shim
    assert not node.mounts(), node.mounts()
    assert not interfaces() - before, interfaces() - before
    assert not node.network_namespaces(), node.network_namespaces()
    assert not (node.made_cgroups and Path("/sys/fs/cgroup/memory/kubepods").exists())
    assert not (tmp_path / STATE_FILE).exists() and not (tmp_path / NODE_STATE_FILE).exists()
