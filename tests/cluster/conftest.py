"""Fixtures for the tests on the real control plane.

One control plane per test session (`control_plane`), kubetune installed into it with the real helm
(`installed`), and the operator run as a local process of `kubetune operator`, authenticated as the chart's
ServiceAccount with a token from the TokenRequest API, so the chart's RBAC is what the apiserver enforces.
Each test works in a namespace of its own (`ns`). A test decides a trainer pod's fate through the pod's
annotations (`tests/cluster/stages.yaml`), so the real Job controller sees real exit codes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import pytest
import yaml

from kubetune_cli.local import free_port
from tests.api.rbac import GRANTED, Grant
from tests.cluster.controlplane import (
    LOCAL_QUEUE,
    ControlPlane,
    cluster_queue,
    die_with_parent,
    http_ok,
    kubeconfig,
    local_queue,
)
from tests.objects import finetunejob_body
from tests.support import waiting
from tests.support.availability import require

T = TypeVar("T")
GROUP, VERSION, PLURAL = "kubetune.dev", "v1alpha1", "finetunejobs"
REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "kubetune"
RELEASE, RELEASE_NAMESPACE = "kubetune", "kubetune-system"
TRAINER_IMAGE = "registry.example/kubetune/trainer:test"
FATE = "sim.kubetune.dev/"  # annotation prefix read by the KWOK stages


def wait_for(check: Callable[[], T | None], timeout: float = 30, what: str | Callable[[], str] = "condition") -> T:
    """tests.support.waiting.wait_for with the pace of a real control plane (a 30 s default, 0.1 s polls)."""
    return waiting.wait_for(check, timeout, what, interval=0.1)


class Kube:
    """What a user does with kubectl and the client, as the cluster admin."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.api = kubernetes.config.new_client_from_config(config_file=str(plane.admin_kubeconfig))
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.batch = kubernetes.client.BatchV1Api(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)

    def plain(self, obj: Any) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(obj)  # type: ignore[no-any-return]

    def read(self, read: Callable[..., Any], *args: str) -> dict[str, Any] | None:
        """One object as plain JSON, or None where the API answers 404."""
        try:
            return self.plain(read(*args))
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def kubectl(
        self, *args: str, check: bool = True, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.plane.kubectl(*args, check=check, input_text=input_text)

    # ---- FineTuneJobs ----------------------------------------------------------------------------------
    def apply(self, ns: str, name: str = "run", spec: dict[str, Any] | None = None, **metadata: Any) -> dict[str, Any]:
        body = finetunejob_body(name, ns, spec=spec, **metadata)
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)  # type: ignore[no-any-return]

    def ftj(self, ns: str, name: str = "run") -> dict[str, Any] | None:
        return self.read(self.custom.get_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, name)

    def status(self, ns: str, name: str = "run") -> dict[str, Any]:
        return (self.ftj(ns, name) or {}).get("status") or {}

    def patch_spec(self, ns: str, spec: dict[str, Any], name: str = "run") -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": spec})  # type: ignore[no-any-return]

    def delete_ftj(self, ns: str, name: str = "run") -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    def wait_phase(
        self, ns: str, phase: str, name: str = "run", reason: str | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(ns, name)
            if status.get("phase") == phase and (reason is None or status.get("reason") == reason):
                return status
            return None

        return wait_for(
            reached, timeout, lambda: f"{ns}/{name} {phase} {reason or ''}; status: {self.status(ns, name)}"
        )

    def watch_phase(self, ns: str, phase: str, since: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        """The status in which the FineTuneJob `since` (as the API answered a write of it) reached `phase`, seen
        through a watch from that write: every status written after it is seen, even one that held for a moment
        only (a run that ttlSecondsAfterFinished deletes right after it succeeded), where polling may miss it."""
        name = since["metadata"]["name"]
        seen: list[str] = []
        watch = kubernetes.watch.Watch()
        try:
            for event in watch.stream(
                self.custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL,
                field_selector=f"metadata.name={name}", resource_version=since["metadata"]["resourceVersion"],
                timeout_seconds=int(timeout),
            ):  # fmt: skip
                status = event["object"].get("status") or {}
                seen.append(f"{event['type']} {status.get('phase')}/{status.get('reason')}")
                if status.get("phase") == phase:
                    return dict(status)
        finally:
            watch.stop()
        pytest.fail(f"{ns}/{name} did not reach {phase} within {timeout} s; the watch saw: {seen}")

    # ---- children --------------------------------------------------------------------------------------
    def job(self, ns: str, name: str = "run") -> dict[str, Any] | None:
        return self.read(self.batch.read_namespaced_job, name, ns)

    def wait_job(self, ns: str, name: str = "run", timeout: float = 30) -> dict[str, Any]:
        return wait_for(lambda: self.job(ns, name), timeout, f"Job {ns}/{name}")

    def configmap(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.read(self.core.read_namespaced_config_map, name, ns)

    def pods(self, ns: str, name: str = "run") -> list[dict[str, Any]]:
        listed = self.core.list_namespaced_pod(ns, label_selector=f"batch.kubernetes.io/job-name={name}")
        return sorted((self.plain(p) for p in listed.items), key=lambda p: p["metadata"]["creationTimestamp"])

    def running_pods(self, ns: str, name: str = "run") -> list[dict[str, Any]]:
        return [
            p
            for p in self.pods(ns, name)
            if p.get("status", {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        ]

    def wait_running_pod(
        self, ns: str, name: str = "run", exclude: set[str] | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        """A Running trainer pod of the run (not one of `exclude`, the earlier attempts)."""

        def found() -> dict[str, Any] | None:
            fresh = [p for p in self.running_pods(ns, name) if p["metadata"]["name"] not in (exclude or set())]
            return fresh[-1] if fresh else None

        return wait_for(found, timeout, lambda: f"a Running pod of {ns}/{name}; pods: {self._pod_phases(ns, name)}")

    def _pod_phases(self, ns: str, name: str) -> list[tuple[str, str]]:
        return [(p["metadata"]["name"], p.get("status", {}).get("phase", "")) for p in self.pods(ns, name)]

    def set_fate(self, ns: str, pod: str, exit_code: int, message: str = "", run_for: str = "0s") -> None:
        """The container in `pod` exits with `exit_code` after `run_for`, leaving `message` as its termination
        message (what the trainer writes to /dev/termination-log)."""
        annotations = {
            f"{FATE}exit-code": str(exit_code),
            f"{FATE}run-for": run_for,
            f"{FATE}termination-message": message,
        }
        self.core.patch_namespaced_pod(pod, ns, {"metadata": {"annotations": annotations}})

    def on_sigterm(self, ns: str, pod: str, exit_code: int, message: str = "") -> None:
        """What the container does when the pod is deleted: the trainer checkpoints and exits 3, say."""
        annotations = {f"{FATE}exit-code-on-sigterm": str(exit_code), f"{FATE}termination-message-on-sigterm": message}
        self.core.patch_namespaced_pod(pod, ns, {"metadata": {"annotations": annotations}})

    def run_pod_to(
        self, ns: str, exit_code: int, message: str = "", name: str = "run", exclude: set[str] | None = None
    ) -> str:
        pod = self.wait_running_pod(ns, name, exclude)["metadata"]["name"]
        self.set_fate(ns, pod, exit_code, message)
        return pod

    def events(self, ns: str, name: str = "run") -> list[dict[str, Any]]:
        listed = self.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}")
        return [self.plain(e) for e in listed.items]


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("cluster"))
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlane) -> Kube:
    return Kube(control_plane)


@dataclass(frozen=True)
class Installation:
    """kubetune installed by helm; `kubeconfig` authenticates as the operator's ServiceAccount."""

    namespace: str
    service_account: str
    kubeconfig: Path
    env: dict[str, str]  # what the chart's Deployment sets for the operator container

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def helm(plane: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    from tests.support.tools import ensure_helm

    return subprocess.run(
        [str(ensure_helm()), f"--kubeconfig={plane.admin_kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def install(
    plane: ControlPlane,
    release: str,
    namespace: str,
    *values: str,
    skip_crds: bool = False,
    string_values: tuple[str, ...] = (),
) -> Installation:
    """`helm install` of charts/kubetune (`values` as `--set`, `string_values` as `--set-string`: a label value such
    as "true"), then a token for its ServiceAccount from the TokenRequest API."""
    repository, _, tag = TRAINER_IMAGE.rpartition(":")
    args = [
        "install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--create-namespace",
        "--set",
        f"trainer.image.repository={repository}",
        "--set",
        f"trainer.image.tag={tag}",
    ]
    for value in values:
        args += ["--set", value]
    for value in string_values:
        args += ["--set-string", value]
    if skip_crds:
        args.append("--skip-crds")
    result = helm(plane, *args)
    assert result.returncode == 0, f"helm install failed:\n{result.stderr}"
    deployment = json.loads(plane.kubectl("get", "deployment", "-n", namespace, "-o", "json").stdout)["items"][0]
    pod_spec = deployment["spec"]["template"]["spec"]
    account = pod_spec["serviceAccountName"]
    token = plane.kubectl("create", "token", account, "-n", namespace, "--duration=6h").stdout.strip()
    path = plane.directory / f"{release}-operator.kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig(plane.server, plane.ca, user=account, token=token)))
    path.chmod(0o600)
    env = {e["name"]: e["value"] for e in pod_spec["containers"][0].get("env", []) if "value" in e}
    return Installation(namespace, account, path, env)


@pytest.fixture(scope="session")
def installed(control_plane: ControlPlane) -> Installation:
    return install(control_plane, RELEASE, RELEASE_NAMESPACE)


class OperatorProcess:
    """`kubetune operator` as a process on this machine, with the chart's ServiceAccount's credentials."""

    def __init__(self, installation: Installation, log_dir: Path, **env: str) -> None:
        self.installation = installation
        self.log = log_dir / f"operator-{installation.namespace}.log"
        # The chart's settings, with free ports and short intervals (the process shares this machine's network).
        self.env = {
            **installation.env,
            "KUBECONFIG": str(installation.kubeconfig),
            "KUBETUNE_LISTEN_ADDRESS": "127.0.0.1",
            "KUBETUNE_METRICS_PORT": str(free_port()),
            "KUBETUNE_HEALTH_PORT": str(free_port()),
            "KUBETUNE_PROGRESS_INTERVAL_SECONDS": "0.5",
            "KUBETUNE_PROGRESS_TIMEOUT_SECONDS": "0.5",
            "KUBETUNE_PROGRESS_FAILURE_THRESHOLD": "2",
            # A failing sync is retried every 8 s at most (180 s by default), so that the tests of outages can
            # ask for convergence within 30 s of a fault clearing (tests/cluster/test_outages.py).
            "KUBETUNE_RETRY_MAX_SECONDS": "8",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        kubetune = shutil.which("kubetune", path=str(Path(sys.executable).parent))
        assert kubetune, "the kubetune console script is not installed next to this interpreter"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [kubetune, "operator"],
                preexec_fn=die_with_parent,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(self._healthy, 60, lambda: f"the operator to be healthy; log:\n{self.log_tail()}")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"the operator exited with {self.process.returncode}:\n{self.log_tail()}")
        return http_ok(f"http://127.0.0.1:{self.env['KUBETUNE_HEALTH_PORT']}/healthz")

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies under the operator."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the operator did not stop within 30 s of SIGTERM:\n{self.log_tail()}")
        self.process = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['KUBETUNE_METRICS_PORT']}/metrics"


@pytest.fixture(scope="session")
def operator(installed: Installation, control_plane: ControlPlane) -> Iterator[OperatorProcess]:
    running = OperatorProcess(installed, control_plane.directory / "logs").start()
    try:
        yield running
    finally:
        running.stop()
        assert "Traceback" not in running.log_text(), running.log_tail(80)


@pytest.fixture
def ns(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, with a Kueue LocalQueue; deleted (with all it holds) afterwards."""
    name = f"t-{request.node.name[:40].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    name = "".join(c for c in name if c.isalnum() or c == "-")[:63].strip("-")
    kube.core.create_namespace({"metadata": {"name": name}})
    kube.plane.kubectl_apply([local_queue(name)])
    wait_for(lambda: _has_default_service_account(kube, name), 30, f"ServiceAccount default in {name}")
    yield name
    kube.core.delete_namespace(name)


@pytest.fixture
def eight_gpu_queue(kube: Kube, ns: str) -> Iterator[str]:
    """A LocalQueue in `ns` whose ClusterQueue (8 GPUs) serves only `ns`: quota still held by an earlier test's
    runs never decides this one's. Yields the LocalQueue's name."""
    kube.plane.kubectl_apply([cluster_queue(ns, 8, namespace=ns), local_queue(ns, "eight", cluster_queue_name=ns)])
    yield "eight"
    kube.kubectl("delete", "clusterqueue", ns, "--wait=false")


def require_node() -> None:
    """Skip where a real node cannot run (tests/cluster/node.py says why), except in CI (CI=true): a failure there."""
    from tests.cluster.node import node_problem

    require(node_problem(), "the real node")


def _has_default_service_account(kube: Kube, namespace: str) -> bool:
    return kube.read(kube.core.read_namespaced_service_account, "default", namespace) is not None


# ---- the apiserver's audit log -----------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditedCall:
    verb: str
    group: str
    resource: str
    subresource: str | None
    namespace: str | None
    code: int
    authorized: bool  # RBAC's decision; a 403 may also come from admission (e.g. a namespace being deleted)

    @property
    def grant(self) -> Grant:
        return (self.verb, self.group, self.resource, self.subresource)


def audited_calls(plane: ControlPlane, username: str) -> list[AuditedCall]:
    """Every resource request `username` made, as the real apiserver recorded it."""
    events: dict[str, dict[str, Any]] = {}
    for line in plane.audit_log.read_text().splitlines():
        event = json.loads(line)
        if event.get("user", {}).get("username") == username and event.get("objectRef"):
            events[event["auditID"]] = event  # a watch is logged when it starts; its end may be later
    calls = []
    for event in events.values():
        ref = event["objectRef"]
        calls.append(
            AuditedCall(
                verb=event["verb"],
                group=ref.get("apiGroup", ""),
                resource=ref["resource"],
                subresource=ref.get("subresource") or None,
                namespace=ref.get("namespace"),
                code=event.get("responseStatus", {}).get("code", 0),
                authorized=event.get("annotations", {}).get("authorization.k8s.io/decision") != "forbid",
            )
        )
    return calls


def assert_granted(calls: list[AuditedCall], granted: frozenset[Grant] = GRANTED) -> None:
    forbidden = sorted({(c.grant, c.namespace) for c in calls if not c.authorized}, key=str)
    assert not forbidden, f"RBAC refused these operator calls (403): {forbidden}"
    outside = sorted({c.grant for c in calls} - granted, key=str)
    assert not outside, f"calls outside the chart's RBAC: {outside}"


__all__ = ["LOCAL_QUEUE", "Kube", "OperatorProcess", "audited_calls", "wait_for"]
