"""A FineTuneJob's life with the real Job controller, garbage collector, TTL controller and scheduler.

The trainer container is simulated by KWOK (its exit code and termination message set per test); everything
that decides what happens to the Job, its pods and the FineTuneJob is the real thing.
"""

from __future__ import annotations

import json
import time

import kubernetes
import pytest

from kubetune_trainer.contract import EXIT_FAILED, EXIT_INVALID_INPUT, EXIT_PREEMPTED
from tests.cluster.conftest import FATE, GROUP, PLURAL, VERSION, Kube, OperatorProcess, wait_for
from tests.cluster.controlplane import IMAGE_THAT_CANNOT_BE_PULLED
from tests.objects import invalid_input_message, succeeded_message

pytestmark = pytest.mark.usefixtures("operator")


def test_success_reports_result_and_artifacts(kube: Kube, ns: str) -> None:
    kube.apply(ns)
    job = kube.wait_job(ns)
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    assert kube.configmap(ns, "run-trainer") is not None
    kube.wait_phase(ns, "Running", reason="TrainerRunning")
    kube.run_pod_to(ns, 0, succeeded_message(steps=10))
    status = kube.wait_phase(ns, "Succeeded", reason="Succeeded")
    assert status["result"]["trainLoss"] == 1.25 and status["result"]["trainedTokens"] == 4096
    assert status["artifacts"]["adapter"] == "s3://artifacts/run/adapter/"
    assert status["completionTime"] and status["startTime"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert kube.job(ns)["status"]["succeeded"] == 1


def test_invalid_input_fails_at_once_without_retry(kube: Kube, ns: str) -> None:
    kube.apply(ns, spec={"runPolicy": {"backoffLimit": 3}})
    kube.run_pod_to(ns, EXIT_INVALID_INPUT, invalid_input_message())
    status = kube.wait_phase(ns, "Failed", reason="InvalidInput")
    assert "dataset.fields.response" in status["message"] and "train.jsonl:7" in status["message"], status
    job = kube.job(ns)
    assert any(c["type"] == "Failed" and c["reason"] == "PodFailurePolicy" for c in job["status"]["conditions"])
    assert len(kube.pods(ns)) == 1, "exit 2 must not be retried"


def test_preempted_run_is_retried_without_using_the_backoff_limit(kube: Kube, ns: str) -> None:
    # backoffLimit 0: a single counted failure would end the run, so only Ignore lets it go on.
    kube.apply(ns, spec={"runPolicy": {"backoffLimit": 0}})
    first = kube.run_pod_to(ns, EXIT_PREEMPTED)
    second = kube.run_pod_to(ns, 0, succeeded_message(), exclude={first})
    assert second != first
    status = kube.wait_phase(ns, "Succeeded")
    assert status["attempts"] == 2
    assert kube.job(ns)["status"].get("failed", 0) == 0


def test_evicted_pod_is_retried_without_using_the_backoff_limit(kube: Kube, ns: str) -> None:
    kube.apply(ns, spec={"runPolicy": {"backoffLimit": 0}})
    pod = kube.wait_running_pod(ns)["metadata"]["name"]
    kube.on_sigterm(ns, pod, 143)  # killed before it could checkpoint: only DisruptionTarget says why
    kube.core.create_namespaced_pod_eviction(pod, ns, {"metadata": {"name": pod, "namespace": ns}})
    kube.run_pod_to(ns, 0, succeeded_message(), exclude={pod})
    kube.wait_phase(ns, "Succeeded")
    assert kube.job(ns)["status"].get("failed", 0) == 0


def test_crashes_use_up_the_backoff_limit(kube: Kube, ns: str) -> None:
    kube.apply(ns, spec={"runPolicy": {"backoffLimit": 1}})
    first = kube.run_pod_to(ns, EXIT_FAILED)
    kube.run_pod_to(ns, EXIT_FAILED, exclude={first})
    status = kube.wait_phase(ns, "Failed", reason="BackoffLimitExceeded", timeout=90)
    assert status["attempts"] == 2
    assert len(kube.pods(ns)) == 2


def test_active_deadline_fails_the_run(kube: Kube, ns: str) -> None:
    kube.apply(ns, spec={"runPolicy": {"activeDeadlineSeconds": 3}})
    kube.wait_running_pod(ns)
    status = kube.wait_phase(ns, "Failed", reason="DeadlineExceeded", timeout=60)
    assert "deadline" in status["message"].lower()


def test_more_gpus_than_any_node_has_stays_pending_with_the_schedulers_reason(kube: Kube, ns: str) -> None:
    kube.apply(ns, spec={"resources": {"gpus": 16}})
    status = kube.wait_phase(ns, "Pending", reason="Unschedulable")
    assert "nvidia.com/gpu" in status["message"], status


def test_suspend_and_resume(kube: Kube, ns: str) -> None:
    kube.apply(ns)
    kube.wait_running_pod(ns)
    kube.patch_spec(ns, {"runPolicy": {"suspend": True}})
    kube.wait_phase(ns, "Suspended", reason="Suspended")
    assert kube.job(ns)["spec"]["suspend"] is True
    wait_for(lambda: not kube.running_pods(ns), 30, "the Job controller to stop the pod")
    kube.patch_spec(ns, {"runPolicy": {"suspend": False}})
    kube.run_pod_to(ns, 0, succeeded_message())
    kube.wait_phase(ns, "Succeeded")


def test_deleting_a_finetunejob_removes_its_children(kube: Kube, ns: str) -> None:
    kube.apply(ns)
    kube.wait_running_pod(ns)
    kube.delete_ftj(ns)
    wait_for(lambda: kube.ftj(ns) is None, 30, "the FineTuneJob to go (deletion must not wait for the operator)")
    wait_for(
        lambda: kube.job(ns) is None and kube.configmap(ns, "run-trainer") is None and not kube.pods(ns),
        60,
        lambda: f"the garbage collector; pods {[p['metadata']['name'] for p in kube.pods(ns)]}",
    )


def test_ttl_after_finished_deletes_the_finetunejob_and_its_job(kube: Kube, ns: str) -> None:
    created = kube.apply(ns, spec={"runPolicy": {"ttlSecondsAfterFinished": 2}})
    kube.run_pod_to(ns, 0, succeeded_message())
    kube.watch_phase(ns, "Succeeded", since=created)  # it may hold for a moment only before the TTL deletes it
    wait_for(lambda: kube.ftj(ns) is None, 30, "the TTL to delete the FineTuneJob")
    wait_for(lambda: kube.job(ns) is None, 60, "the garbage collector to delete the Job")


def test_a_job_deleted_by_someone_else_is_recreated_only_while_unfinished(kube: Kube, ns: str) -> None:
    kube.apply(ns)
    first_uid = kube.wait_job(ns)["metadata"]["uid"]
    kube.batch.delete_namespaced_job("run", ns, propagation_policy="Background")
    recreated = wait_for(lambda: (j := kube.job(ns)) and j["metadata"]["uid"] != first_uid and j, 30, "a new Job")
    kube.run_pod_to(ns, 0, succeeded_message())
    kube.wait_phase(ns, "Succeeded")
    kube.batch.delete_namespaced_job("run", ns, propagation_policy="Background")
    wait_for(lambda: kube.job(ns) is None, 30, "the Job to go")
    deadline = time.monotonic() + 3  # long enough for a recreation to show: the operator reacts in < 1 s
    while time.monotonic() < deadline:
        assert kube.job(ns) is None, "a finished run's Job was recreated"
        time.sleep(0.2)
    assert kube.status(ns)["phase"] == "Succeeded"
    assert recreated["metadata"]["uid"] != first_uid


def test_termination_message_travels_through_the_real_pod_status(kube: Kube, ns: str) -> None:
    kube.apply(ns)
    pod = kube.run_pod_to(ns, 0, succeeded_message(steps=7))
    assert kube.wait_phase(ns, "Succeeded")["result"]["steps"] == 7
    recorded = kube.plain(kube.core.read_namespaced_pod(pod, ns))["status"]["containerStatuses"][0]
    assert json.loads(recorded["state"]["terminated"]["message"])["result"]["steps"] == 7


def test_operator_killed_mid_burst_leaves_one_job_per_run(kube: Kube, ns: str, operator: OperatorProcess) -> None:
    names = [f"burst-{i:02d}" for i in range(50)]
    for index, name in enumerate(names):
        kube.apply(ns, name, spec={"resources": {"gpus": 0}})  # CPU runs: the GPUs of the nodes do not bound it
        if index == 20:
            operator.kill()
    operator.start()
    for name in names:
        kube.wait_phase(ns, "Running", name=name, timeout=120)
    jobs = kube.batch.list_namespaced_job(ns).items
    assert sorted(j.metadata.name for j in jobs) == sorted(names)
    assert all(len(j.metadata.owner_references) == 1 for j in jobs)
    configmaps = [c.metadata.name for c in kube.core.list_namespaced_config_map(ns).items]
    assert sorted(c for c in configmaps if c != "kube-root-ca.crt") == sorted(f"{n}-trainer" for n in names)


def test_a_namespace_deleted_under_running_syncs_ends_them_quietly(kube: Kube, operator: OperatorProcess) -> None:
    namespace = "t-deleted-namespace"
    kube.core.create_namespace({"metadata": {"name": namespace}})
    wait_for(lambda: kube.core.list_namespaced_service_account(namespace).items, 30, "the default ServiceAccount")
    log_before = len(operator.log_text())
    for index in range(10):
        kube.apply(namespace, f"run-{index}")
    kube.core.delete_namespace(namespace)
    # Not the namespace itself: its deletion waits out the pods' grace period (300 s) as the namespace controller
    # estimates it. The FineTuneJobs go first, once the operator has let them (its finalizer).
    wait_for(
        lambda: not kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"],
        60,
        lambda: f"the FineTuneJobs to be deleted with their namespace: {_blocking_conditions(kube, namespace)}",
    )
    time.sleep(1)  # a failed sync would be retried and logged within a second
    written = operator.log_text()[log_before:]
    assert "Traceback" not in written and "sync of" not in written, written[-3000:]


def _blocking_conditions(kube: Kube, namespace: str) -> list[str]:
    conditions = kube.plain(kube.core.read_namespace(namespace)).get("status", {}).get("conditions") or []
    return [f"{c['type']}: {c.get('message')}" for c in conditions if c.get("status") == "True"]


def test_oom_killed_trainer_is_reported_as_oom(kube: Kube, ns: str) -> None:
    kube.apply(ns, spec={"runPolicy": {"backoffLimit": 0}})
    pod = kube.wait_running_pod(ns)["metadata"]["name"]
    kube.core.patch_namespaced_pod(pod, ns, {"metadata": {"annotations": {f"{FATE}reason": "OOMKilled"}}})
    kube.set_fate(ns, pod, 137)
    status = kube.wait_phase(ns, "Failed", reason="OOMKilled")
    assert "memory" in status["message"].lower(), status


def test_an_image_that_cannot_be_pulled_stays_pending_with_the_kubelets_reason(kube: Kube, ns: str) -> None:
    kube.apply(ns, spec={"image": IMAGE_THAT_CANNOT_BE_PULLED})
    status = kube.wait_phase(ns, "Pending", reason="ImagePullBackOff")
    assert IMAGE_THAT_CANNOT_BE_PULLED in status["message"]
    time.sleep(2)  # Pending, not Failed: the cause is usually fixed in place
    assert kube.status(ns)["phase"] == "Pending"


def test_a_job_of_the_same_name_that_is_not_ours_is_never_overwritten(kube: Kube, ns: str) -> None:
    foreign = {"metadata": {"name": "run"}, "spec": {"template": {"spec": {"restartPolicy": "Never",
               "containers": [{"name": "other", "image": "registry.example/other:1"}]}}}}  # fmt: skip
    uid = kube.plain(kube.batch.create_namespaced_job(ns, foreign))["metadata"]["uid"]
    kube.apply(ns)
    status = kube.wait_phase(ns, "Failed", reason="NameConflict")
    assert "run" in status["message"]
    assert kube.job(ns)["metadata"]["uid"] == uid and not kube.job(ns)["metadata"].get("ownerReferences")


def test_scheduling_changes_reach_a_suspended_job_that_has_not_started(kube: Kube, ns: str) -> None:
    kube.apply(ns, spec={"runPolicy": {"suspend": True}})
    kube.wait_phase(ns, "Suspended")
    kube.patch_spec(ns, {"scheduling": {"nodeSelector": {"kubernetes.io/hostname": "gpu-node-2"}}})
    wait_for(lambda: kube.job(ns)["spec"]["template"]["spec"].get("nodeSelector", {}).get("kubernetes.io/hostname")
             == "gpu-node-2", 30, "the Job's template to take the new nodeSelector")  # fmt: skip
    kube.patch_spec(ns, {"runPolicy": {"suspend": False}})
    assert kube.wait_running_pod(ns)["spec"]["nodeName"] == "gpu-node-2"


def test_a_scheduling_edit_waits_while_the_run_trains_and_lands_once_it_is_suspended(kube: Kube, ns: str) -> None:
    kube.apply(ns)
    first = kube.wait_running_pod(ns)
    kube.wait_phase(ns, "Running", reason="TrainerRunning")
    in_effect = kube.status(ns)["observedGeneration"]
    elsewhere = "gpu-node-2" if first["spec"]["nodeName"] != "gpu-node-2" else "gpu-node-1"
    kube.patch_spec(ns, {"scheduling": {"nodeSelector": {"kubernetes.io/hostname": elsewhere}}})
    wait_for(lambda: "spec.scheduling edit waits" in kube.status(ns)["message"], 30, "the message to say it waits")
    assert kube.status(ns)["observedGeneration"] == in_effect, "an edit that has not taken effect is not observed"
    assert kube.job(ns)["spec"]["template"]["spec"].get("nodeSelector", {}).get("kubernetes.io/hostname") != elsewhere
    assert any(e["reason"] == "SchedulingWaits" for e in kube.events(ns))

    suspended = kube.patch_spec(ns, {"runPolicy": {"suspend": True}})["metadata"]["generation"]
    wait_for(lambda: kube.job(ns)["spec"]["template"]["spec"].get("nodeSelector") == {"kubernetes.io/hostname":
             elsewhere}, 60, lambda: f"the suspended Job to take the edit; Job: {kube.job(ns)}")  # fmt: skip
    wait_for(lambda: kube.status(ns)["observedGeneration"] == suspended, 30, "observedGeneration to catch up")
    assert "waits" not in kube.status(ns)["message"]
    kube.patch_spec(ns, {"runPolicy": {"suspend": False}})
    assert kube.wait_running_pod(ns, exclude={first["metadata"]["name"]})["spec"]["nodeName"] == elsewhere


def test_priority_class_and_queue_cannot_change(kube: Kube, ns: str) -> None:
    kube.apply(ns)
    for field, value in (("priorityClassName", "training-high"), ("queueName", "gpu-queue")):
        with pytest.raises(kubernetes.client.ApiException) as refused:
            kube.patch_spec(ns, {"scheduling": {field: value}})
        assert refused.value.status == 422
        assert f"spec.scheduling.{field} is immutable: create a new FineTuneJob instead" in str(refused.value.body)


def test_edits_to_the_retry_limit_and_the_deadline_reach_the_running_job(kube: Kube, ns: str) -> None:
    kube.apply(ns)
    kube.wait_running_pod(ns)
    edited = kube.patch_spec(ns, {"runPolicy": {"backoffLimit": 5, "activeDeadlineSeconds": 7200}})
    wait_for(lambda: (kube.job(ns) or {}).get("spec", {}).get("activeDeadlineSeconds") == 7200, 30,
             lambda: f"the Job to follow the edit; Job spec: {(kube.job(ns) or {}).get('spec')}")  # fmt: skip
    assert kube.job(ns)["spec"]["backoffLimit"] == 5
    generation = edited["metadata"]["generation"]
    wait_for(lambda: kube.status(ns).get("observedGeneration") == generation, 30, "observedGeneration to follow")
    kube.patch_spec(ns, {"runPolicy": {"activeDeadlineSeconds": None}})  # the limit lifted again
    wait_for(lambda: "activeDeadlineSeconds" not in (kube.job(ns) or {}).get("spec", {"activeDeadlineSeconds": 0}),
             30, "the Job's deadline to go")  # fmt: skip
    assert kube.status(ns)["phase"] == "Running"
