"""A real node joins the test control plane (tests/cluster/node.py), and a FineTuneJob runs on it, for real, in the
trainer image: a namespace with Pod Security `restricted` enforced, the operator (the chart's RBAC) creating the Job,
the real Job controller, scheduler and kubelet, S3 on the node's bridge, the status from the real pod's /progress
and termination message. The KWOK nodes carry on for every other test: this node is tainted."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from tests.cluster.conftest import (
    Installation,
    Kube,
    OperatorProcess,
    _has_default_service_account,
    audited_calls,
    helm,
    install,
    require_node,
    wait_for,
)
from tests.cluster.controlplane import ControlPlane
from tests.cluster.node import REAL_NODE_LABEL, REAL_NODE_TAINT, RealNode
from tests.images.containers import BUILD_TIMEOUT_SECONDS, REPO_ROOT, build_images, image_name, require_docker
from tests.support.s3 import S3Endpoint, moto_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 900)]

DATASET = REPO_ROOT / "cli" / "kubetune_cli" / "data" / "support-instructions.jsonl"
STEPS = 20
RESUME_STEPS = 60  # long enough that the pod is deleted mid-run and the replacement has steps left


@pytest.fixture(scope="module")
def real_node(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    require_docker()
    require_node()
    build_images()
    node = RealNode(control_plane, tmp_path_factory.mktemp("node"))
    try:
        yield node.start([image_name("trainer"), image_name("operator")])
    finally:
        node.stop()
        # Nothing outlives the node: no process, mount, bridge or cgroup of its own.
        assert not node.processes(), node.processes()
        assert not node.mounts(), node.mounts()
        assert not node.bridge_exists()
        assert not node.network_namespaces(), node.network_namespaces()
        assert not (node.made_cgroups and Path("/sys/fs/cgroup/memory/kubepods").exists())
        files = [path for path in node.directory.rglob("*") if path.is_file() and not path.is_symlink()]
        left = sum(path.stat().st_size for path in files)
        assert left < 100 * 1024**2, f"{left} bytes left in {node.directory}: the image store must go with the node"


@pytest.fixture(scope="module")
def node_s3(real_node: RealNode) -> Iterator[S3Endpoint]:
    """S3 where the node's pods reach the host: on the bridge's address, not beyond this machine."""
    with moto_server(host=real_node.address) as endpoint:
        yield endpoint


@pytest.fixture
def restricted_ns(kube: Kube) -> Iterator[str]:
    name = f"restricted-{uuid.uuid4().hex[:6]}"
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    kube.core.create_namespace({"metadata": {"name": name, "labels": labels}})
    wait_for(lambda: _has_default_service_account(kube, name), 30, f"ServiceAccount default in {name}")
    yield name
    kube.core.delete_namespace(name)


@dataclass(frozen=True)
class NodeRuns:
    """FineTuneJobs on the real node in one `restricted` namespace, trained by the session's operator, the tiny model
    and the dataset read from (and the artifacts written to) S3 on the node's bridge."""

    kube: Kube
    ns: str
    s3: S3Endpoint
    node: RealNode
    model_dir: Path

    def submit(self, name: str, **spec: Any) -> str:
        """The FineTuneJob `name`, with `spec`'s sections over the defaults here; returns the bucket it uses."""
        bucket = f"real-{uuid.uuid4().hex[:8]}"
        self.s3.make_bucket(bucket)
        self.s3.upload_dir(self.model_dir, bucket, "models/tiny")
        self.s3.client().upload_file(str(DATASET), bucket, "data/train.jsonl")
        if self.kube.read(self.kube.core.read_namespaced_secret, "s3", self.ns) is None:
            credentials = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
            self.kube.core.create_namespaced_secret(self.ns, {"metadata": {"name": "s3"}, "stringData": credentials})
        toleration = {"key": REAL_NODE_TAINT["key"], "operator": "Exists", "effect": REAL_NODE_TAINT["effect"]}
        body = {
            "image": image_name("trainer"),
            "model": {"source": f"s3://{bucket}/models/tiny/"},
            "dataset": {"train": f"s3://{bucket}/data/train.jsonl", "maxLength": 128},
            "training": {"maxSteps": STEPS, "batchSize": 4, "gradientAccumulationSteps": 1, "learningRate": 1e-2},
            "output": {"destination": f"s3://{bucket}/out/"},
            "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"},
            "storage": {"endpoint": self.s3.url, "credentialsSecretRef": {"name": "s3"}},
            "scheduling": {"nodeSelector": {REAL_NODE_LABEL: "true"}, "tolerations": [toleration]},
            **spec,
        }
        self.kube.apply(self.ns, name, spec=body)
        return bucket


