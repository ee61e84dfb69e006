"""A real node for the test control plane: kubelet, containerd (a second instance of Debian's, from docker.io), runc
and the CNI bridge plugin, on a private bridge this harness creates and removes, with CoreDNS as its cluster DNS.

Pods on it run for real, from images imported into its containerd from the local docker (no registry): the trainer
image, and a stand-in for the pause image (any image whose command sleeps forever). The node is tainted, so only
pods that tolerate `REAL_NODE_TAINT` land on it; the KWOK nodes keep serving every other test.

What it took on these machines (cgroup v1, root without CAP_SYS_RESOURCE), each also in ENVIRONMENT.md:
`failCgroupV1: false` and the cgroupfs driver for the kubelet; `restrict_oom_score_adj` in containerd's CRI config;
runc v1.5.3 built with seccomp (Debian's 1.1 fails to start sandboxes here). Pod networking stays on the bridge:
no masquerading, no route outward. The kubelet's API listens on the bridge's address (the node's InternalIP, where
the apiserver calls it for `kubectl logs`), its healthz and containerd's stream server on loopback.

`stop()` leaves nothing: pods on the node are deleted first (the kubelet tears their sandboxes and network
namespaces down through CNI), then the kubelet, containerd and any shim of ours end, their mounts are undone, the
kubepods cgroups the kubelet made are removed (when it made them), the bridge is deleted, and so is the Node.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from kubetune_cli.local import free_port
from tests.cluster.controlplane import (
    KUBERNETES_SERVICE_IP,
    Component,
    ControlPlane,
    read_versions,
    stop_pids,
    testbins_dir,
)
from tests.support.outage import OutageProxy

REAL_NODE_TAINT = {"key": "kubetune.dev/real-node", "value": "true", "effect": "NoSchedule"}
REAL_NODE_LABEL = "kubetune.dev/real-node"
PAUSE_IMAGE = "kubetune.test/pause:1"
CLUSTER_DOMAIN = "cluster.local"
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/run/netns")  # where CNI names a pod's network namespace
READY_TIMEOUT = 120.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # containerd adds none to an image


def node_binaries() -> Path:
    """Where build.sh put the kubelet, runc and the CNI plugins for the pinned versions."""
    versions = read_versions()
    name = f"node-{versions['K8S_VERSION']}-runc{versions['RUNC_VERSION']}-cni{versions['CNI_PLUGINS_VERSION']}"
    return testbins_dir() / name


def coredns_binary() -> Path:
    """Where build.sh put CoreDNS for the pinned version."""
    return testbins_dir() / f"coredns-{read_versions()['COREDNS_VERSION']}" / "bin" / "coredns"


def node_problem() -> str | None:
    """Why a real node cannot run here, or None."""
    if os.geteuid() != 0:
        return "a real node needs root (a bridge, mounts, cgroups)"
    if not (node_binaries() / ".done").is_file():
        return f"{node_binaries()} is not built (bash tests/cluster/build.sh; runc needs libseccomp-dev, pkg-config)"
    if not coredns_binary().is_file():
        return f"{coredns_binary()} is not built (bash tests/cluster/build.sh)"
    for tool in (CONTAINERD, CTR, shutil.which("ip") or "ip"):
        if not Path(tool).exists():
            return f"{tool} is missing (apt-get install docker.io iproute2)"
    return None


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.245.0.0/16 that no interface of this machine uses (other sessions may have a node too): not in
    KWOK's 10.244.0.0/16, whose made-up pod IPs the operator polls too."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    for third in range(0, 256):
        subnet = ipaddress.IPv4Network(f"10.245.{third}.0/24")
        if f" {subnet[1]}/" not in used:
            return subnet
    raise RuntimeError("no free /24 left in 10.245.0.0/16")


@dataclass
class RealNode:
    plane: ControlPlane
    directory: Path
    name: str = field(default_factory=lambda: f"real-{uuid.uuid4().hex[:6]}")
    components: list[Component] = field(default_factory=list)
    subnet: ipaddress.IPv4Network = field(default_factory=free_subnet)
    made_cgroups: bool = False
    tie_to_parent: bool = True  # False: the node outlives the process that started it (`python -m tests.cluster up`)
    pids: list[int] = field(default_factory=list)  # of containerd and the kubelet, in start order
    apiserver_proxy: OutageProxy | None = None  # a thread of the process that started the node
    started_at: float = field(default_factory=time.time)

    def state(self) -> dict[str, Any]:
        """What `from_state` needs to stop this node from another process (`python -m tests.cluster down`)."""
        return {
            "name": self.name,
            "directory": str(self.directory),
            "subnet": str(self.subnet),
            "madeCgroups": self.made_cgroups,
            "startedAt": self.started_at,
            "pids": self.pids,
        }

    @classmethod
    def from_state(cls, plane: ControlPlane, state: dict[str, Any]) -> RealNode:
        return cls(
            plane,
            Path(state["directory"]),
            name=state["name"],
            subnet=ipaddress.IPv4Network(state["subnet"]),
            made_cgroups=state["madeCgroups"],
            started_at=state["startedAt"],
            tie_to_parent=False,
            pids=list(state["pids"]),
        )

    @property
    def bridge(self) -> str:
        return f"kt{self.name[-6:]}"  # interface names are at most 15 characters

    @property
    def address(self) -> str:
        """The bridge's address on this machine: the node's IP, and where its pods reach the host."""
        return str(self.subnet[1])

    @property
    def socket(self) -> Path:
        return self.directory / "containerd" / "containerd.sock"

    # ---- start ---------------------------------------------------------------------------------------------
    def start(self, images: list[str]) -> RealNode:
        bins = node_binaries()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.made_cgroups = not (CGROUP_ROOT / "memory" / "kubepods").exists()
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("addr", "add", f"{self.address}/{self.subnet.prefixlen}", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        self._serve_the_apiserver_to_pods()
        self._start_containerd(bins)
        self.load(self._pause_image())
        _run(["docker", "rmi", PAUSE_IMAGE])  # made for this node only: its containerd holds it now
        for image in images:
            self.load(image)
        self._start_cluster_dns()
        self._start_kubelet(bins)
        self._wait(lambda: self._ready(), "the node to be Ready")
        return self

    def _serve_the_apiserver_to_pods(self) -> None:
        """The kubelet gives every pod KUBERNETES_SERVICE_HOST/PORT, the `kubernetes` Service's ClusterIP and 443,
        which no kube-proxy routes here, and the apiserver listens on loopback only. So that ClusterIP is an address
        of the bridge (pods get a route to it through the bridge, and no default route), and a TCP proxy on it
        forwards to the apiserver, whose serving certificate names that IP: the in-cluster configuration of a pod
        (the operator's) works unchanged, and nothing listens beyond loopback and the bridge. One real node per
        machine at a time: the address and port are fixed."""
        self._ip("addr", "add", f"{KUBERNETES_SERVICE_IP}/32", "dev", self.bridge)
        self.apiserver_proxy = OutageProxy(self.plane.server, host=KUBERNETES_SERVICE_IP, port=443)

    def _start_containerd(self, bins: Path) -> None:
        home = self.directory / "containerd"
        cni = self.directory / "cni"
        cni.mkdir(parents=True)
        (cni / "10-kubetune.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "kubetune",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": self.bridge,
                            "isGateway": True,
                            "ipMasq": False,  # nothing is routed beyond this machine
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": str(self.subnet), "gateway": self.address}]],
                                # No default route (nothing leaves this machine): the bridge's subnet, and the
                                # `kubernetes` Service's address, which the bridge holds (_serve_the_apiserver_to_pods).
                                "routes": [{"dst": f"{KUBERNETES_SERVICE_IP}/32"}],
                                "dataDir": str(self.directory / "ipam"),
                            },
                        },
                        {"type": "loopback"},
                    ],
                }
            )
        )
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{home / "root"}"
state = "{home / "state"}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{home / "opt"}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        BinaryName = "{bins / "bin" / "runc"}"
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{bins / "bin" / "cni"}"
    conf_dir = "{cni}"
"""
        home.mkdir(parents=True)
        (home / "config.toml").write_text(config)
        self._launch("containerd", [CONTAINERD, "--config", str(home / "config.toml")])
        self._wait(lambda: self._ctr("version").returncode == 0, "containerd to answer")

    def _start_cluster_dns(self) -> None:
        """CoreDNS on the bridge's address, port 53, answering for cluster.local from the apiserver (Services, and the
        pods of a headless Service by hostname: a multi-node run's peers), and for nothing else: no upstream, so a
        pod's lookup of any other name fails here rather than leaving this machine. No health or metrics port."""
        corefile = self.directory / "Corefile"
        corefile.write_text(
            f"""{CLUSTER_DOMAIN}:53 {{
    bind {self.address}
    errors
    kubernetes {CLUSTER_DOMAIN} {{
        kubeconfig {self.plane.admin_kubeconfig}
    }}
}}
"""
        )
        self._launch("coredns", [str(coredns_binary()), "-conf", str(corefile)])

    def _pause_image(self) -> str:
        """The sandbox image: the local Python base with a command that sleeps forever, as 65532."""
        base = "kubetune-base/python:3.11-bookworm"
        created = _run(["docker", "create", base], check=True).stdout.strip()
        try:
            changes = ['CMD ["/bin/sleep", "infinity"]', "USER 65532:65532", f"ENV PATH={DEFAULT_PATH}"]
            _run(["docker", "commit", *(f"--change={change}" for change in changes), created, PAUSE_IMAGE], check=True)
        finally:
            _run(["docker", "rm", created])
        return PAUSE_IMAGE

    def load(self, image: str) -> None:
        """Import `image` from the docker daemon into the node's containerd (no registry)."""
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        assert save.stdout is not None
        imported = subprocess.run(
            [CTR, "--address", str(self.socket), "-n", "k8s.io", "images", "import", "-"],
            stdin=save.stdout, capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        save.stdout.close()
        assert save.wait(timeout=60) == 0 and imported.returncode == 0, f"importing {image}: {imported.stderr}"

    def _start_kubelet(self, bins: Path) -> None:
        serving = self.plane.kubelet_serving_certificate(self.name, self.address)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # these machines run cgroup v1
            "cgroupDriver": "cgroupfs",
            # The kubelet API on the bridge's address, the node's InternalIP, where the apiserver calls it for
            # `kubectl logs`; with a serving certificate from the test CA for that address, which the apiserver checks.
            "address": self.address,
            "tlsCertFile": str(serving.cert),
            "tlsPrivateKeyFile": str(serving.key),
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(self.plane.ca)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "failSwapOn": False,
            "resolvConf": "/etc/resolv.conf",
            "clusterDNS": [self.address],  # CoreDNS, _start_cluster_dns
            "clusterDomain": CLUSTER_DOMAIN,
            "podLogsDir": str(self.directory / "pods"),
            "registerWithTaints": [REAL_NODE_TAINT],
            # A busy shared disk must not evict the test's pods.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
        }
        path = self.directory / "kubelet.yaml"
        path.write_text(yaml.safe_dump(config))
        self._launch(
            "kubelet",
            [
                str(bins / "bin" / "kubelet"),
                f"--config={path}",
                f"--kubeconfig={self.plane.admin_kubeconfig}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.address}",
                f"--node-labels={REAL_NODE_LABEL}=true",
                f"--root-dir={self.directory / 'kubelet'}",
            ],
        )

    def advertise_gpus(self, count: int, resource: str = "nvidia.com/gpu") -> None:
        """Give the node `count` of `resource` in its capacity (an extended resource no device plugin backs), so
        that pods asking for GPUs are scheduled and admitted here; they run on the CPU."""
        patch = [{"op": "add", "path": f"/status/capacity/{resource.replace('/', '~1')}", "value": str(count)}]
        self.plane.kubectl("patch", "node", self.name, "--subresource=status", "--type=json", "-p", json.dumps(patch))
        self._wait(lambda: resource in ((self._node() or {}).get("status", {}).get("allocatable") or {}),
                   f"{resource} in the node's allocatable")  # fmt: skip

    # ---- stop ----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """End everything start() began, in the order that lets each part clean up after itself."""
        with contextlib.suppress(Exception):
            self._delete_pods()
        stop_pids(reversed(self.pids), timeout=20)  # the kubelet, then containerd (SIGTERM, then SIGKILL)
        for component in self.components:
            if component.process is not None:
                component.process.wait(timeout=10)  # already ended: this only reaps it
        for process in self.processes():  # shims outlive containerd by design
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(self.processes(), timeout=10)
        for mount in reversed(self.mounts()):
            subprocess.run(["umount", "--lazy", mount], capture_output=True, check=False)
        for netns in self.network_namespaces():  # CNI's, named outside the node's folder; each takes its pod's veth
            subprocess.run(["umount", str(netns)], capture_output=True, check=False)
            netns.unlink(missing_ok=True)
        if self.made_cgroups:
            for controller in CGROUP_ROOT.iterdir():
                kubepods = controller / "kubepods"
                if kubepods.is_dir():
                    for folder in sorted(kubepods.rglob("*"), key=lambda p: -len(p.parts)):
                        if folder.is_dir():
                            with contextlib.suppress(OSError):
                                folder.rmdir()
                    with contextlib.suppress(OSError):
                        kubepods.rmdir()
        if self.apiserver_proxy is not None:
            self.apiserver_proxy.close()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        self.plane.kubectl("delete", "node", self.name, "--ignore-not-found", check=False)
        # The imported trainer image, as containerd's content and unpacked snapshots, is ~12 GB: pytest keeps the
        # last three runs' temporary folders, and three of these filled the disk. Logs and configs stay.
        for folder in (self.directory / "containerd" / "root", self.directory / "containerd" / "state"):
            shutil.rmtree(folder, ignore_errors=True)

    def _delete_pods(self) -> None:
        """Delete the pods bound to this node and wait until containerd runs no task of theirs. Cordoned first: a
        Deployment's replacement pod would land here again, and containerd would end with its sandbox up."""
        self.plane.kubectl("cordon", self.name, check=False)
        self.plane.kubectl(
            "delete", "pods", "--all-namespaces", f"--field-selector=spec.nodeName={self.name}", "--wait=false",
            check=False,
        )  # fmt: skip
        self._wait(lambda: "RUNNING" not in self._ctr("tasks", "ls").stdout, "the node's pods to end", timeout=60)

    def processes(self) -> list[psutil.Process]:
        """Every process whose command line names this node's folder (containerd, its shims, the kubelet)."""
        mine = []
        for process in psutil.process_iter(["cmdline"]):
            if any(str(self.directory) in part for part in process.info["cmdline"] or []):
                mine.append(process)
        return mine

    def mounts(self) -> list[str]:
        with open("/proc/mounts") as table:
            return [line.split()[1] for line in table if line.split()[1].startswith(str(self.directory))]

    def network_namespaces(self) -> list[Path]:
        """The pod network namespaces (`/run/netns/cni-*`) made since this node started that no process uses: those a
        sandbox left when it ended with containerd. Another node's, in use, are not touched."""
        in_use = set()
        for ns in Path("/proc").glob("[0-9]*/ns/net"):
            with contextlib.suppress(OSError):
                in_use.add(ns.stat().st_ino)
        found = []
        for netns in sorted(NETNS_DIR.glob("cni-*")):
            with contextlib.suppress(OSError):
                info = netns.stat()
                if info.st_mtime >= self.started_at and info.st_ino not in in_use:
                    found.append(netns)
        return found

    def bridge_exists(self) -> bool:
        return subprocess.run(["ip", "link", "show", self.bridge], capture_output=True, check=False).returncode == 0

    # ---- helpers -------------------------------------------------------------------------------------------
    def _launch(self, name: str, argv: list[str]) -> None:
        component = Component(name, argv, self.directory / "logs" / f"{name}.log")
        component.start(tie_to_parent=self.tie_to_parent)
        self.components.append(component)
        assert component.process is not None
        self.pids.append(component.process.pid)

    def _ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run([CTR, "--address", str(self.socket), "-n", "k8s.io", *args])

    def _ip(self, *args: str) -> None:
        _run(["ip", *args], check=True)

    def _ready(self) -> bool:
        node = self._node()
        conditions = (node or {}).get("status", {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    def _node(self) -> dict[str, Any] | None:
        result = self.plane.kubectl("get", "node", self.name, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def _wait(self, ready: Any, what: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for component in self.components:
                component.check_alive()
            if ready():
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {c.name}:\n{c.log_tail()}" for c in self.components)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def _run(argv: list[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result
