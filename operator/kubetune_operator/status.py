"""Pure status computation: what runs (the Job, its pods, the trainer's termination message) in, the
FineTuneJob status out.

Status is computed, not accumulated (STYLE.md habit 5): `compute_status` derives phase, conditions and
timestamps from the observed objects every time. The previous status is read only to keep what cannot be
observed again: a condition's lastTransitionTime while its status holds, the start time, the progress the
trainer reported, and a finished outcome whose Job is gone. Inputs are never mutated.

Choices:
- A pod stuck on its image (ImagePullBackOff, ErrImagePull, InvalidImageName) or on its configuration
  (CreateContainerConfigError: a missing Secret) leaves the run Pending with the kubelet's reason and
  message, not Failed: the Job itself has not failed, the cause is often fixed in place (a registry
  credential, a Secret created late), and status must not claim an outcome that may still change. A
  Warning event tells it; runPolicy.activeDeadlineSeconds bounds the wait for those who want a limit.
- Ready is True while the trainer runs and after it succeeded: "the run is doing what was asked".
- A failed Job with exit code 2 is InvalidInput (the trainer's own error, from its termination message);
  one whose last pod was OOMKilled is OOMKilled; otherwise the Job's reason (BackoffLimitExceeded,
  DeadlineExceeded, PodFailurePolicy) is kept.
- A multi-node run (an Indexed Job, one pod per node) is Running while any of its pods runs; the message
  and `runningNodes` say how many of the nodes do. The outcome of a finished run is read from pod 0 (global
  rank 0 writes the result and artifacts); a failure names the node whose pod failed, and an invalid input
  on any node makes the run InvalidInput.
- What the trainer's own ending says (exit code + termination message) is `trainer_ending`, the one reading
  of the contract: the operator uses it for a pod's end, `kubetune run` for the status it prints.
"""

from __future__ import annotations

import copy
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kubetune_operator.api import FineTuneJob
from kubetune_operator.builders import LABEL_COMPLETION_INDEX, LABEL_KUEUE_QUEUE, TRAINER_CONTAINER, job_name
from kubetune_trainer import contract
from kubetune_trainer.contract import TerminationMessage, TrainerError

FINISHED = ("Succeeded", "Failed")
CONDITION_TYPES = ("Ready", "Running", "Succeeded", "Failed", "Suspended")
PROGRESS_CONDITION = "ProgressAvailable"  # owned by the progress poller, kept here while Running
# A waiting container with one of these reasons explains a pod that does not start.
STUCK_REASONS = (
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
)
# (phase, reason) transitions that deserve a Warning event rather than a Normal one.
CREATE_REFUSED = "CreateRefused"  # the API server refused a child (a quota, an admission webhook); retried
STORAGE_RETRYING = "StorageRetrying"  # Running, the trainer retrying its writes through a storage outage
WARNING_REASONS = ("Unschedulable", *STUCK_REASONS, "Retrying", CREATE_REFUSED, STORAGE_RETRYING)
MESSAGE_MAX = 1024


@dataclass(frozen=True)
class Verdict:
    """The phase of a run and why, before it is dressed as conditions."""

    phase: str
    reason: str
    message: str
    terminal_pod: dict[str, Any] | None = None


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC, second precision, as Kubernetes writes times."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime:
    """A time as Kubernetes writes it (RFC 3339, `Z` or an offset); raises ValueError on anything else."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def parse_termination_message(text: str | None) -> TerminationMessage | None:
    """The trainer's final JSON, or None for anything else (a log tail, truncated or garbled text)."""
    if not text or not text.lstrip().startswith("{"):
        return None
    try:
        return TerminationMessage.model_validate_json(text)
    except (ValidationError, ValueError):
        return None