@pytest.fixture
def runs(
    kube: Kube,
    operator: OperatorProcess,
    real_node: RealNode,
    node_s3: S3Endpoint,
    restricted_ns: str,
    tiny_model_dir: Path,
) -> NodeRuns:
    return NodeRuns(kube, restricted_ns, node_s3, real_node, tiny_model_dir)


def test_a_finetunejob_runs_to_succeeded_on_a_real_node_under_restricted_pod_security(runs: NodeRuns) -> None:
    kube, ns, node_s3, real_node = runs.kube, runs.ns, runs.s3, runs.node
    bucket = runs.submit("tiny")
    status = kube.wait_phase(ns, "Succeeded", "tiny", reason="Succeeded", timeout=300)

    (pod,) = kube.pods(ns, "tiny")
    assert pod["spec"]["nodeName"] == real_node.name
    assert pod["status"]["podIP"].startswith(real_node.address.rsplit(".", 1)[0] + ".")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    assert terminated["message"].startswith("{")  # the trainer's JSON, written to the termination log
    assert status["result"]["steps"] == STEPS
    assert status["progress"]["step"] > 0  # polled from the real pod's /progress while it trained
    keys = node_s3.list_keys(bucket, "out/")
    assert "out/adapter/adapter_model.safetensors" in keys and "out/COMPLETE" in keys
    # `kubectl logs` goes from the apiserver to the kubelet's API, which reads the container's log file.
    logs = kube.kubectl("logs", "-n", ns, pod["metadata"]["name"]).stdout
    assert re.search(rf"train step \d+/{STEPS} loss", logs), logs[-3000:]
    # The container's CPU limit (resources.cpu: 1), read from its own cgroup, not the node's 2 cores.
    assert "CPU threads per worker: 1 (1 usable CPUs, CPU limit 1;" in logs, logs[:3000]
    assert "; allocator tcmalloc" in logs, logs[:3000]  # the image's, preloaded by the trainer's re-execution


