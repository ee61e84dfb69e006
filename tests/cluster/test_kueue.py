"""Kueue's real controller admitting kubetune's Jobs. Each test has a ClusterQueue of its own (8 GPUs, for its
namespace only), so quota still held by an earlier test's runs never decides this one's."""

from __future__ import annotations

import time

import pytest

from tests.cluster.conftest import Kube, wait_for
from tests.objects import succeeded_message

pytestmark = pytest.mark.usefixtures("operator", "eight_gpu_queue")

EIGHT_GPUS = {"resources": {"gpus": 8}, "scheduling": {"queueName": "eight"}}  # the eight_gpu_queue fixture


def workload(kube: Kube, ns: str, job_name: str) -> dict | None:
    listed = kube.custom.list_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", ns, "workloads")
    owned = [w for w in listed["items"] if any(o["name"] == job_name for o in w["metadata"].get("ownerReferences", []))]
    return owned[0] if owned else None


def test_runs_beyond_the_gpu_quota_wait_queued_and_are_admitted_as_others_finish(kube: Kube, ns: str) -> None:
    kube.apply(ns, "first", spec=EIGHT_GPUS)
    kube.wait_phase(ns, "Running", name="first")
    kube.apply(ns, "second", spec=EIGHT_GPUS)
    kube.wait_phase(ns, "Queued", name="second", reason="WaitingForAdmission")
    pending = wait_for(lambda: workload(kube, ns, "second"), 30, "Kueue's Workload for the second run")
    assert not [c for c in pending["status"].get("conditions", []) if c["type"] == "Admitted" and c["status"] == "True"]
    # Kueue's own words, from its Workload: "couldn't assign flavors ...: insufficient quota for nvidia.com/gpu ..."
    wait_for(lambda: "quota for nvidia.com/gpu" in kube.status(ns, "second")["message"], 30,
             lambda: f"Kueue's reason in the status; status: {kube.status(ns, 'second')}")  # fmt: skip
    time.sleep(2)  # the quota stays taken: the second run must not start meanwhile
    assert kube.status(ns, "second")["phase"] == "Queued"
    assert kube.job(ns, "second")["spec"]["suspend"] is True
    kube.run_pod_to(ns, 0, succeeded_message(), name="first")
    kube.wait_phase(ns, "Succeeded", name="first")
    kube.wait_phase(ns, "Running", name="second", timeout=60)


def test_a_users_suspend_of_an_admitted_run_is_not_undone_by_kueue(kube: Kube, ns: str) -> None:
    kube.apply(ns, spec=EIGHT_GPUS)
    kube.wait_phase(ns, "Running")
    kube.patch_spec(ns, {"runPolicy": {"suspend": True}})
    kube.wait_phase(ns, "Suspended")
    wait_for(lambda: not kube.running_pods(ns), 30, "the pod to stop")
    deadline = time.monotonic() + 5  # Kueue reconciles within a second: long enough to see it undo the suspend
    while time.monotonic() < deadline:
        assert kube.job(ns)["spec"]["suspend"] is True, "Kueue unsuspended a run the user suspended"
        assert kube.status(ns)["phase"] == "Suspended"
        time.sleep(0.2)
    kube.patch_spec(ns, {"runPolicy": {"suspend": False}})
    kube.run_pod_to(ns, 0, succeeded_message())
    kube.wait_phase(ns, "Succeeded")


def test_a_queued_runs_job_deleted_mid_run_is_recreated_and_admitted_again(kube: Kube, ns: str) -> None:
    kube.apply(ns, spec=EIGHT_GPUS)
    first = kube.wait_running_pod(ns)["metadata"]["name"]
    old = kube.job(ns)["metadata"]["uid"]
    kube.batch.delete_namespaced_job("run", ns, propagation_policy="Background")  # someone deletes it mid-run
    # Recreated once the old Job's Workload is gone (Kueue admits a Job of the same name only then), and admitted.
    recreated = wait_for(lambda: (j := kube.job(ns)) and j["metadata"]["uid"] != old and j, 60, "the Job recreated")
    kube.wait_running_pod(ns, exclude={first}, timeout=60)
    owners = {o["uid"] for o in (workload(kube, ns, "run") or {}).get("metadata", {}).get("ownerReferences", [])}
    assert owners == {recreated["metadata"]["uid"]}
    kube.wait_phase(ns, "Running")
