"""Least privilege, checked from both sides: every grant in the chart's RBAC is used by the operator over one
FineTuneJob's whole life (the `operator` fixture checks that no call goes beyond the grants)."""

from __future__ import annotations

from tests.api.fixtures import Cluster, Operator, operator_calls, wait_for
from tests.api.rbac import GRANTED, NEEDED_BY_ADMISSION, USED_ONLY_WITH_KUEUE, USED_ONLY_WITH_SWEEPS
from tests.kubeapi import cluster as kubelet
from tests.objects import LEGACY_FINALIZER, finetunejob_body


def test_every_grant_is_used_over_a_lifetime(operator: Operator, cluster: Cluster) -> None:
    # Two nodes: the run also has its headless Service, created and (after the restart) adopted. It carries the
    # finalizer an earlier version added: Kopf removes it (patch finetunejobs), or the TTL could not delete it.
    spec = {"runPolicy": {"ttlSecondsAfterFinished": 1}, "resources": {"gpus": 1, "nodes": 2}}
    cluster.create_raw(finetunejob_body(spec=spec, finalizers=[LEGACY_FINALIZER]))
    job = cluster.wait_job()
    pod = kubelet.create_pod_for_job(job)
    cluster.wait_phase("Pending")
    operator.stop()  # a restart: the children exist, so they are read and adopted
    kubelet.set_pod_running(pod)
    operator.start()
    cluster.wait_phase("Running")
    cluster.patch_spec({"runPolicy": {"suspend": True}})  # the Job is patched
    wait_for(lambda: cluster.job()["spec"]["suspend"] is True, what="Job suspended")
    cluster.patch_spec({"runPolicy": {"suspend": False}})
    wait_for(lambda: cluster.job()["spec"]["suspend"] is False, what="Job resumed")
    cluster.batch.delete_namespaced_job("support-bot", "default")  # someone deletes the Job mid-run
    job = wait_for(
        lambda: (j := cluster.job()) and j["metadata"]["uid"] != job["metadata"]["uid"] and j, what="new Job"
    )  # recreated beside the ConfigMap that stayed, which is read and adopted
    pod = kubelet.create_pod_for_job(job)
    kubelet.terminate_pod(pod, 0, "")
    kubelet.set_job_condition(job, "Complete", "CompletionsReached", "")
    # The TTL (1 s) deletes the run once the operator has seen it finish: its Succeeded status may live for less
    # than one poll, so the deletion, which only a finished run gets, is what the test waits for.
    wait_for(lambda: cluster.ftj() is None, timeout=25, what="FineTuneJob finished and deleted after its TTL")
    # The emulated API has no Kueue; tests/cluster/test_rbac.py checks those grants on the real control plane.
    unused = (
        GRANTED - NEEDED_BY_ADMISSION - USED_ONLY_WITH_KUEUE - USED_ONLY_WITH_SWEEPS - operator_calls(cluster.server)
    )
    assert not unused, f"granted but never used: {sorted(unused, key=str)}"
