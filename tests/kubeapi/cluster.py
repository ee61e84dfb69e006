"""Tests play the Job controller, the scheduler and the kubelet with these, as the real ones write.

The emulator runs no controllers: a test creates a Job's pods and moves them and the Job through
their states itself. Everything goes through the official `kubernetes` client, so the operator
sees the same watch events as in a cluster. Objects may be given as dicts or client models;
dicts (camelCase, as served) are returned.
"""

from __future__ import annotations

import datetime
from typing import Any

import kubernetes

Body = dict[str, Any]

JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
CONTROLLER_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _client(api_client: kubernetes.client.ApiClient | None) -> kubernetes.client.ApiClient:
    return api_client if api_client is not None else kubernetes.client.ApiClient()


def _as_dict(obj: Any, api_client: kubernetes.client.ApiClient) -> Body:
    return obj if isinstance(obj, dict) else api_client.sanitize_for_serialization(obj)


def _patch_pod_status(pod: Any, status: Body, api_client: kubernetes.client.ApiClient | None) -> Body:
    client = _client(api_client)
    meta = _as_dict(pod, client)["metadata"]
    patched = kubernetes.client.CoreV1Api(client).patch_namespaced_pod_status(
        meta["name"], meta["namespace"], {"status": status}
    )
    return _as_dict(patched, client)


def _container_statuses(pod: Body, **fields: Any) -> list[Body]:
    return [
        {"name": c["name"], "image": c.get("image", ""), "imageID": "", "restartCount": 0, **fields}
        for c in pod["spec"].get("containers", [])
    ]


def create_pod_for_job(
    job: Any,
    *,
    phase: str = "Pending",
    index: int | None = None,
    api_client: kubernetes.client.ApiClient | None = None,
) -> Body:
    """Create one pod of a Job from its template, labelled and owned as the Job controller does."""
    client = _client(api_client)
    job = _as_dict(job, client)
    meta, template = job["metadata"], job["spec"]["template"]
    labels = dict(template.get("metadata", {}).get("labels") or {})
    labels.update({label: meta["name"] for label in JOB_NAME_LABELS})
    labels.update({label: meta["uid"] for label in CONTROLLER_UID_LABELS})
    annotations = dict(template.get("metadata", {}).get("annotations") or {})
    if index is not None:
        annotations["batch.kubernetes.io/job-completion-index"] = str(index)
        labels["batch.kubernetes.io/job-completion-index"] = str(index)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"{meta['name']}-" + (f"{index}-" if index is not None else ""),
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": template["spec"],
    }
    created = kubernetes.client.CoreV1Api(client).create_namespaced_pod(meta["namespace"], pod)
    return _patch_pod_status(created, {"phase": phase}, client)


def pods_of_job(job: Any, api_client: kubernetes.client.ApiClient | None = None) -> list[Body]:
    client = _client(api_client)
    meta = _as_dict(job, client)["metadata"]
    pods = kubernetes.client.CoreV1Api(client).list_namespaced_pod(
        meta["namespace"], label_selector=f"batch.kubernetes.io/job-name={meta['name']}"
    )
    return [_as_dict(pod, client) for pod in pods.items]


def mark_unschedulable(
    pod: Any,
    message: str = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
    api_client: kubernetes.client.ApiClient | None = None,
) -> Body:
    """The scheduler's verdict on a pod that fits no node."""
    return _patch_pod_status(
        pod,
        {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": message,
                    "lastProbeTime": None,
                    "lastTransitionTime": _now(),
                }
            ],
        },
        api_client,
    )


def set_pod_waiting(
    pod: Any,
    reason: str = "ImagePullBackOff",
    message: str = "",
    api_client: kubernetes.client.ApiClient | None = None,
) -> Body:
    """A scheduled pod whose containers cannot start (image pull, config errors)."""
    client = _client(api_client)
    pod = _as_dict(pod, client)
    return _patch_pod_status(
        pod,
        {
            "phase": "Pending",
            "startTime": _now(),
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": _now()}],
            "containerStatuses": _container_statuses(
                pod, ready=False, started=False, state={"waiting": {"reason": reason, "message": message}}
            ),
        },
        client,
    )


