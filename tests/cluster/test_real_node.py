"""A real node joins the test control plane (tests/cluster/node.py), and a FineTuneJob runs on it, for real, in the
trainer image: a namespace with Pod Security `restricted` enforced, the operator (the chart's RBAC) creating the Job,
the real Job controller, scheduler and kubelet, S3 on the node's bridge, the status from the real pod's /progress
and termination message. The KWOK nodes carry on for every other test: this node is tainted."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.conftest import Kube, OperatorProcess, _has_default_service_account, wait_for
from tests.cluster.controlplane import ControlPlane
from tests.cluster.node import REAL_NODE_LABEL, REAL_NODE_TAINT, RealNode, node_problem
from tests.images.containers import BUILD_TIMEOUT_SECONDS, REPO_ROOT, build_images, image_name, require_docker
from tests.support.s3 import S3Endpoint, moto_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 900)]

DATASET = REPO_ROOT / "cli" / "kubetune_cli" / "data" / "support-instructions.jsonl"
STEPS = 20


def require_node() -> None:
    problem = node_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the real node, but {problem}")
    pytest.skip(problem)


@pytest.fixture(scope="module")
def real_node(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    require_docker()
    require_node()
    build_images()
    node = RealNode(control_plane, tmp_path_factory.mktemp("node"))
    try:
        yield node.start([image_name("trainer")])
    finally:
        node.stop()
        # Nothing outlives the node: no process, mount, bridge or cgroup of its own.
        assert not node.processes(), node.processes()
        assert not node.mounts(), node.mounts()
        assert not node.bridge_exists()
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


def test_a_finetunejob_runs_to_succeeded_on_a_real_node_under_restricted_pod_security(
    kube: Kube,
    operator: OperatorProcess,
    real_node: RealNode,
    node_s3: S3Endpoint,
    restricted_ns: str,
    tiny_model_dir: Path,
) -> None:
    bucket = f"real-{uuid.uuid4().hex[:8]}"
    node_s3.make_bucket(bucket)
    node_s3.upload_dir(tiny_model_dir, bucket, "models/tiny")
    node_s3.client().upload_file(str(DATASET), bucket, "data/train.jsonl")
    kube.core.create_namespaced_secret(
        restricted_ns,
        {"metadata": {"name": "s3"}, "stringData": {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}},
    )
    toleration = {"key": REAL_NODE_TAINT["key"], "operator": "Exists", "effect": REAL_NODE_TAINT["effect"]}
    kube.apply(
        restricted_ns,
        "tiny",
        spec={
            "image": image_name("trainer"),
            "model": {"source": f"s3://{bucket}/models/tiny/"},
            "dataset": {"train": f"s3://{bucket}/data/train.jsonl", "maxLength": 128},
            "training": {"maxSteps": STEPS, "batchSize": 4, "gradientAccumulationSteps": 1, "learningRate": 1e-2},
            "output": {"destination": f"s3://{bucket}/out/"},
            "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"},
            "storage": {"endpoint": node_s3.url, "credentialsSecretRef": {"name": "s3"}},
            "scheduling": {"nodeSelector": {REAL_NODE_LABEL: "true"}, "tolerations": [toleration]},
        },
    )
    status = kube.wait_phase(restricted_ns, "Succeeded", "tiny", reason="Succeeded", timeout=300)

    (pod,) = kube.pods(restricted_ns, "tiny")
    assert pod["spec"]["nodeName"] == real_node.name
    assert pod["status"]["podIP"].startswith(real_node.address.rsplit(".", 1)[0] + ".")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    assert terminated["message"].startswith("{")  # the trainer's JSON, written to the termination log
    assert status["result"]["steps"] == STEPS
    assert status["progress"]["step"] > 0  # polled from the real pod's /progress while it trained
    keys = node_s3.list_keys(bucket, "out/")
    assert "out/adapter/adapter_model.safetensors" in keys and "out/COMPLETE" in keys