@dataclass(frozen=True)
class Ending(Verdict):
    """The verdict a trainer's exit code and termination message tell, with what it reported (wire names)."""

    result: dict[str, Any] | None = None
    artifacts: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None
    tracking: list[dict[str, Any]] | None = None

    def status(self) -> dict[str, Any]:
        """The status fields this ending sets."""
        fields = {"phase": self.phase, "reason": self.reason, "message": self.message}
        extra = {
            "result": self.result,
            "artifacts": self.artifacts,
            "checkpoint": self.checkpoint,
            "tracking": self.tracking,
        }
        return {**fields, **{key: copy.deepcopy(value) for key, value in extra.items() if value is not None}}


SUCCEEDED_MESSAGE = "the trainer finished"


def _error_text(error: TrainerError) -> str:
    where = f" ({error.file}{f':{error.line}' if error.line else ''})" if error.file else ""
    field = f"{error.field}: " if error.field else ""
    return _short(f"{error.reason}: {field}{error.message}{where}")


def trainer_ending(message: TerminationMessage | None, exit_code: int | None, log_tail: str = "") -> Ending:
    """The phase, reason and message of a trainer that exited with `exit_code`, and what it reported.

    The exit code decides (it is what the Job's podFailurePolicy acts on); the termination message adds the
    numbers and the error. `log_tail` is what Kubernetes keeps when the trainer wrote no message.
    """
    code = exit_code if exit_code is not None else (message.exit_code if message is not None else None)
    reported = {
        "result": message.result.wire() if message is not None and message.result is not None else None,
        "artifacts": message.artifacts.wire() if message is not None and message.artifacts is not None else None,
        "checkpoint": message.checkpoint.wire() if message is not None and message.checkpoint is not None else None,
        "tracking": [run.wire() for run in message.tracking] if message is not None and message.tracking else None,
    }
    error = message.error if message is not None else None
    tail = log_tail.strip().splitlines()
    detail = f": {tail[-1]}" if tail else ""
    if code == contract.EXIT_OK:
        return Ending("Succeeded", "Succeeded", SUCCEEDED_MESSAGE, **reported)
    if code == contract.EXIT_INVALID_INPUT:
        text = (
            _error_text(error)
            if error is not None
            else _short(f"the trainer rejected its input (exit code {contract.EXIT_INVALID_INPUT}){detail}")
        )
        return Ending("Failed", "InvalidInput", text, **reported)
    if code == contract.EXIT_PREEMPTED:
        checkpoint = message.checkpoint if message is not None else None
        where = f"a checkpoint at step {checkpoint.step}" if checkpoint is not None else "no new checkpoint"
        return Ending(
            "Suspended", "Suspended", f"the trainer stopped with {where}; resuming continues from it", **reported
        )
    if error is not None:
        return Ending("Failed", error.reason, _error_text(error), **reported)
    if message is None:
        text = f"the trainer {_exit_text(code)} and wrote no termination message{detail}"
        return Ending("Failed", "NoTerminationMessage", _short(text), **reported)
    return Ending("Failed", "Failed", f"the trainer {_exit_text(code)}", **reported)


def _exit_text(code: int | None) -> str:
    """`exited with 1`, or for 128 + N (a process killed by signal N) `was killed by SIGKILL (exit code 137)`."""
    if code is not None and code > 128:
        try:
            return f"was killed by {signal.Signals(code - 128).name} (exit code {code})"
        except ValueError:
            pass
    return f"exited with {code}"


def pod_ending(pod: dict[str, Any]) -> Ending | None:
    """`trainer_ending` of a pod whose trainer container terminated, else None."""
    terminated = trainer_terminated(pod)
    if terminated is None:
        return None
    text = terminated.get("message")
    message = parse_termination_message(text)
    return trainer_ending(message, terminated.get("exitCode"), "" if message is not None else (text or ""))


def trainer_terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer container's terminated state (current, else last), or None."""
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == TRAINER_CONTAINER:
            state = status.get("state") or {}
            last = status.get("lastState") or {}
            return state.get("terminated") or last.get("terminated")
    return None


