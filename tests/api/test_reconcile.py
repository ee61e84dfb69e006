"""Create -> ConfigMap + Job, and the phases of a run, end to end through the operator."""

from __future__ import annotations

import json
import time

import pytest

from kubetune_trainer.contract import Artifacts, Result, TerminationMessage
from tests.api.fixtures import Cluster, Operator, wait_for
from tests.kubeapi import cluster as kubelet
from tests.objects import INVALID_MESSAGE, finetunejob_body


def test_create_makes_configmap_and_job(operator: Operator, cluster: Cluster) -> None:
    ftj = cluster.apply(spec={"scheduling": {"nodeSelector": {"gpu": "h100"}}})
    job = cluster.wait_job()
    configmap = cluster.configmap()
    assert configmap is not None
    for child in (job, configmap):
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner["uid"] == ftj["metadata"]["uid"] and owner["controller"] is True
        assert child["metadata"]["labels"]["kubetune.dev/finetunejob"] == "support-bot"
    config = json.loads(configmap["data"]["config.json"])
    assert config["model"]["source"] == "s3://models/tiny/"
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/kubetune/trainer:test"
    assert pod["nodeSelector"] == {"gpu": "h100"}
    status = cluster.wait_phase("Pending", reason="WaitingForPod")
    assert status["jobName"] == "support-bot"
    assert status["observedGeneration"] == ftj["metadata"]["generation"]
    assert {c["type"] for c in status["conditions"]} >= {"Ready", "Running", "Succeeded", "Failed", "Suspended"}