def last_state(kube: Kube, ns: str, pod: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """The pod as it was when the API server removed it (its DELETED event), seen through a watch that starts from
    `pod` as read: the kubelet's final container status, which no read can see once the pod is gone."""
    name = pod["metadata"]["name"]
    watch = kubernetes.watch.Watch()
    try:
        for event in watch.stream(
            kube.core.list_namespaced_pod, ns, field_selector=f"metadata.name={name}",
            resource_version=pod["metadata"]["resourceVersion"], timeout_seconds=int(timeout),
        ):  # fmt: skip
            if event["type"] == "DELETED":
                return kube.plain(event["object"])
    finally:
        watch.stop()
    pytest.fail(f"pod {ns}/{name} was not deleted within {timeout} s")


def test_a_deleted_pod_checkpoints_on_the_kubelets_sigterm_and_its_replacement_resumes(runs: NodeRuns) -> None:
    kube, ns, node_s3, steps = runs.kube, runs.ns, runs.s3, RESUME_STEPS
    # No periodic checkpoint: the one the replacement resumes from is the one SIGTERM made.
    training = {"maxSteps": steps, "batchSize": 4, "gradientAccumulationSteps": 1, "learningRate": 1e-2,
                "checkpointEverySteps": 1000, "evalEverySteps": 1000, "logEverySteps": 1}  # fmt: skip
    bucket = runs.submit("resume", training=training)
    wait_for(
        lambda: (kube.status(ns, "resume").get("progress") or {}).get("step", 0) >= 2,
        180, lambda: f"the first pod's progress; status: {kube.status(ns, 'resume')}",
    )  # fmt: skip
    (first,) = kube.running_pods(ns, "resume")
    grace = first["spec"]["terminationGracePeriodSeconds"]

    kube.kubectl("delete", "pod", first["metadata"]["name"], "-n", ns, "--wait=false")
    gone = last_state(kube, ns, first, timeout=grace)
    terminated = gone["status"]["containerStatuses"][0]["state"]["terminated"]
    # Exit 3, not the 137 of a SIGKILL at the end of the grace: the trainer stopped by itself, checkpoint saved.
    assert terminated["exitCode"] == 3, terminated
    message = json.loads(terminated["message"])
    assert message["outcome"] == "preempted", message
    step = message["checkpoint"]["step"]
    assert 2 <= step < steps
    assert f"out/checkpoints/step-{step}/COMPLETE" in node_s3.list_keys(bucket, "out/checkpoints/")

    status = kube.wait_phase(ns, "Succeeded", "resume", reason="Succeeded", timeout=300)
    (second,) = kube.pods(ns, "resume")
    assert second["metadata"]["name"] != first["metadata"]["name"]
    assert status["result"]["steps"] == steps
    metrics = json.loads(node_s3.read(bucket, "out/metrics.json"))
    assert metrics["resumed_from_step"] == step  # the replacement read the SIGTERM checkpoint, not step 0
    assert metrics["loss_history"][0]["step"] <= step < metrics["loss_history"][-1]["step"] == steps
    assert status["progress"]["resumedFromStep"] == step  # /progress of the replacement pod, as the operator saw it


def test_a_memory_limit_too_small_ends_in_the_kernels_oom_kill_reported_with_advice(runs: NodeRuns) -> None:
    kube, ns = runs.kube, runs.ns
    # 128Mi is less than the trainer's Python and torch take to start: the memory cgroup's OOM killer ends it.
    runs.submit("small", resources={"gpus": 0, "cpu": "1", "memory": "128Mi"}, runPolicy={"backoffLimit": 0})
    status = kube.wait_phase(ns, "Failed", "small", timeout=180)
    (pod,) = kube.pods(ns, "small")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137), terminated
    assert status["reason"] == "OOMKilled", status
    assert "raise resources.memory" in status["message"]


def test_an_image_that_cannot_be_pulled_shows_in_status_at_once(runs: NodeRuns) -> None:
    kube, ns = runs.kube, runs.ns
    # A registry on a loopback port nothing listens on: the pull fails at once, without trying the network.
    image = "127.0.0.1:9/kubetune/no-such-trainer:0"
    runs.submit("wrong", image=image)

    def stuck() -> dict[str, Any] | None:
        status = kube.status(ns, "wrong")
        return status if status.get("reason") in ("ErrImagePull", "ImagePullBackOff") else None

    status = wait_for(stuck, 60, lambda: f"a pull error in status; status: {kube.status(ns, 'wrong')}")
    assert status["phase"] == "Pending"  # not Failed: a registry credential or a pushed image may still fix it
    assert image in status["message"], status
    events = [e for e in kube.events(ns, "wrong") if e["reason"] in ("ErrImagePull", "ImagePullBackOff")]
    assert events and events[0]["type"] == "Warning"


