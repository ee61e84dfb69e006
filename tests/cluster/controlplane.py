"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
KWOK (simulated nodes and kubelets) and Kueue, each a process of the binaries `tests/cluster/build.sh` built.

Only nodes and containers are simulated: admission, defaulting, pruning, CEL, RBAC, the Job controller,
garbage collection, TTL, scheduling and Kueue's admission are the real components. Every process gets free
ports and a directory of its own under the cluster's directory; `stop()` (or `python -m tests.cluster down`)
ends them all, and processes started by a test session die with it (parent-death signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetune_cli.local import free_port
from tests.cluster import pki

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
VERSIONS_FILE = HERE / "versions.env"
STAGES_FILE = HERE / "stages.yaml"
STATE_FILE = "cluster.json"
ADMIN_KUBECONFIG = "admin.kubeconfig"
AUDIT_LOG = "audit.log"

GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODES = ("gpu-node-1", "gpu-node-2")
GPUS_PER_NODE = 8
CPU_NODE = "cpu-node-1"
# Pods on this node get loopback addresses, so a real trainer process on this machine can stand in for the
# container and the operator's progress poll reaches it. Tainted: only pods that tolerate it land there.
LOOPBACK_NODE = "loopback-node"
LOOPBACK_POD_CIDR = "127.0.100.0/24"
LOOPBACK_TAINT = {"key": "kubetune.dev/loopback", "value": "true", "effect": "NoSchedule"}

# The simulated kubelet cannot pull this image (tests/cluster/stages.yaml): its pods stay in ImagePullBackOff.
IMAGE_THAT_CANNOT_BE_PULLED = "registry.invalid/kubetune/trainer:missing"

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service's ClusterIP: the range's first address

KUEUE_NAMESPACE = "kueue-system"
CLUSTER_QUEUE = "gpu-cluster-queue"
LOCAL_QUEUE = "gpu"
KUEUE_GPU_QUOTA = 8  # one GPU node's worth: a second 8-GPU run waits
# Kueue watches a hard-coded path for its metrics certificate when its own cert management is off.
KUEUE_METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")

READY_TIMEOUT = 120.0
_PR_SET_PDEATHSIG = 1


class ControlPlaneError(RuntimeError):
    """A component could not be started; the message names it and the end of its log."""


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    versions: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip()
    return versions


def testbins_dir() -> Path:
    """Where build.sh puts the binaries (the same rule as there)."""
    if os.environ.get("KUBETUNE_TESTBINS"):
        return Path(os.environ["KUBETUNE_TESTBINS"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "kubetune-testbins"


@dataclass(frozen=True)
class Binaries:
    """Where build.sh put each component of the pinned versions."""

    kubernetes: Path
    etcd: Path
    kwok: Path
    kueue: Path
    versions: dict[str, str]

    @classmethod
    def locate(cls) -> Binaries:
        versions = read_versions()
        root = testbins_dir()
        found = cls(
            kubernetes=root / f"kubernetes-{versions['K8S_VERSION']}",
            etcd=root / f"etcd-{versions['ETCD_VERSION']}",
            kwok=root / f"kwok-{versions['KWOK_VERSION']}",
            kueue=root / f"kueue-{versions['KUEUE_VERSION']}",
            versions=versions,
        )
        missing = [
            str(p) for p in (found.kubernetes, found.etcd, found.kwok, found.kueue) if not (p / ".done").is_file()
        ]
        if missing:
            raise ControlPlaneError(f"not built: {', '.join(missing)}; run `bash tests/cluster/build.sh`")
        return found

    def bin(self, component: str) -> Path:
        home = {"etcd": self.etcd, "kwok": self.kwok, "kueue": self.kueue}.get(component, self.kubernetes)
        return home / "bin" / component

    @property
    def kubectl(self) -> Path:
        return self.bin("kubectl")

    @property
    def kueue_crds(self) -> Path:
        return self.kueue / "crds"

    @property
    def kwok_stages(self) -> Path:
        return self.kwok / "stage"


def die_with_parent() -> None:
    """preexec_fn: the child is killed when the test session that started it exits, however it exits. SIGKILL,
    not SIGTERM: an apiserver whose etcd went at the same moment waits on in a graceful shutdown."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self, *, tie_to_parent: bool) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
                preexec_fn=die_with_parent if tie_to_parent else None,
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ControlPlaneError(
                f"{self.name} exited with {self.process.returncode}; its log ({self.log}) ends:\n{self.log_tail()}"
            )


def stop_pids(pids: Iterable[int], timeout: float = 10.0) -> None:
    """End each process group in turn, in the order given (callers name dependents before what they depend on:
    an apiserver whose etcd is already gone waits out a graceful shutdown): SIGTERM, SIGKILL what is left after
    `timeout`, and return only once every process has ended. A SIGKILL is not instant: a process that has been
    sent one may still run for a moment, and "stopped" must mean ended."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        if _wait_ended(pid, timeout):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if not _wait_ended(pid, timeout):
            raise ControlPlaneError(f"process {pid} still runs {timeout:g} s after SIGKILL")


def _wait_ended(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    """True while `pid` runs; a child that has exited but is not reaped yet (a zombie) counts as ended."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def kubeconfig(
    server: str,
    ca: Path,
    *,
    user: str,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    credentials: dict[str, Any] = (
        {"token": token} if token else {"client-certificate": str(cert), "client-key": str(key)}
    )
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubetune-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": "kubetune-test", "user": user, "namespace": namespace}}],
        "current-context": user,
    }


class ControlPlane:
    """One cluster, in `directory`. `start()` returns when every component answers as ready."""

    def __init__(self, directory: Path, binaries: Binaries | None = None) -> None:
        self.directory = directory.resolve()
        self.binaries = binaries or Binaries.locate()
        self.components: list[Component] = []
        self.ports: dict[str, int] = {}
        self.started_seconds: float | None = None
        self._tie_to_parent = True

    # ---- paths -------------------------------------------------------------------------------------------
    @property
    def admin_kubeconfig(self) -> Path:
        return self.directory / ADMIN_KUBECONFIG

    @property
    def audit_log(self) -> Path:
        return self.directory / AUDIT_LOG

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def ca(self) -> Path:
        return self.directory / "pki" / "ca.crt"

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self, *, tie_to_parent: bool = True) -> None:
        started = time.monotonic()
        self._tie_to_parent = tie_to_parent
        if (self.directory / STATE_FILE).exists():
            raise ControlPlaneError(f"{self.directory} already holds a cluster; run `down` first")
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in (
            "etcd",
            "etcd_peer",
            "apiserver",
            "controller_manager",
            "scheduler",
            "kwok",
            "kueue_webhook",
            "kueue_health",
            "kueue_metrics",
        ):
            self.ports[name] = free_port()
        self._write_pki()
        try:
            self._start_etcd(tie_to_parent)
            self._start_apiserver(tie_to_parent)
            self._start_controllers(tie_to_parent)
            self._create_nodes()
            self._start_kueue(tie_to_parent)
        except BaseException:
            self.stop()
            raise
        self.started_seconds = time.monotonic() - started
        self._save_state()

    def stop(self) -> None:
        stop_pids([c.process.pid for c in reversed(self.components) if c.process is not None])
        for component in self.components:
            if component.process is not None:
                component.process.wait(timeout=10)  # already ended by stop_pids: this only reaps it
        self.components.clear()
        (self.directory / STATE_FILE).unlink(missing_ok=True)

    # ---- faults ------------------------------------------------------------------------------------------
    def kill_component(self, name: str) -> None:
        """Kill one component (`kube-apiserver`, `etcd`) with SIGKILL, as a crash would: requests in flight get no
        answer and no graceful shutdown keeps serving meanwhile. `start_component` brings it back."""
        component = self._component(name)
        assert component.process is not None, f"{name} is not running"
        os.killpg(component.process.pid, signal.SIGKILL)
        component.process.wait(timeout=30)
        component.process = None

    def start_component(self, name: str) -> None:
        """Start a stopped component again, with its flags, ports and data; returns once it answers as ready."""
        component = self._component(name)
        component.start(tie_to_parent=self._tie_to_parent)
        ready: dict[str, Callable[[], bool]] = {
            "etcd": lambda: http_ok(f"http://127.0.0.1:{self.ports['etcd']}/health"),
            "kube-apiserver": lambda: self._get("/readyz") is not None,
        }
        self._wait(component, ready[name])
        self._save_state()

    def _component(self, name: str) -> Component:
        found = [component for component in self.components if component.name == name]
        if not found:
            raise ControlPlaneError(f"no component {name}: {', '.join(c.name for c in self.components)}")
        return found[0]

    def _save_state(self) -> None:
        state = {
            "pids": [c.process.pid for c in self.components if c.process is not None],
            "kubeconfig": str(self.admin_kubeconfig),
            "server": self.server,
            "ports": self.ports,
            "versions": self.binaries.versions,
            "binaries": str(self.binaries.kubectl.parent),
            "startSeconds": self.started_seconds,
        }
        (self.directory / STATE_FILE).write_text(json.dumps(state, indent=2))

    def _launch(self, name: str, argv: list[str], tie_to_parent: bool, env: dict[str, str] | None = None) -> Component:
        component = Component(name, argv, self.directory / "logs" / f"{name}.log", env or {})
        component.start(tie_to_parent=tie_to_parent)
        self.components.append(component)
        return component

    # ---- certificates and kubeconfigs --------------------------------------------------------------------
    def _write_pki(self) -> None:
        self._ca = pki.CertificateAuthority(self.directory / "pki")
        # KUBERNETES_SERVICE_IP: where the kubelet tells a real node's pods the apiserver is (tests/cluster/node.py).
        hosts = ("127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 KUBERNETES_SERVICE_IP)  # fmt: skip
        self._serving = self._ca.issue("serving", "kube-apiserver", hosts=hosts)
        self._sa = pki.service_account_keys(self.directory / "pki")
        admin = self._ca.issue("admin", "kubetune-test-admin", organization="system:masters")
        self._admin = admin
        # The control plane's own components act as cluster admins: the tests check kubetune's RBAC, not theirs.
        self._component_kubeconfig = self.directory / "components.kubeconfig"
        components = self._ca.issue("components", "kubetune-test-components", organization="system:masters")
        self._write_kubeconfig(self._component_kubeconfig, user="components", cert=components.cert, key=components.key)
        # What the apiserver shows a kubelet (logs, exec, port-forward): a real node trusts this CA's clients.
        self._kubelet_client = self._ca.issue("kubelet-client", "kube-apiserver-kubelet-client")

    def kubelet_serving_certificate(self, node: str, address: str) -> pki.KeyPair:
        """A serving certificate for a real node's kubelet at `address`, from the CA the apiserver checks kubelets
        against (`--kubelet-certificate-authority`)."""
        return self._ca.issue(f"kubelet-{node}", f"system:node:{node}", organization="system:nodes", hosts=(address,))

    def _write_kubeconfig(self, path: Path, **kwargs: Any) -> None:
        path.write_text(yaml.safe_dump(kubeconfig(f"https://127.0.0.1:{self.ports['apiserver']}", self.ca, **kwargs)))
        path.chmod(0o600)

    # ---- etcd --------------------------------------------------------------------------------------------
    def _start_etcd(self, tie_to_parent: bool) -> None:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd_peer']}"
        etcd = self._launch(
            "etcd",
            [
                str(self.binaries.bin("etcd")),
                "--name=kubetune-test",
                f"--data-dir={self.directory / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=kubetune-test={peer}",
                "--unsafe-no-fsync",  # a throwaway cluster: durability is not what is tested
                "--log-level=warn",
            ],
            tie_to_parent,
        )
        self._wait(etcd, lambda: http_ok(f"{client}/health"))

    # ---- kube-apiserver ----------------------------------------------------------------------------------
    def _start_apiserver(self, tie_to_parent: bool) -> None:
        audit_policy = self.directory / "audit-policy.yaml"
        audit_policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        self._write_kubeconfig(self.admin_kubeconfig, user="admin", cert=self._admin.cert, key=self._admin.key)
        apiserver = self._launch(
            "kube-apiserver",
            [
                str(self.binaries.bin("kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports['apiserver']}",
                f"--cert-dir={self.directory / 'apiserver'}",
                f"--tls-cert-file={self._serving.cert}",
                f"--tls-private-key-file={self._serving.key}",
                f"--client-ca-file={self.ca}",
                "--authorization-mode=RBAC",
                # The plugin behind the chart's `update finetunejobs/finalizers` grant (blockOwnerDeletion).
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                # Nodes get no not-ready taint at registration: no node-lifecycle controller removes it here, and KWOK
                # nodes are Ready from their first status.
                "--disable-admission-plugins=TaintNodesByCondition",
                # Aggregation is not used; the delegating components still want a request-header CA to read.
                f"--requestheader-client-ca-file={self.ca}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self._sa.cert}",
                f"--service-account-signing-key-file={self._sa.key}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                # `kubectl logs` on a real node (tests/cluster/node.py): the apiserver calls its kubelet at the node's
                # InternalIP (the node's name resolves nowhere), checks its serving certificate against the test CA
                # and shows a client certificate of that CA. KWOK's nodes serve no kubelet API.
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-certificate-authority={self.ca}",
                f"--kubelet-client-certificate={self._kubelet_client.cert}",
                f"--kubelet-client-key={self._kubelet_client.key}",
                # No kubelets to reach and a loopback address the `kubernetes` Service may not point at.
                "--endpoint-reconciler-type=none",
                f"--audit-policy-file={audit_policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
                "--profiling=false",
            ],
            tie_to_parent,
        )
        self._wait(apiserver, lambda: self._get("/readyz") is not None)

    # ---- controller-manager, scheduler, kwok -------------------------------------------------------------
    def _start_controllers(self, tie_to_parent: bool) -> None:
        kc = str(self._component_kubeconfig)
        serving = self._ca.issue("components-serving", "kubetune-test-components", hosts=("127.0.0.1", "localhost"))

        def serving_flags(port: str) -> list[str]:  # what the controller-manager and the scheduler share
            return [
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports[port]}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                "--leader-elect=false",
            ]

        manager = self._launch(
            "kube-controller-manager",
            [
                str(self.binaries.bin("kube-controller-manager")),
                *serving_flags("controller_manager"),
                "--use-service-account-credentials=false",
                # What a FineTuneJob's life touches: Jobs and their pods, ownership, TTL, namespaces, the default
                # ServiceAccount every pod needs, and EndpointSlices for the multi-node headless Service.
                "--controllers=job-controller,garbage-collector-controller,ttl-after-finished-controller,"
                "namespace-controller,serviceaccount-controller,endpointslice-controller,"
                "pod-garbage-collector-controller,resourcequota-controller,"
                # kube-root-ca.crt in every namespace: the CA of a ServiceAccount token the kubelet mounts in a pod.
                "root-ca-certificate-publisher-controller,"
                # The chart's Deployment gets its pod (the operator as a pod on the real node; elsewhere a KWOK pod
                # that runs nothing, beside the operator the tests run as a process).
                "deployment-controller,replicaset-controller",
                "--concurrent-job-syncs=10",
                # What the publisher writes as kube-root-ca.crt: without it, the CA data of the controller-manager's
                # kubeconfig, empty when that names the CA by file (as here), and a pod's client then refuses to start.
                f"--root-ca-file={self.ca}",
            ],
            tie_to_parent,
        )
        scheduler = self._launch(
            "kube-scheduler",
            [
                str(self.binaries.bin("kube-scheduler")),
                *serving_flags("scheduler"),
            ],
            tie_to_parent,
        )
        kwok_config = self.directory / "kwok.yaml"
        kwok_config.write_text(yaml.safe_dump_all(kwok_stages(self.binaries.kwok_stages)))
        kwok = self._launch(
            "kwok",
            [
                str(self.binaries.bin("kwok")),
                f"--kubeconfig={kc}",
                f"--config={kwok_config}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-label-selector=type=kwok",
                f"--server-address=127.0.0.1:{self.ports['kwok']}",
                "--cidr=10.244.0.0/16",
                "--node-ip=10.1.0.1",
            ],
            tie_to_parent,
        )
        self._wait(manager, lambda: http_ok(f"https://127.0.0.1:{self.ports['controller_manager']}/healthz", self.ca))
        self._wait(scheduler, lambda: http_ok(f"https://127.0.0.1:{self.ports['scheduler']}/healthz", self.ca))
        self._wait(kwok, lambda: http_ok(f"http://127.0.0.1:{self.ports['kwok']}/healthz"))
        self._wait(manager, lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default") is not None)

    def _create_nodes(self) -> None:
        nodes = [kwok_node(name, gpus=GPUS_PER_NODE) for name in GPU_NODES]
        nodes.append(kwok_node(CPU_NODE, gpus=0))
        nodes.append(kwok_node(LOOPBACK_NODE, gpus=GPUS_PER_NODE, pod_cidr=LOOPBACK_POD_CIDR, taints=[LOOPBACK_TAINT]))
        self.kubectl_apply(nodes)
        kwok = next(c for c in self.components if c.name == "kwok")
        self._wait(kwok, lambda: all(self._node_ready(n["metadata"]["name"]) for n in nodes))

    def _node_ready(self, name: str) -> bool:
        node = self._get(f"/api/v1/nodes/{name}")
        conditions = (node or {}).get("status", {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    # ---- kueue -------------------------------------------------------------------------------------------
    def _start_kueue(self, tie_to_parent: bool) -> None:
        self.kubectl("create", "namespace", KUEUE_NAMESPACE)
        self.kubectl("apply", "--server-side", "-f", str(self.binaries.kueue_crds))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        certs = self.directory / "kueue-certs"
        certs.mkdir(exist_ok=True)
        serving = self._ca.issue("kueue", "kueue", hosts=("127.0.0.1", "localhost"))
        for suffix, source in (("crt", serving.cert), ("key", serving.key)):
            (certs / f"tls.{suffix}").write_bytes(source.read_bytes())
        _install_kueue_metrics_cert(certs)
        config = self.directory / "kueue.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "config.kueue.x-k8s.io/v1beta2",
                    "kind": "Configuration",
                    "namespace": KUEUE_NAMESPACE,
                    "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports['kueue_health']}"},
                    "metrics": {"bindAddress": f"127.0.0.1:{self.ports['kueue_metrics']}"},
                    # The webhook server starts in any case; no webhook is registered with the apiserver: kubetune
                    # creates its Jobs suspended with the queue label, which is what Kueue's Job webhook would ensure.
                    "webhook": {"port": self.ports["kueue_webhook"], "host": "127.0.0.1", "certDir": str(certs)},
                    "leaderElection": {"leaderElect": False},
                    "internalCertManagement": {"enable": False},
                    "integrations": {"frameworks": ["batch/job"]},
                }
            )
        )
        kueue = self._launch(
            "kueue",
            [
                str(self.binaries.bin("kueue")),
                f"--config={config}",
                f"--kubeconfig={self._component_kubeconfig}",
                "--feature-gates=VisibilityOnDemand=false",
            ],
            tie_to_parent,
            env={"NAMESPACE": KUEUE_NAMESPACE},
        )
        self._wait(kueue, lambda: http_ok(f"http://127.0.0.1:{self.ports['kueue_health']}/readyz"))
        self.kubectl_apply(kueue_queues())

    # ---- helpers -----------------------------------------------------------------------------------------
    def kubectl(
        self, *args: str, input_text: str | None = None, check: bool = True, kubeconfig_path: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """kubectl as the cluster admin (or as `kubeconfig_path`)."""
        result = subprocess.run(
            [str(self.binaries.kubectl), f"--kubeconfig={kubeconfig_path or self.admin_kubeconfig}", *args],
            input=input_text,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def kubectl_apply(self, objects: list[dict[str, Any]]) -> None:
        self.kubectl("apply", "--server-side", "-f", "-", input_text=yaml.safe_dump_all(objects))

    def _get(self, path: str) -> dict[str, Any] | None:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self._admin.cert), str(self._admin.key))
        try:
            with urllib.request.urlopen(f"{self.server}{path}", context=context, timeout=5) as response:
                body = response.read()
        except (urllib.error.URLError, OSError):
            return None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return {"text": body.decode(errors="replace")}

    def _wait(self, component: Component, ready: Callable[[], bool], timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            component.check_alive()
            if ready():
                return
            time.sleep(0.1)
        raise ControlPlaneError(
            f"{component.name} not ready within {timeout:.0f} s; its log ends:\n{component.log_tail()}"
        )


def http_ok(url: str, ca: Path | None = None) -> bool:
    """Whether `url` answers 200 (an https one checked against `ca`)."""
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(url, context=context, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _install_kueue_metrics_cert(certs: Path) -> None:
    """Kueue reads its metrics certificate from a fixed path when its own cert management is off: put one there
    unless one exists (its content does not matter here: the tests never scrape Kueue)."""
    target = KUEUE_METRICS_CERT_DIR
    if (target / "tls.crt").is_file() and (target / "tls.key").is_file():
        return
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name in ("tls.crt", "tls.key"):
            (target / name).write_bytes((certs / name).read_bytes())
    except OSError as error:
        raise ControlPlaneError(
            f"Kueue needs its metrics certificate at {target} (a path fixed in Kueue's main); cannot write it: {error}"
        ) from None


AUDIT_POLICY: dict[str, Any] = {
    # Metadata of every request the operator (a ServiceAccount) makes: the calls its RBAC must cover.
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
        {"level": "None"},
    ],
}


def kwok_node(
    name: str, *, gpus: int, pod_cidr: str | None = None, taints: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    capacity = {"cpu": "64", "memory": "512Gi", "ephemeral-storage": "2Ti", "pods": "110"}
    if gpus:
        capacity[GPU_RESOURCE] = str(gpus)
    spec: dict[str, Any] = {"taints": taints or []}
    if pod_cidr:
        spec["podCIDR"] = pod_cidr
        spec["podCIDRs"] = [pod_cidr]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                **({"nvidia.com/gpu.present": "true"} if gpus else {}),
            },
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "spec": spec,
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def kueue_queues(namespace: str = "default") -> list[dict[str, Any]]:
    return [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default-flavor"}},
        cluster_queue(CLUSTER_QUEUE, KUEUE_GPU_QUOTA),
        local_queue(namespace),
    ]


def cluster_queue(name: str, gpus: int, namespace: str | None = None) -> dict[str, Any]:
    """A ClusterQueue with `gpus` GPUs (and ample CPU and memory), for every namespace or just `namespace`."""
    selector = {"matchLabels": {"kubernetes.io/metadata.name": namespace}} if namespace else {}
    quotas = [("cpu", "256"), ("memory", "2Ti"), (GPU_RESOURCE, str(gpus))]
    flavor = {"name": "default-flavor", "resources": [{"name": r, "nominalQuota": q} for r, q in quotas]}
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": selector,
            "resourceGroups": [{"coveredResources": [r for r, _ in quotas], "flavors": [flavor]}],
        },
    }


def local_queue(namespace: str, name: str = LOCAL_QUEUE, cluster_queue_name: str = CLUSTER_QUEUE) -> dict[str, Any]:
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterQueue": cluster_queue_name},
    }


# kwok's own stages that stand in for the kubelet's ordinary work, with its delays shortened (a second plus
# up to five of jitter per pod by default) so a test waits on kubetune, not on the simulation.
KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "pod/general/pod-create.yaml",
    "pod/general/pod-ready.yaml",
    "pod/general/pod-delete.yaml",
)
STAGE_DELAY_MS = 100


def kwok_stages(kwok_stage_dir: Path) -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = []
    for relative in KWOK_STAGES:
        stage = yaml.safe_load((kwok_stage_dir / relative).read_text())
        delay = stage["spec"].get("delay")
        if delay:
            delay["durationMilliseconds"] = STAGE_DELAY_MS
            delay.pop("jitterDurationMilliseconds", None)
        if stage["metadata"]["name"] == "pod-ready":  # a missing image never starts (kubetune-image-pull-backoff)
            stage["spec"]["selector"]["matchExpressions"].append(
                {"key": ".spec.containers.[].image", "operator": "NotIn", "values": [IMAGE_THAT_CANNOT_BE_PULLED]}
            )
        if stage["metadata"]["name"] == "pod-delete":
            # kwok waits until the deletionTimestamp (the whole grace period) by default; a kubelet removes the
            # pod as soon as its containers have exited. A running container is first stopped
            # (kubetune-container-sigterm), as a kubelet does.
            delay.pop("jitterDurationFrom", None)
            stage["spec"]["selector"]["matchExpressions"].append(
                {"key": ".status.phase", "operator": "NotIn", "values": ["Pending", "Running"]}
            )
        stages.append(stage)
    stages.extend(yaml.safe_load_all(STAGES_FILE.read_text()))
    return stages