def test_phases_pending_running_succeeded(operator: Operator, cluster: Cluster) -> None:
    cluster.apply()
    job = cluster.wait_job()
    pod = kubelet.create_pod_for_job(job)
    kubelet.mark_unschedulable(pod, "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    status = cluster.wait_phase("Pending", reason="Unschedulable")
    assert "Insufficient nvidia.com/gpu" in status["message"]
    kubelet.set_pod_running(pod)
    kubelet.update_job_status(job, active=1)
    status = cluster.wait_phase("Running")
    assert status["startTime"] and status["attempts"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    message = TerminationMessage(
        outcome="succeeded",
        exit_code=0,
        result=Result(train_loss=0.9, eval_loss=1.1, perplexity=3.0, steps=10),
        artifacts=Artifacts(adapter="s3://artifacts/support-bot/adapter/"),
    ).encode()
    kubelet.terminate_pod(pod, 0, message)
    kubelet.set_job_condition(job, "Complete", "CompletionsReached", "Reached expected number of succeeded pods")
    status = cluster.wait_phase("Succeeded")
    assert status["result"] == {"trainLoss": 0.9, "evalLoss": 1.1, "perplexity": 3.0, "steps": 10}
    assert status["artifacts"] == {"adapter": "s3://artifacts/support-bot/adapter/"}
    assert status["completionTime"]
    reasons = wait_for(
        lambda: (lambda r: r if {"Unschedulable", "TrainerRunning", "Succeeded"} <= r else None)(
            {e["reason"] for e in cluster.events()}
        ),
        what="phase events",
    )
    assert "Unschedulable" in reasons
    # Kopf's finalizer is held only while a daemon runs (progress polling, TTL): none once finished.
    wait_for(lambda: not cluster.ftj()["metadata"].get("finalizers"), what="no finalizer after the run")


def test_kueue_queued_until_admitted(operator: Operator, cluster: Cluster) -> None:
    cluster.apply(spec={"scheduling": {"queueName": "gpu-queue"}})
    job = cluster.wait_job()
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    status = cluster.wait_phase("Queued")
    assert "gpu-queue" in status["message"]
    cluster.batch.patch_namespaced_job("support-bot", "default", {"spec": {"suspend": False}})  # Kueue admits
    pod = kubelet.create_pod_for_job(job)
    kubelet.set_pod_running(pod)
    cluster.wait_phase("Running")
    assert cluster.job()["spec"]["suspend"] is False  # the operator leaves Kueue's decision alone


FAILURES = [
    ("invalid input", 2, INVALID_MESSAGE, None, "PodFailurePolicy", "InvalidInput", "dataset.fields.prompt"),
    ("backoff limit", 1, "", None, "BackoffLimitExceeded", "BackoffLimitExceeded", "backoff limit"),
    ("deadline", 1, "", None, "DeadlineExceeded", "DeadlineExceeded", "deadline"),
    ("out of memory", 137, "", "OOMKilled", "BackoffLimitExceeded", "OOMKilled", "resources.memory"),
]


@pytest.mark.parametrize(
    ("exit_code", "message", "kill_reason", "job_reason", "reason", "fragment"),
    [case[1:] for case in FAILURES],
    ids=[case[0] for case in FAILURES],
)
def test_failure_reasons(
    operator: Operator, cluster: Cluster, exit_code, message, kill_reason, job_reason, reason, fragment
) -> None:
    cluster.apply()
    job = cluster.wait_job()
    pod = kubelet.create_pod_for_job(job)
    kubelet.set_pod_running(pod)
    cluster.wait_phase("Running")
    kubelet.terminate_pod(pod, exit_code, message, reason=kill_reason)
    kubelet.set_job_condition(job, "Failed", job_reason, f"Job failed: {job_reason} (backoff limit, deadline)")
    status = cluster.wait_phase("Failed", reason=reason)
    assert fragment in status["message"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Failed"] == "True"
    warnings = wait_for(
        lambda: [e for e in cluster.events() if e["type"] == "Warning" and e["reason"] == reason], what="event"
    )
    assert fragment in warnings[0]["message"]


def test_suspend_and_resume(operator: Operator, cluster: Cluster) -> None:
    cluster.apply()
    job = cluster.wait_job()
    pod = kubelet.create_pod_for_job(job)
    kubelet.set_pod_running(pod)
    cluster.wait_phase("Running")
    cluster.patch_spec({"runPolicy": {"suspend": True}})
    wait_for(lambda: cluster.job()["spec"]["suspend"] is True, what="Job suspended")
    cluster.wait_phase("Suspended", reason="Suspending")
    kubelet.terminate_pod(pod, 3, "")  # the trainer checkpoints and exits on SIGTERM
    kubelet.set_job_condition(job, "Suspended", "JobSuspended", "Job suspended")
    status = cluster.wait_phase("Suspended", reason="Suspended")
    assert {c["type"]: c["status"] for c in status["conditions"]}["Suspended"] == "True"
    cluster.patch_spec({"runPolicy": {"suspend": False}})
    wait_for(lambda: cluster.job()["spec"]["suspend"] is False, what="Job resumed")
    kubelet.set_pod_running(kubelet.create_pod_for_job(job))
    cluster.wait_phase("Running")


def test_created_suspended_and_rescheduled_while_suspended(operator: Operator, cluster: Cluster) -> None:
    cluster.apply(spec={"runPolicy": {"suspend": True}})
    job = cluster.wait_job()
    assert job["spec"]["suspend"] is True
    cluster.wait_phase("Suspended")
    generation = cluster.patch_spec({"scheduling": {"nodeSelector": {"pool": "spot"}}})["metadata"]["generation"]
    wait_for(
        lambda: cluster.job()["spec"]["template"]["spec"].get("nodeSelector") == {"pool": "spot"},
        what="nodeSelector applied to the suspended Job",
    )
    wait_for(lambda: cluster.status().get("observedGeneration") == generation, what="observedGeneration")
    wait_for(lambda: any(e["reason"] == "Rescheduled" for e in cluster.events()), what="Rescheduled event")


def test_job_deleted_while_running_is_recreated(operator: Operator, cluster: Cluster) -> None:
    cluster.apply()
    job = cluster.wait_job()
    kubelet.set_pod_running(kubelet.create_pod_for_job(job))
    cluster.wait_phase("Running")
    cluster.batch.delete_namespaced_job("support-bot", "default")
    recreated = wait_for(
        lambda: (j := cluster.job()) and j["metadata"]["uid"] != job["metadata"]["uid"] and j, what="new Job"
    )
    assert recreated["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    wait_for(lambda: any(e["reason"] == "JobRecreated" for e in cluster.events()), what="JobRecreated event")


def test_finished_job_deleted_is_not_recreated(operator: Operator, cluster: Cluster) -> None:
    cluster.apply()
    job = cluster.wait_job()
    pod = kubelet.create_pod_for_job(job)
    kubelet.terminate_pod(pod, 0, "")
    kubelet.set_job_condition(job, "Complete", "CompletionsReached", "")
    cluster.wait_phase("Succeeded")
    cluster.batch.delete_namespaced_job("support-bot", "default")
    time.sleep(1.5)
    assert cluster.job() is None
    assert cluster.status()["phase"] == "Succeeded"


def test_deleting_the_finetunejob_deletes_its_children(operator: Operator, cluster: Cluster) -> None:
    cluster.apply()
    cluster.wait_job()
    cluster.delete_ftj()
    wait_for(lambda: cluster.ftj() is None, what="FineTuneJob gone (no finalizer left behind)")
    cluster.server.collect_garbage()
    assert cluster.job() is None and cluster.configmap() is None


def test_restart_mid_run_rebuilds_status_without_duplicates(operator: Operator, cluster: Cluster) -> None:
    cluster.apply()
    job = cluster.wait_job()
    pod = kubelet.create_pod_for_job(job)
    cluster.wait_phase("Pending")
    operator.stop()
    kubelet.set_pod_running(pod)  # happens while the operator is away
    operator.start()
    cluster.wait_phase("Running")
    assert [j["metadata"]["uid"] for j in cluster.jobs()] == [job["metadata"]["uid"]]
    creates = [
        r
        for r in cluster.server.emulator.api_requests
        if r.verb == "create" and r.resource in ("jobs", "configmaps") and r.user_agent.startswith("kubetune")
    ]
    assert len(creates) == 2


def test_invalid_object_fails_without_a_job(operator: Operator, cluster: Cluster) -> None:
    body = finetunejob_body("broken", spec={"training": {"learningRate": -1}, "dataset": {"format": "poetry"}})
    cluster.create_raw(body)  # the emulator does not enforce the schema: as if it slipped past
    status = cluster.wait_phase("Failed", name="broken", reason="InvalidSpec")
    assert "spec.training.learningRate" in status["message"]
    assert "spec.dataset.format" in status["message"]
    assert cluster.job("broken") is None
    wait_for(lambda: any(e["type"] == "Warning" for e in cluster.events("broken")), what="Warning event")
    time.sleep(1)
    gets = [r for r in cluster.server.emulator.api_requests if r.resource == "jobs" and r.name == "broken"]
    assert len(gets) <= 2  # refused once, not retried in a loop


def test_name_taken_by_a_foreign_job_is_a_conflict(operator: Operator, cluster: Cluster) -> None:
    cluster.batch.create_namespaced_job(
        "default",
        {
            "metadata": {"name": "support-bot"},
            "spec": {
                "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "x", "image": "busybox"}]}}
            },
        },
    )
    cluster.apply()
    status = cluster.wait_phase("Failed", reason="NameConflict")
    assert "not owned" in status["message"]
    assert (
        "ownerReferences" not in (cluster.job()["metadata"] or {}) or not cluster.job()["metadata"]["ownerReferences"]
    )


def test_multi_node_gets_an_indexed_job_and_its_headless_service(operator: Operator, cluster: Cluster) -> None:
    cluster.apply(spec={"resources": {"gpus": 8, "nodes": 2}})
    job = cluster.wait_job()
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 2
    service = cluster.service("support-bot-nodes")
    assert service is not None and service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["ownerReferences"][0]["uid"] == cluster.ftj()["metadata"]["uid"]
    assert job["spec"]["template"]["spec"]["subdomain"] == "support-bot-nodes"


def test_recreated_finetunejob_waits_for_its_predecessors_children(operator: Operator, cluster: Cluster) -> None:
    first = cluster.apply()
    old_job = cluster.wait_job()
    cluster.delete_ftj()
    wait_for(lambda: cluster.ftj() is None, what="first FineTuneJob gone")
    second = cluster.apply()  # same name, before the garbage collector removed the old children
    time.sleep(1)
    assert cluster.job()["metadata"]["uid"] == old_job["metadata"]["uid"]  # not adopted, not overwritten
    assert cluster.status().get("phase") != "Failed"  # waiting, not a NameConflict
    cluster.server.collect_garbage()
    new_job = wait_for(
        lambda: (j := cluster.job()) and j["metadata"]["uid"] != old_job["metadata"]["uid"] and j, what="new Job"
    )
    assert new_job["metadata"]["ownerReferences"][0]["uid"] == second["metadata"]["uid"] != first["metadata"]["uid"]
    cluster.wait_phase("Pending")


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("ImagePullBackOff", 'Back-off pulling image "registry.example/kubetune/trainer:test"'),
        ("CreateContainerConfigError", 'secret "s3-credentials" not found'),
    ],
)
def test_pod_stuck_before_start_is_pending_with_the_kubelets_reason(
    operator: Operator, cluster: Cluster, reason: str, message: str
) -> None:
    cluster.apply()
    pod = kubelet.create_pod_for_job(cluster.wait_job())
    kubelet.set_pod_waiting(pod, reason, message)
    status = cluster.wait_phase("Pending", reason=reason)
    assert status["message"] == message
    wait_for(
        lambda: any(e["type"] == "Warning" and e["reason"] == reason for e in cluster.events()), what="Warning event"
    )
