"""A multi-node FineTuneJob on the real control plane: the Indexed Job and its headless Service as the real
apiserver accepts them, the real scheduler spreading the nodes over two GPU nodes (KWOK's), the real Job
controller deciding success and failure over every index, the garbage collector removing the Service, and
Kueue admitting the whole gang or none of it."""

from __future__ import annotations

import time

import kubernetes
import pytest

from kubetune_trainer.contract import EXIT_INVALID_INPUT, EXIT_OK, TerminationMessage
from tests.cluster.conftest import Kube, wait_for
from tests.objects import invalid_input_message, succeeded_message

pytestmark = pytest.mark.usefixtures("operator")

TWO_NODES = {"resources": {"gpus": 8, "nodes": 2}}
INDEX = "batch.kubernetes.io/job-completion-index"


def service(kube: Kube, ns: str, name: str = "run-nodes") -> dict | None:
    try:
        return kube.plain(kube.core.read_namespaced_service(name, ns))
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return None
        raise


def running_by_index(kube: Kube, ns: str, count: int = 2) -> dict[int, dict]:
    def all_running() -> dict[int, dict] | None:
        pods = {int(p["metadata"]["labels"][INDEX]): p for p in kube.running_pods(ns)}
        return pods if len(pods) == count else None

    return wait_for(all_running, 60, lambda: f"{count} Running pods; pods: {kube._pod_phases(ns, 'run')}")


def test_two_nodes_are_an_indexed_job_on_two_gpu_nodes_that_succeeds_when_every_index_does(kube: Kube, ns: str) -> None:
    kube.apply(ns, spec=TWO_NODES)
    job = kube.wait_job(ns)
    assert job["spec"]["completionMode"] == "Indexed"
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (2, 2)
    headless = wait_for(lambda: service(kube, ns), 30, "the headless Service")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    pods = running_by_index(kube, ns)
    assert {pods[i]["spec"]["hostname"] for i in pods} == {"run-0", "run-1"}  # the Job controller's names
    assert {pods[i]["spec"]["subdomain"] for i in pods} == {"run-nodes"}
    assert {pods[i]["spec"]["nodeName"] for i in pods} == {"gpu-node-1", "gpu-node-2"}  # 8 GPUs each
    status = kube.wait_phase(ns, "Running", reason="TrainerRunning")
    assert status["runningNodes"] == 2 and status["message"] == "2 of 2 nodes training"

    # Node 1 finishes first (it has no artifacts to write); the run is not done until node 0 is.
    kube.set_fate(
        ns, pods[1]["metadata"]["name"], EXIT_OK, TerminationMessage(outcome="succeeded", exit_code=0).encode()
    )
    wait_for(lambda: (kube.job(ns)["status"].get("succeeded") or 0) == 1, 30, "index 1 to succeed")
    time.sleep(1)
    assert kube.status(ns)["phase"] == "Running"
    kube.set_fate(ns, pods[0]["metadata"]["name"], EXIT_OK, succeeded_message(steps=10))
    status = kube.wait_phase(ns, "Succeeded")
    assert status["artifacts"]["adapter"] == "s3://artifacts/run/adapter/"  # rank 0's report, from pod 0
    assert kube.job(ns)["status"]["succeeded"] == 2

    kube.delete_ftj(ns)
    wait_for(lambda: service(kube, ns) is None, 60, "the garbage collector to delete the Service")
    wait_for(lambda: kube.job(ns) is None, 60, "the garbage collector to delete the Job")


def test_invalid_input_on_one_node_fails_the_whole_run_once(kube: Kube, ns: str) -> None:
    kube.apply(ns, spec={**TWO_NODES, "runPolicy": {"backoffLimit": 3}})
    pods = running_by_index(kube, ns)
    kube.set_fate(ns, pods[1]["metadata"]["name"], EXIT_INVALID_INPUT, invalid_input_message())
    status = kube.wait_phase(ns, "Failed", reason="InvalidInput")
    assert status["message"].startswith("node 1 (pod "), status
    assert "dataset.fields.response" in status["message"]
    job = kube.job(ns)
    assert any(c["type"] == "Failed" and c["reason"] == "PodFailurePolicy" for c in job["status"]["conditions"])
    time.sleep(2)
    original = {pod["metadata"]["name"] for pod in pods.values()}
    # Not retried: no pod beyond the two first ones (the Job controller deletes node 0's, and replaces neither).
    assert {pod["metadata"]["name"] for pod in kube.pods(ns)} <= original, "exit 2 must not be retried"
    warnings = [e for e in kube.events(ns) if e.get("type") == "Warning" and e.get("reason") == "InvalidInput"]
    assert warnings and "node 1" in warnings[-1]["message"]


def test_kueue_keeps_a_gang_larger_than_the_quota_queued_whole(kube: Kube, ns: str, eight_gpu_queue: str) -> None:
    kube.apply(ns, spec={**TWO_NODES, "scheduling": {"queueName": eight_gpu_queue}})  # 16 GPUs, 8 in quota
    kube.wait_phase(ns, "Queued", reason="WaitingForAdmission")
    wait_for(lambda: "quota for nvidia.com/gpu" in kube.status(ns)["message"], 30,
             lambda: f"Kueue's reason in the status; status: {kube.status(ns)}")  # fmt: skip
    time.sleep(2)
    assert kube.job(ns)["spec"]["suspend"] is True
    assert kube.pods(ns) == [], "no node of a gang that does not fit may start"
    assert kube.status(ns)["phase"] == "Queued"