def test_the_operator_runs_as_a_pod_of_its_image_installed_by_helm(
    kube: Kube, control_plane: ControlPlane, installed: Installation, real_node: RealNode
) -> None:
    """The chart's Deployment on the real node: the operator image as 65532, read-only, its ServiceAccount's token
    mounted by the kubelet and used in-cluster (through the `kubernetes` Service's address), its probes passing, its
    metrics read from its pod IP. It watches one empty namespace of its own, leaving the tests' runs to the
    session's operator."""
    suffix = uuid.uuid4().hex[:6]
    release, namespace, watched = f"pod-{suffix}", f"operator-pod-{suffix}", f"watched-{suffix}"
    kube.core.create_namespace({"metadata": {"name": watched}})
    repository, _, tag = image_name("operator").rpartition(":")
    values = [
        f"image.repository={repository}", f"image.tag={tag}", "image.pullPolicy=Never",
        f"tolerations[0].key={REAL_NODE_TAINT['key']}", "tolerations[0].operator=Exists",
        f"tolerations[0].effect={REAL_NODE_TAINT['effect']}",
        f"watchNamespaces={{{watched}}}",
    ]  # fmt: skip
    selector = "nodeSelector." + REAL_NODE_LABEL.replace(".", "\\.") + "=true"  # helm: an escaped dot in a key
    installation = install(control_plane, release, namespace, *values, skip_crds=True, string_values=(selector,))
    try:

        def ready_pod() -> dict[str, Any] | None:
            for pod in kube.core.list_namespaced_pod(namespace).items:
                plain = kube.plain(pod)
                ready = [c for c in plain["status"].get("conditions") or [] if c["type"] == "Ready"]
                if ready and ready[0]["status"] == "True":
                    return plain
            return None

        pod = wait_for(
            ready_pod,
            180,
            lambda: f"a Ready operator pod; pods: {kube.kubectl('get', 'pods', '-n', namespace, '-o', 'wide').stdout}",
        )
        assert pod["spec"]["nodeName"] == real_node.name
        (container,) = pod["status"]["containerStatuses"]
        assert container["restartCount"] == 0 and container["ready"]  # liveness and readiness probes pass
        token_mounts = [m for m in pod["spec"]["containers"][0]["volumeMounts"]
                        if m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"]  # fmt: skip
        assert token_mounts, pod["spec"]["containers"][0]["volumeMounts"]

        # The token is used: the apiserver saw the ServiceAccount list FineTuneJobs, from the pod's in-cluster login.
        def listed_finetunejobs() -> bool:
            calls = audited_calls(control_plane, installation.username)
            return any(call.resource == "finetunejobs" and call.code == 200 for call in calls)

        wait_for(listed_finetunejobs, 60, "the operator pod's calls in the audit log")
        metrics_port = next(p["containerPort"] for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "metrics")
        url = f"http://{pod['status']['podIP']}:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            exposition = response.read().decode()
        assert "kubetune_" in exposition, exposition[:2000]
    finally:
        helm(control_plane, "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s")
        kube.core.delete_namespace(namespace)
        kube.core.delete_namespace(watched)


def test_two_pods_of_an_indexed_job_rendezvous_through_the_headless_service_and_train_together(runs: NodeRuns) -> None:
    """resources.nodes 2: the Indexed Job's pods find node 0 by its name under the headless Service (CoreDNS on the
    node), torchrun's c10d rendezvous joins them, and gloo's DDP trains one model over both (on CPU: a multi-node run
    asks for a GPU per node, which the node advertises as an extended resource that no device plugin backs)."""
    kube, ns, real_node = runs.kube, runs.ns, runs.node
    real_node.advertise_gpus(2)
    bucket = runs.submit("pair", resources={"gpus": 1, "nodes": 2, "cpu": "750m", "memory": "4Gi"})
    status = kube.wait_phase(ns, "Succeeded", "pair", reason="Succeeded", timeout=300)
    pods = kube.pods(ns, "pair")
    assert sorted(p["spec"]["hostname"] for p in pods) == ["pair-0", "pair-1"]
    assert {p["spec"]["nodeName"] for p in pods} == {real_node.name}
    assert [p["status"]["phase"] for p in pods] == ["Succeeded", "Succeeded"]
    assert status["result"]["steps"] == STEPS
    metrics = json.loads(runs.s3.read(bucket, "out/metrics.json"))
    assert metrics["world_size"] == 2  # one process per pod, one model


# The trainer image with one change: `python` (the command the Job builder writes) is a wrapper that, in the pod of
# index 1 only, hands the real trainer a copy of its config whose dataset.fields.response names a column the data
# lacks. Both pods read one ConfigMap, so this is the one way to make a single index refuse its input for real.
FAULTY_PYTHON = """#!/opt/venv/bin/python
import json, os, sys
args = sys.argv[1:]
if os.environ.get("JOB_COMPLETION_INDEX") == "1":
    at = args.index("--config") + 1
    with open(args[at]) as source:
        config = json.load(source)
    config["dataset"].setdefault("fields", {})["response"] = "reply"
    with open("/tmp/config.json", "w") as copy:
        json.dump(config, copy)
    args[at] = "/tmp/config.json"
os.execv("/opt/venv/bin/python", ["/opt/venv/bin/python", *args])  # argv[0] names the venv
"""


@pytest.fixture
def invalid_on_index_1(real_node: RealNode, tmp_path: Path) -> Iterator[str]:
    """The image name of the trainer whose index-1 pod refuses its input, loaded into the node."""
    name = image_name("trainer").replace("/trainer:", "/trainer-invalid-on-index-1:")
    (tmp_path / "python").write_text(FAULTY_PYTHON)
    (tmp_path / "python").chmod(0o755)
    (tmp_path / "Dockerfile").write_text(
        f"FROM {image_name('trainer')}\nCOPY python /fault/python\nENV PATH=/fault:$PATH\n"
    )
    subprocess.run(["docker", "build", "-q", "-t", name, str(tmp_path)], check=True, capture_output=True, timeout=300)
    try:
        real_node.load(name)
        yield name
    finally:
        subprocess.run(["docker", "rmi", name], capture_output=True, timeout=120, check=False)


def test_invalid_input_on_one_index_of_a_real_multi_node_run_fails_the_run_once(
    runs: NodeRuns, invalid_on_index_1: str
) -> None:
    """Index 1's real trainer refuses its input behind the launcher: the launcher's exit 2 reaches the real Job's
    podFailurePolicy (FailJob), the Job controller stops index 0, and nothing is retried."""
    kube, ns = runs.kube, runs.ns
    runs.node.advertise_gpus(2)
    runs.submit("halfbad", image=invalid_on_index_1, resources={"gpus": 1, "nodes": 2, "cpu": "750m", "memory": "4Gi"},
                runPolicy={"backoffLimit": 3})  # fmt: skip
    status = kube.wait_phase(ns, "Failed", "halfbad", reason="InvalidInput", timeout=300)
    assert status["message"].startswith("node 1 (pod "), status
    assert "dataset.fields.response" in status["message"], status
    job = kube.job(ns, "halfbad")
    assert any(c["type"] == "Failed" and c["reason"] == "PodFailurePolicy" for c in job["status"]["conditions"]), job
    # The Job controller stops index 0 (it waited in the rendezvous or trained alone) and deletes its pod.
    wait_for(lambda: all(p["status"]["phase"] in ("Succeeded", "Failed") for p in kube.pods(ns, "halfbad")), 60,
             "the Job controller to stop index 0")  # fmt: skip
    created = [e["message"] for e in kube.events(ns, "halfbad")
               if e["involvedObject"]["kind"] == "Job" and e["reason"] == "SuccessfulCreate"]  # fmt: skip
    assert len(created) == 2, f"exit 2 must not be retried: {created}"
    failed = next(p for p in kube.pods(ns, "halfbad") if p["spec"]["hostname"] == "halfbad-1")
    terminated = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 2, terminated  # the launcher's code, as the kubelet saw the container end
