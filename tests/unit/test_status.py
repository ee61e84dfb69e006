"""compute_status over the situations a Job and its pods can be in, as the controllers write them."""

from __future__ import annotations

import copy
import json
from datetime import timedelta

import pytest

from kubetune_operator.status import (
    CONDITION_TYPES,
    compute_status,
    failed_status,
    parse_termination_message,
    phase_event,
    status_patch,
)
from kubetune_trainer.contract import CheckpointRef, TerminationMessage, TrackingRun
from tests.objects import (
    INVALID_MESSAGE,
    NOW,
    SUCCEEDED_MESSAGE,
    finetunejob,
    job,
    pod,
    running_pod,
    terminated_pod,
    trainer_state,
)

LATER = NOW + timedelta(minutes=5)
GPU_MESSAGE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


def unschedulable_pod() -> dict:
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": GPU_MESSAGE}
    return pod(conditions=[condition])


def waiting_pod(reason: str, message: str) -> dict:
    return pod(
        conditions=[{"type": "PodScheduled", "status": "True"}],
        containerStatuses=trainer_state(waiting={"reason": reason, "message": message}),
    )


# (situation, spec overrides, observed Job, pods, expected phase, expected reason, message fragment)
SITUATIONS = [
    ("no Job yet", {}, None, [], "Pending", "CreatingJob", "creating Job support-bot"),
    ("no pod yet", {}, job(), [], "Pending", "WaitingForPod", "no"),
    ("unschedulable", {}, job(active=1), [unschedulable_pod()], "Pending", "Unschedulable", GPU_MESSAGE),
    ("image pull", {}, job(active=1), [waiting_pod("ImagePullBackOff", 'Back-off pulling image "x"')],
     "Pending", "ImagePullBackOff", "Back-off pulling image"),
    ("missing secret", {}, job(active=1), [waiting_pod("CreateContainerConfigError", 'secret "s3" not found')],
     "Pending", "CreateContainerConfigError", 'secret "s3" not found'),
    ("container creating", {}, job(active=1), [pod(conditions=[{"type": "PodScheduled", "status": "True"}])],
     "Pending", "ContainerCreating", "starting"),
    ("queued in kueue", {"scheduling": {"queueName": "gpu"}}, job(suspend=True, queue="gpu"), [],
     "Queued", "WaitingForAdmission", "LocalQueue gpu"),
    ("running", {}, job(active=1), [running_pod()], "Running", "TrainerRunning", "support-bot-abcde"),
    ("retrying after a crash", {}, job(failed=1), [terminated_pod(1)], "Pending", "Retrying", "exit code 1"),
    ("running again after a crash", {}, job(failed=1, active=1), [terminated_pod(1), running_pod("support-bot-2")],
     "Running", "TrainerRunning", "support-bot-2"),
    ("suspending", {"runPolicy": {"suspend": True}}, job(suspend=True, active=1), [running_pod()],
     "Suspended", "Suspending", "checkpoint"),
    ("suspended", {"runPolicy": {"suspend": True}}, job(("Suspended", "JobSuspended", ""), suspend=True), [],
     "Suspended", "Suspended", "spec.runPolicy.suspend"),
    ("suspended before the Job exists", {"runPolicy": {"suspend": True}}, None, [], "Suspended", "Suspended", ""),
    ("succeeded", {}, job(("Complete", "CompletionsReached", ""), succeeded=1), [terminated_pod(0, SUCCEEDED_MESSAGE)],
     "Succeeded", "Succeeded", "finished"),
    ("invalid input", {}, job(("Failed", "PodFailurePolicy", "Container trainer ... exit code 2"), failed=1),
     [terminated_pod(2, INVALID_MESSAGE)], "Failed", "InvalidInput",
     "InvalidDataset: dataset.fields.prompt: column 'prompt' is missing"),
    ("invalid input, log tail", {}, job(("Failed", "PodFailurePolicy", "exit code 2"), failed=1),
     [terminated_pod(2, "Traceback...\nValueError: bad dataset")], "Failed", "InvalidInput", "bad dataset"),
    ("backoff limit", {}, job(("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
     failed=4), [terminated_pod(1, name=f"p{i}") for i in range(4)], "Failed", "BackoffLimitExceeded",
     "backoff limit"),
    ("deadline", {}, job(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")),
     [], "Failed", "DeadlineExceeded", "longer than specified deadline"),
    ("out of memory", {}, job(("Failed", "BackoffLimitExceeded", "backoff"), failed=4),
     [terminated_pod(137, reason="OOMKilled")], "Failed", "OOMKilled", "resources.memory"),
    ("pod failure policy, other rule", {}, job(("Failed", "PodFailurePolicy", "rule 0"), failed=1),
     [terminated_pod(1)], "Failed", "PodFailurePolicy", "rule 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "observed", "pods", "phase", "reason", "fragment"),
    [situation[1:] for situation in SITUATIONS],
    ids=[situation[0] for situation in SITUATIONS],
)
def test_phase_and_reason(spec, observed, pods, phase, reason, fragment) -> None:
    status = compute_status(finetunejob(spec=spec), observed, pods, {}, NOW)
    assert (status["phase"], status["reason"]) == (phase, reason)
    assert fragment in status["message"]
    conditions = {condition["type"]: condition for condition in status["conditions"]}
    assert list(conditions) == list(CONDITION_TYPES)
    assert conditions["Ready"]["status"] == ("True" if phase in ("Running", "Succeeded") else "False")
    for kind in ("Running", "Succeeded", "Failed", "Suspended"):
        assert conditions[kind]["status"] == ("True" if phase == kind else "False"), kind
    for condition in conditions.values():
        assert condition["reason"] == reason
        assert condition["observedGeneration"] == 1
    assert status["jobName"] == "support-bot"
    assert ("completionTime" in status) == (phase in ("Succeeded", "Failed"))


def test_inputs_are_never_mutated() -> None:
    for _, spec, observed, pods, *_ in SITUATIONS:
        ftj = finetunejob(spec=spec)
        before = copy.deepcopy((ftj.model_dump(), observed, pods))
        previous = compute_status(ftj, observed, pods, {}, NOW)
        previous_copy = copy.deepcopy(previous)
        compute_status(ftj, observed, pods, previous, LATER)
        assert (ftj.model_dump(), observed, pods) == before
        assert previous == previous_copy


def test_success_reports_result_artifacts_and_checkpoint() -> None:
    observed = job(("Complete", "CompletionsReached", ""), succeeded=1)
    observed["status"]["completionTime"] = "2026-01-02T03:00:00Z"
    status = compute_status(finetunejob(), observed, [terminated_pod(0, SUCCEEDED_MESSAGE)], {}, NOW)
    assert status["result"] == {
        "trainLoss": 1.25,
        "evalLoss": 1.5,
        "perplexity": 4.48,
        "trainSeconds": 30.0,
        "trainedTokens": 1000,
        "steps": 10,
    }
    assert status["artifacts"] == {
        "adapter": "s3://artifacts/support-bot/adapter/",
        "modelCard": "s3://artifacts/support-bot/README.md",
    }
    assert status["checkpoint"] == {"step": 10, "uri": "s3://artifacts/support-bot/checkpoints/step-10/"}
    assert status["completionTime"] == "2026-01-02T03:00:00Z"
    assert status["startTime"] == "2026-01-02T02:30:00Z"
    assert status["attempts"] == 1


@pytest.mark.parametrize("garbage", ["", "not json", "{", '{"outcome": "exploded"}', "[1, 2]", "{}" * 3000])
def test_garbage_termination_messages_are_ignored(garbage: str) -> None:
    assert parse_termination_message(garbage) is None
    observed = job(("Complete", "CompletionsReached", ""), succeeded=1)
    status = compute_status(finetunejob(), observed, [terminated_pod(0, garbage)], {}, NOW)
    assert status["phase"] == "Succeeded"
    assert "result" not in status and "artifacts" not in status


def test_preempted_attempt_reports_its_checkpoint_while_retrying() -> None:
    preempted = TerminationMessage(
        outcome="preempted", exit_code=3, checkpoint=CheckpointRef(step=200, uri="s3://a/checkpoints/step-200/")
    ).encode()
    status = compute_status(finetunejob(), job(active=1), [terminated_pod(3, preempted), running_pod("p2")], {}, NOW)
    assert status["phase"] == "Running"
    assert status["checkpoint"] == {"step": 200, "uri": "s3://a/checkpoints/step-200/"}
    assert status["attempts"] == 2


def test_last_transition_time_is_kept_while_a_condition_holds() -> None:
    ftj = finetunejob()
    first = compute_status(ftj, job(active=1), [unschedulable_pod()], {}, NOW)
    same = compute_status(ftj, job(active=1), [unschedulable_pod()], first, LATER)
    assert same == first  # nothing changed: nothing to patch
    assert status_patch(first, same) is None
    running = compute_status(ftj, job(active=1), [running_pod()], first, LATER)
    times = {c["type"]: c["lastTransitionTime"] for c in running["conditions"]}
    assert times["Running"] == times["Ready"] == "2026-01-02T03:09:05Z"  # False -> True: now
    assert times["Succeeded"] == times["Failed"] == times["Suspended"] == "2026-01-02T03:04:05Z"  # still False


def test_observed_generation_follows_the_spec() -> None:
    status = compute_status(finetunejob(generation=7), job(active=1), [running_pod()], {}, NOW)
    assert status["observedGeneration"] == 7
    assert {condition["observedGeneration"] for condition in status["conditions"]} == {7}


def test_finished_outcome_outlives_its_job() -> None:
    observed = job(("Complete", "CompletionsReached", ""), succeeded=1)
    done = compute_status(finetunejob(), observed, [terminated_pod(0, SUCCEEDED_MESSAGE)], {}, NOW)
    after = compute_status(finetunejob(), None, [], done, LATER)
    assert after == done


def test_progress_and_progress_condition_are_kept_while_running() -> None:
    progress = {"stage": "train", "step": 5, "totalSteps": 10, "percent": 50.0}
    probe = {"type": "ProgressAvailable", "status": "False", "reason": "PollFailed", "message": "timeout",
             "lastTransitionTime": "2026-01-02T03:00:00Z"}  # fmt: skip
    running = compute_status(finetunejob(), job(active=1), [running_pod()], {}, NOW)
    previous = {**running, "progress": progress, "conditions": [*running["conditions"], probe]}
    again = compute_status(finetunejob(), job(active=1), [running_pod()], previous, LATER)
    assert again["progress"] == progress
    assert again["conditions"][-1] == probe
    assert status_patch(previous, again) is None
    done = compute_status(finetunejob(), job(("Complete", "", ""), succeeded=1), [terminated_pod(0)], previous, LATER)
    assert done["progress"] == progress
    assert "ProgressAvailable" not in {c["type"] for c in done["conditions"]}


def test_a_storage_outage_the_trainer_rides_out_is_in_the_message_and_an_event() -> None:
    retry = "storage unreachable, retrying for 42 s of 180: cannot write s3://b/run/x: connection reset"
    running = compute_status(finetunejob(), job(active=1), [running_pod()], {}, NOW)
    previous = {**running, "progress": {"stage": "checkpointing", "step": 5, "storageRetry": retry}}
    retrying = compute_status(finetunejob(), job(active=1), [running_pod()], previous, LATER)
    assert (retrying["phase"], retrying["reason"]) == ("Running", "StorageRetrying")
    assert retrying["message"] == f"pod support-bot-abcde is training; {retry}"
    assert phase_event(running, retrying) == ("Warning", "StorageRetrying", f"Running: {retrying['message']}")
    recovered = {**retrying, "progress": {"stage": "train", "step": 6}}
    again = compute_status(finetunejob(), job(active=1), [running_pod()], recovered, LATER)
    assert (again["reason"], again["message"]) == ("TrainerRunning", "pod support-bot-abcde is training")
    assert phase_event(retrying, again)[:2] == ("Normal", "TrainerRunning")
    done = compute_status(finetunejob(), job(("Complete", "", ""), succeeded=1), [terminated_pod(0)], previous, LATER)
    assert done["reason"] == "Succeeded"  # only a running trainer is retrying


def test_pods_of_a_previous_job_are_ignored() -> None:
    old = running_pod("old")
    old["metadata"]["ownerReferences"][0]["uid"] = "deleted-job"
    status = compute_status(finetunejob(), job(), [old], {}, NOW)
    assert status["reason"] == "WaitingForPod"


def test_status_patch_removes_fields_that_are_gone() -> None:
    assert status_patch({"phase": "Failed", "completionTime": "x"}, {"phase": "Running"}) == {
        "phase": "Running",
        "completionTime": None,
    }
    assert status_patch({"progress": {"step": 1}}, {}) is None  # progress belongs to the poller


def test_failed_status_for_refused_specs() -> None:
    status = failed_status("bad", 3, "InvalidSpec", "spec.training.epochs: must be > 0", None, NOW)
    assert status["phase"] == "Failed"
    assert status["reason"] == "InvalidSpec"
    assert status["observedGeneration"] == 3
    assert {c["type"]: c["status"] for c in status["conditions"]}["Failed"] == "True"
    assert failed_status("bad", 3, "InvalidSpec", "spec.training.epochs: must be > 0", status, LATER) == status


def test_phase_events() -> None:
    pending = {"phase": "Pending", "reason": "Unschedulable", "message": GPU_MESSAGE}
    assert phase_event({}, pending) == ("Warning", "Unschedulable", f"Pending: {GPU_MESSAGE}")
    assert phase_event(pending, dict(pending)) is None
    running = {"phase": "Running", "reason": "TrainerRunning", "message": "pod p is training"}
    assert phase_event(pending, running) == ("Normal", "TrainerRunning", "Running: pod p is training")
    failed = {"phase": "Failed", "reason": "OOMKilled", "message": "out of memory"}
    assert phase_event(running, failed)[0] == "Warning"


def test_status_is_json() -> None:
    status = compute_status(finetunejob(), job(active=1), [running_pod()], {}, NOW)
    assert json.loads(json.dumps(status)) == status


def kueue_workload(message: str | None) -> dict:
    conditions = [] if message is None else [
        {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": message}
    ]  # fmt: skip
    return {"metadata": {"name": "job-support-bot-1a2b3", "namespace": "default"}, "status": {"conditions": conditions}}


def test_queued_status_gives_kueues_reason_when_its_workload_has_one() -> None:
    spec = {"scheduling": {"queueName": "gpu"}}
    words = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu, 8 more needed"
    status = compute_status(finetunejob(spec=spec), job(suspend=True, queue="gpu"), [], None, NOW,
                            kueue_workload(words))  # fmt: skip
    assert (status["phase"], status["reason"]) == ("Queued", "WaitingForAdmission")
    assert status["message"] == f"waiting for Kueue LocalQueue gpu to admit the Job: {words}"
    bare = compute_status(finetunejob(spec=spec), job(suspend=True, queue="gpu"), [], None, NOW, kueue_workload(None))
    assert bare["message"] == "waiting for Kueue LocalQueue gpu to admit the Job"


# -- multi-node runs (an Indexed Job, one pod per node) ------------------------------------------------------

MULTI_NODE = {"resources": {"gpus": 8, "nodes": 2}}


def on_node(index: int, pod_body: dict) -> dict:
    labelled = copy.deepcopy(pod_body)
    labelled["metadata"]["name"] = f"support-bot-{index}-abcde"
    labelled["metadata"]["labels"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    return labelled


def test_multi_node_status_counts_running_nodes() -> None:
    spec = finetunejob(spec=MULTI_NODE)
    half = compute_status(spec, job(active=2), [on_node(0, running_pod()), on_node(1, unschedulable_pod())], {}, NOW)
    assert (half["phase"], half["reason"], half["runningNodes"]) == ("Running", "WaitingForNodes", 1)
    assert "1 of 2 nodes running" in half["message"] and "Unschedulable" in half["message"]
    full = compute_status(spec, job(active=2), [on_node(0, running_pod()), on_node(1, running_pod())], {}, NOW)
    assert (full["phase"], full["reason"], full["runningNodes"]) == ("Running", "TrainerRunning", 2)
    assert full["message"] == "2 of 2 nodes training"
    one_node = compute_status(finetunejob(), job(active=1), [running_pod()], {}, NOW)
    assert "runningNodes" not in one_node


def test_multi_node_success_reports_rank_zeros_result() -> None:
    observed = job(("Complete", "CompletionsReached", ""), succeeded=2)
    node1 = TerminationMessage(outcome="succeeded", exit_code=0).encode()  # node 1 has no artifacts
    pods = [on_node(0, terminated_pod(0, SUCCEEDED_MESSAGE)), on_node(1, terminated_pod(0, node1))]
    pods[1]["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "2026-01-02T02:59:30Z"
    status = compute_status(finetunejob(spec=MULTI_NODE), observed, pods, {}, NOW)
    assert status["phase"] == "Succeeded"
    assert status["artifacts"]["adapter"] == "s3://artifacts/support-bot/adapter/"


def test_multi_node_invalid_input_on_any_node_is_the_cause_and_names_the_node() -> None:
    observed = job(("Failed", "PodFailurePolicy", "Container trainer for pod default/support-bot-1 failed"), failed=2)
    crashed = on_node(0, terminated_pod(1, ""))  # its peer's exit took it down, later
    crashed["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "2026-01-02T02:59:59Z"
    pods = [crashed, on_node(1, terminated_pod(2, INVALID_MESSAGE))]
    status = compute_status(finetunejob(spec=MULTI_NODE), observed, pods, {}, NOW)
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidInput")
    assert status["message"].startswith("node 1 (pod support-bot-1-abcde): InvalidDataset: dataset.fields.prompt")


def test_tracking_runs_reach_the_status_and_outlive_the_job() -> None:
    tracking = [
        TrackingRun(
            backend="mlflow", state="finished", run_id="abc", url="https://mlflow.example/#/experiments/1/runs/abc"
        ),
        TrackingRun(backend="wandb", state="failed", message="cannot start a run in wandb: CommError: 401"),
    ]
    message = TerminationMessage(outcome="succeeded", exit_code=0, tracking=tracking).encode()
    observed = job(("Complete", "CompletionsReached", ""), succeeded=1)
    status = compute_status(finetunejob(), observed, [terminated_pod(0, message)], {}, NOW)
    assert status["phase"] == "Succeeded"  # a tracker that failed never fails the run
    assert status["tracking"] == [run.wire() for run in tracking]
    assert compute_status(finetunejob(), None, [], status, LATER)["tracking"] == status["tracking"]