def set_pod_running(pod: Any, *, ready: bool = True, api_client: kubernetes.client.ApiClient | None = None) -> Body:
    """Scheduled and started, as the kubelet reports it."""
    client = _client(api_client)
    pod = _as_dict(pod, client)
    now, ready_status = _now(), "True" if ready else "False"
    return _patch_pod_status(
        pod,
        {
            "phase": "Running",
            "startTime": pod.get("status", {}).get("startTime") or now,
            "podIP": "10.0.0.10",
            "hostIP": "192.168.0.10",
            "conditions": [
                {"type": type_, "status": status, "lastTransitionTime": now}
                for type_, status in (
                    ("PodScheduled", "True"),
                    ("Initialized", "True"),
                    ("ContainersReady", ready_status),
                    ("Ready", ready_status),
                )
            ],
            "containerStatuses": _container_statuses(
                pod, ready=ready, started=True, state={"running": {"startedAt": now}}
            ),
        },
        client,
    )


def terminate_pod(
    pod: Any,
    exit_code: int,
    message: str = "",
    *,
    reason: str | None = None,
    api_client: kubernetes.client.ApiClient | None = None,
) -> Body:
    """All containers exited; `message` is the termination message (/dev/termination-log)."""
    client = _client(api_client)
    pod = _as_dict(pod, client)
    now = _now()
    started = pod.get("status", {}).get("startTime") or now
    terminated = {
        "exitCode": exit_code,
        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
        "startedAt": started,
        "finishedAt": now,
        "containerID": "containerd://0",
    }
    if message:
        terminated["message"] = message
    return _patch_pod_status(
        pod,
        {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "startTime": started,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "lastTransitionTime": now,
                    "reason": "PodCompleted" if exit_code == 0 else "PodFailed",
                }
            ],
            "containerStatuses": _container_statuses(pod, ready=False, started=False, state={"terminated": terminated}),
        },
        client,
    )


def update_job_status(job: Any, *, api_client: kubernetes.client.ApiClient | None = None, **status: Any) -> Body:
    """Merge `status` fields (active=1, ready=1, succeeded=..., failed=...) into the Job's status,
    setting `startTime` as the Job controller does once the Job runs."""
    client = _client(api_client)
    meta = _as_dict(job, client)["metadata"]
    batch = kubernetes.client.BatchV1Api(client)
    current = _as_dict(batch.read_namespaced_job_status(meta["name"], meta["namespace"]), client)
    if not current.get("status", {}).get("startTime") and "startTime" not in status:
        status["startTime"] = _now()
    return _as_dict(batch.patch_namespaced_job_status(meta["name"], meta["namespace"], {"status": status}), client)


def set_job_condition(
    job: Any,
    type: str,
    reason: str = "",
    message: str = "",
    *,
    api_client: kubernetes.client.ApiClient | None = None,
    **counts: Any,
) -> Body:
    """Write a Job condition with the status fields the Job controller writes alongside it.

    `Complete` comes with `SuccessCriteriaMet`, `completionTime` and `succeeded`; `Failed` with
    `FailureTarget` and `failed` (Kubernetes 1.31+); `Suspended` clears `startTime` and `active`.
    `counts` (active=, ready=, succeeded=, failed=) override the defaults.
    """
    client = _client(api_client)
    current = _as_dict(job, client)
    meta = current["metadata"]
    batch = kubernetes.client.BatchV1Api(client)
    current = _as_dict(batch.read_namespaced_job_status(meta["name"], meta["namespace"]), client)
    status = dict(current.get("status") or {})
    now = _now()
    added = {"Complete": ["SuccessCriteriaMet", "Complete"], "Failed": ["FailureTarget", "Failed"]}.get(type, [type])
    conditions = [c for c in status.get("conditions") or [] if c["type"] not in added]
    conditions += [
        {
            "type": t,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastProbeTime": now,
            "lastTransitionTime": now,
        }
        for t in added
    ]
    status["conditions"] = conditions
    status.setdefault("startTime", now)
    if type in ("Complete", "Failed", "Suspended"):
        status.update(active=0, ready=0, terminating=0)
    if type == "Complete":
        status["completionTime"] = now
        status["succeeded"] = max(status.get("succeeded") or 0, current["spec"].get("completions") or 1)
    if type == "Failed":
        status["failed"] = max(status.get("failed") or 0, 1)
    if type == "Suspended":
        status["startTime"] = None
    status.update(counts)
    return _as_dict(batch.patch_namespaced_job_status(meta["name"], meta["namespace"], {"status": status}), client)