def _trainer_waiting(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == TRAINER_CONTAINER:
            waiting = (status.get("state") or {}).get("waiting")
            if waiting:
                return dict(waiting)
    return None


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in obj.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind:
            return dict(condition)
    return None


def _true(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    condition = _condition(obj, kind)
    return condition if condition is not None and condition.get("status") == "True" else None


def _pod_phase(pod: dict[str, Any]) -> str:
    return str(pod.get("status", {}).get("phase") or "Pending")


def _pod_order(pod: dict[str, Any]) -> tuple[str, str]:
    terminated = trainer_terminated(pod) or {}
    return (str(terminated.get("finishedAt") or ""), str(pod.get("metadata", {}).get("creationTimestamp") or ""))


def _latest(pods: list[dict[str, Any]], phase: str) -> dict[str, Any] | None:
    matching = [pod for pod in pods if _pod_phase(pod) == phase]
    return max(matching, key=_pod_order) if matching else None


def node_index(pod: dict[str, Any]) -> int | None:
    """The node (completion index) of a multi-node run's pod; None for a one-node run's."""
    value = (pod.get("metadata", {}).get("labels") or {}).get(LABEL_COMPLETION_INDEX)
    return int(value) if value is not None and str(value).isdigit() else None


def _node_prefix(job: FineTuneJob, pod: dict[str, Any] | None) -> str:
    if pod is None or job.spec.resources.nodes <= 1 or node_index(pod) is None:
        return ""
    return f"node {node_index(pod)} (pod {pod['metadata']['name']}): "


def _running(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [pod for pod in pods if _pod_phase(pod) == "Running" and not pod["metadata"].get("deletionTimestamp")]


def running_nodes(pods: list[dict[str, Any]]) -> int:
    """How many nodes (distinct completion indexes) have a running trainer pod."""
    return len({node_index(pod) for pod in _running(pods)})


SCHEDULING_WAITS = (
    "the spec.scheduling edit waits: a started Job's pods cannot move, so it takes effect once the run is "
    "suspended (spec.runPolicy.suspend: true)"
)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_MAX else text[: MESSAGE_MAX - 3] + "..."


def _invalid_input(pod: dict[str, Any]) -> bool:
    ending = pod_ending(pod)
    return ending is not None and ending.reason == "InvalidInput"


def _failed(
    job: FineTuneJob, observed_job: dict[str, Any], pods: list[dict[str, Any]], failed: dict[str, Any]
) -> Verdict:
    invalid = [pod for pod in pods if _pod_phase(pod) == "Failed" and _invalid_input(pod)]
    # Any node's invalid input is the run's cause (its peers then fail as a consequence).
    pod = max(invalid, key=_pod_order) if invalid else _latest(pods, "Failed")
    terminated = trainer_terminated(pod) if pod is not None else None
    job_reason = str(failed.get("reason") or "Failed")
    job_message = str(failed.get("message") or "the Job failed")
    ending = pod_ending(pod) if pod is not None else None
    if ending is not None and ending.reason == "InvalidInput":
        return Verdict("Failed", ending.reason, _short(_node_prefix(job, pod) + ending.message), pod)
    if terminated is not None and terminated.get("reason") == "OOMKilled" and job_reason != "DeadlineExceeded":
        return Verdict(
            "Failed",
            "OOMKilled",
            f"{_node_prefix(job, pod)}the trainer ran out of memory; raise resources.memory, or lower "
            "training.batchTokens (with packing) or training.batchSize, "
            f"or dataset.maxLength ({job_reason}: {job_message})",
            pod,
        )
    return Verdict("Failed", job_reason, _short(_node_prefix(job, pod) + job_message), pod)


def _waiting_verdict(pods: list[dict[str, Any]]) -> Verdict:
    """Why no pod runs yet: the scheduler's or the kubelet's words, else the retry in progress."""
    active = [pod for pod in pods if _pod_phase(pod) == "Pending" and not pod["metadata"].get("deletionTimestamp")]
    for pod in active:
        waiting = _trainer_waiting(pod)
        if waiting and waiting.get("reason") in STUCK_REASONS:
            return Verdict("Pending", str(waiting["reason"]), _short(str(waiting.get("message") or waiting["reason"])))
    for pod in active:
        scheduled = _condition(pod, "PodScheduled")
        if scheduled is not None and scheduled.get("status") == "False":
            reason = str(scheduled.get("reason") or "Unschedulable")
            return Verdict("Pending", reason, _short(str(scheduled.get("message") or reason)))
    if active:
        return Verdict("Pending", "ContainerCreating", f"pod {active[0]['metadata']['name']} is starting")
    failed = _latest(pods, "Failed")
    if failed is not None:
        terminated = trainer_terminated(failed) or {}
        code = terminated.get("exitCode", "unknown")
        why = f"{terminated['reason']}, exit code {code}" if terminated.get("reason") else f"exit code {code}"
        return Verdict("Pending", "Retrying", f"pod {failed['metadata']['name']} failed ({why}); the Job retries")
    return Verdict("Pending", "WaitingForPod", "the Job has not created a pod yet")


def kueue_pending_message(workload: dict[str, Any] | None) -> str | None:
    """Why Kueue has not admitted a Workload yet, in Kueue's words (its QuotaReserved=False message)."""
    for condition in (workload or {}).get("status", {}).get("conditions") or []:
        if condition.get("type") == "QuotaReserved" and condition.get("status") == "False":
            return _short(str(condition.get("message") or "")) or None
    return None


def _verdict(
    job: FineTuneJob,
    observed_job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    previous: dict[str, Any],
    workload: dict[str, Any] | None,
    refused: str | None = None,
) -> Verdict:
    if observed_job is None:
        if previous.get("phase") in FINISHED:  # the outcome outlives a Job deleted after it finished
            return Verdict(
                previous["phase"], previous.get("reason") or previous["phase"], previous.get("message") or ""
            )
        if refused:
            return Verdict("Pending", CREATE_REFUSED, _short(refused))
        if job.spec.run_policy.suspend:
            return Verdict("Suspended", "Suspended", "spec.runPolicy.suspend is true")
        return Verdict("Pending", "CreatingJob", f"creating Job {job_name(job)}")
    if _true(observed_job, "Complete") is not None:
        # Global rank 0 (pod 0 of a multi-node run) reported the result and artifacts.
        rank0 = [pod for pod in pods if node_index(pod) in (None, 0)]
        return Verdict("Succeeded", "Succeeded", SUCCEEDED_MESSAGE, _latest(rank0, "Succeeded"))
    failed = _true(observed_job, "Failed")
    if failed is not None:
        return _failed(job, observed_job, pods, failed)
    running = _running(pods)
    if job.spec.run_policy.suspend:
        if running:
            return Verdict("Suspended", "Suspending", "waiting for the trainer to save a checkpoint and stop")
        return Verdict("Suspended", "Suspended", "spec.runPolicy.suspend is true")
    if observed_job.get("spec", {}).get("suspend"):
        queue = observed_job.get("metadata", {}).get("labels", {}).get(LABEL_KUEUE_QUEUE)
        if queue:
            message = f"waiting for Kueue LocalQueue {queue} to admit the Job"
            pending = kueue_pending_message(workload)
            return Verdict("Queued", "WaitingForAdmission", f"{message}: {pending}" if pending else message)
        return Verdict("Pending", "Resuming", "the Job is being resumed")
    nodes = job.spec.resources.nodes
    if running and nodes > 1:
        ready = running_nodes(pods)
        if ready < nodes:
            waiting = _waiting_verdict([pod for pod in pods if pod not in running])
            return Verdict("Running", "WaitingForNodes", _short(f"{ready} of {nodes} nodes running; the "
                           f"rendezvous waits for the others ({waiting.reason}: {waiting.message})"))  # fmt: skip
        return Verdict("Running", "TrainerRunning", f"{nodes} of {nodes} nodes training")
    if running:
        return Verdict("Running", "TrainerRunning", f"pod {running[0]['metadata']['name']} is training")
    return _waiting_verdict(pods)


def build_condition(
    kind: str,
    true: bool,
    reason: str,
    message: str,
    previous: dict[str, Any] | None,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    """A status condition; its lastTransitionTime is kept from `previous` unless its status flips."""
    status = "True" if true else "False"
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == status else None
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or timestamp(now),
        "observedGeneration": generation,
    }


def _storage_retry(verdict: Verdict, previous: dict[str, Any]) -> Verdict:
    """A training run whose trainer retries its writes through a storage outage (the progress it last reported
    says so) says it in its message, under a reason of its own, so the change is also a Warning Event."""
    retry = (previous.get("progress") or {}).get("storageRetry")
    if verdict.phase != "Running" or verdict.reason != "TrainerRunning" or not retry:
        return verdict
    return Verdict("Running", STORAGE_RETRYING, _short(f"{verdict.message}; {retry}"), verdict.terminal_pod)


def _conditions(
    verdict: Verdict, previous: dict[str, Any], generation: int | None, now: datetime
) -> list[dict[str, Any]]:
    before = {entry.get("type"): entry for entry in previous.get("conditions") or []}
    wanted = {
        "Ready": verdict.phase in ("Running", "Succeeded"),
        "Running": verdict.phase == "Running",
        "Succeeded": verdict.phase == "Succeeded",
        "Failed": verdict.phase == "Failed",
        "Suspended": verdict.phase == "Suspended",
    }
    conditions = [
        build_condition(kind, wanted[kind], verdict.reason, verdict.message, before.get(kind), generation, now)
        for kind in CONDITION_TYPES
    ]
    if verdict.phase == "Running" and PROGRESS_CONDITION in before:
        conditions.append(copy.deepcopy(before[PROGRESS_CONDITION]))
    return conditions


def _start_time(pods: list[dict[str, Any]]) -> str | None:
    """When a trainer container first started running."""
    starts = []
    for pod in pods:
        for status in pod.get("status", {}).get("containerStatuses") or []:
            state = status.get("state") or {}
            for entry in (
                state.get("running"),
                state.get("terminated"),
                (status.get("lastState") or {}).get("terminated"),
            ):
                if entry and entry.get("startedAt"):
                    starts.append(str(entry["startedAt"]))
    return min(starts) if starts else None


def _attempts(observed_job: dict[str, Any] | None, pods: list[dict[str, Any]], previous: dict[str, Any]) -> int:
    counted = len(pods)
    if observed_job is not None:
        counts = observed_job.get("status") or {}
        counted = max(counted, sum(int(counts.get(key) or 0) for key in ("active", "succeeded", "failed")))
    return max(counted, int(previous.get("attempts") or 0))


def _newest_checkpoint(pods: list[dict[str, Any]], previous: dict[str, Any]) -> dict[str, Any] | None:
    checkpoints = [previous["checkpoint"]] if previous.get("checkpoint") else []
    for pod in pods:
        ending = pod_ending(pod)
        if ending is not None and ending.checkpoint is not None:
            checkpoints.append(ending.checkpoint)
    return copy.deepcopy(max(checkpoints, key=lambda ref: int(ref.get("step", 0)))) if checkpoints else None


def _own_pods(observed_job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods of the observed Job only: a Job recreated after an external delete leaves its old pods behind."""
    uid = (observed_job or {}).get("metadata", {}).get("uid")
    if not uid:
        return list(pods)
    own = []
    for pod in pods:
        owners = pod.get("metadata", {}).get("ownerReferences") or []
        if not owners or any(owner.get("uid") == uid for owner in owners):
            own.append(pod)
    return own


def compute_status(
    job: FineTuneJob,
    observed_job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    previous_status: dict[str, Any] | None,
    now: datetime,
    workload: dict[str, Any] | None = None,
    refused: str | None = None,
    waiting: bool = False,
) -> dict[str, Any]:
    """The whole FineTuneJob status (wire names) for what runs now; `workload` is Kueue's Workload for the Job
    when the run is queued (it says why Kueue has not admitted it); `refused` is why the API server refused to
    create the Job that does not exist (Pending, reason CreateRefused); `waiting`: a spec.scheduling edit has not
    reached the started Job, so observedGeneration stays at the generation in effect and the message says so."""
    previous = previous_status or {}
    pods = _own_pods(observed_job, pods)
    verdict = _storage_retry(_verdict(job, observed_job, pods, previous, workload, refused), previous)
    generation = previous.get("observedGeneration") if waiting else job.metadata.generation
    message = _short(f"{verdict.message}; {SCHEDULING_WAITS}") if waiting else verdict.message
    status: dict[str, Any] = {
        "phase": verdict.phase,
        "reason": verdict.reason,
        "message": message,
        "observedGeneration": generation,
        "jobName": job_name(job),
        "conditions": _conditions(verdict, previous, generation, now),
        "attempts": _attempts(observed_job, pods, previous),
    }
    if job.spec.resources.nodes > 1 and verdict.phase == "Running":
        status["runningNodes"] = running_nodes(pods)
    started = previous.get("startTime") or _start_time(pods)
    if started is None and verdict.phase == "Running":
        started = timestamp(now)
    if started:
        status["startTime"] = started
    if verdict.phase in FINISHED:
        completed = previous.get("completionTime") if previous.get("phase") in FINISHED else None
        if completed is None and observed_job is not None:
            completed = observed_job.get("status", {}).get("completionTime")
            if completed is None and verdict.phase == "Failed":
                completed = (_true(observed_job, "Failed") or {}).get("lastTransitionTime")
        status["completionTime"] = completed or timestamp(now)
    if previous.get("progress"):
        status["progress"] = copy.deepcopy(previous["progress"])
    checkpoint = _newest_checkpoint(pods, previous)
    if checkpoint:
        status["checkpoint"] = checkpoint
    ending = pod_ending(verdict.terminal_pod) if verdict.terminal_pod is not None else None
    tracking = (ending.tracking if ending is not None else None) or previous.get("tracking")
    if tracking:  # the trackers' runs: from the ending trainer, else as last reported
        status["tracking"] = copy.deepcopy(tracking)
    if verdict.phase == "Succeeded":
        if ending is not None and ending.result is not None:
            status["result"] = ending.result
        if ending is not None and ending.artifacts is not None:
            status["artifacts"] = ending.artifacts
        for key in ("result", "artifacts"):  # a Job gone after success keeps what was reported
            if key not in status and previous.get(key):
                status[key] = copy.deepcopy(previous[key])
    return status


def failed_status(
    name: str,
    generation: int | None,
    reason: str,
    message: str,
    previous_status: dict[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    """Status of a FineTuneJob the operator refuses to run (InvalidSpec, NameConflict)."""
    previous = previous_status or {}
    verdict = Verdict("Failed", reason, _short(message))
    status = {
        "phase": "Failed",
        "reason": reason,
        "message": verdict.message,
        "observedGeneration": generation,
        "jobName": name,
        "conditions": _conditions(verdict, previous, generation, now),
        "attempts": int(previous.get("attempts") or 0),
        "completionTime": previous.get("completionTime") if previous.get("phase") == "Failed" else timestamp(now),
    }
    return status


def status_patch(previous: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """A JSON merge patch of the top-level status fields that changed (None removes one), or None."""
    previous = previous or {}
    patch: dict[str, Any] = {key: value for key, value in new.items() if previous.get(key) != value}
    patch.update({key: None for key in previous if key not in new and key != "progress"})
    return patch or None


def phase_event(previous: dict[str, Any] | None, new: dict[str, Any]) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event telling a transition of phase or reason; None if none happened."""
    previous = previous or {}
    if (previous.get("phase"), previous.get("reason")) == (new.get("phase"), new.get("reason")):
        return None
    phase, reason = str(new.get("phase")), str(new.get("reason"))
    warning = phase == "Failed" or reason in WARNING_REASONS
    text = f"{phase}: {new.get('message') or reason}"
    return ("Warning" if warning else "Normal", reason if reason != phase else phase, text)


def is_finished(status: dict[str, Any] | None) -> bool:
    return (status or {}).get("phase") in FINISHED
