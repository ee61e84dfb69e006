"""What the watches saw: the FineTuneJobs, their Jobs and pods, and Kueue's Workloads, kept in memory.

The operator reconciles from these, as controller-runtime's informer caches do: a sync reads the API only
where the cache cannot answer (a create that finds the name taken, a conflict). Each object is kept once,
slimmed as it arrives: `metadata.managedFields` and kubectl's last-applied annotation are dropped from every
object, and a pod keeps only what status computation and progress polling read (its identity, its
containers' names and ports, its status), not its whole spec.

An object the operator wrote itself (a created Job, a patched status) is stored from the API's answer at
once, so a sync that follows before the watch event does not act on what it has already changed. A watch
event older than what is stored (a lower resourceVersion) does not overwrite it.
"""

from __future__ import annotations

from typing import Any

from kubetune_operator.builders import LABEL_FINETUNEJOB

Body = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
# What a pod keeps of its spec: the containers' names and declared ports (the trainer's metrics port).
POD_CONTAINER_FIELDS = ("name", "ports")


def slim(obj: Body) -> Body:
    """`obj` without managedFields and kubectl's last-applied annotation (a shallow copy where they were)."""
    metadata = obj.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    if "managedFields" not in metadata and LAST_APPLIED not in annotations:
        return obj
    metadata = {key: value for key, value in metadata.items() if key != "managedFields"}
    if LAST_APPLIED in annotations:
        metadata["annotations"] = {key: value for key, value in annotations.items() if key != LAST_APPLIED}
    return {**obj, "metadata": metadata}


def slim_pod(pod: Body) -> Body:
    """What the operator reads of a pod: metadata, the containers' names and ports, and the status."""
    containers = [
        {key: container[key] for key in POD_CONTAINER_FIELDS if key in container}
        for container in (pod.get("spec") or {}).get("containers") or []
    ]
    kept = slim(pod)
    return {
        "apiVersion": pod.get("apiVersion", "v1"),
        "kind": pod.get("kind", "Pod"),
        "metadata": kept.get("metadata") or {},
        "spec": {"containers": containers},
        "status": pod.get("status") or {},
    }


def _newer(stored: Body | None, incoming: Body) -> bool:
    """Whether `incoming` may replace `stored`: not when both carry numeric resourceVersions and it is older.

    resourceVersions are opaque by contract; etcd's (and the emulated API's) are integers that only grow.
    Anything else is taken as newer (the watch is the authority).
    """
    if stored is None:
        return True
    old = str((stored.get("metadata") or {}).get("resourceVersion", ""))
    new = str((incoming.get("metadata") or {}).get("resourceVersion", ""))
    if old.isdigit() and new.isdigit():
        return int(new) >= int(old)
    return True


def key_of(obj: Body) -> Key:
    metadata = obj.get("metadata") or {}
    return str(metadata.get("namespace") or ""), str(metadata.get("name") or "")


class Cache:
    """The watched objects by (namespace, name); pods grouped by the FineTuneJob that owns them."""

    def __init__(self) -> None:
        self.finetunejobs: dict[Key, Body] = {}
        self.jobs: dict[Key, Body] = {}
        self._pods: dict[Key, dict[str, Body]] = {}  # (namespace, FineTuneJob) -> pod name -> pod
        # Kueue's Workload of each queued run's Job: (namespace, Job name) -> body.
        self.workloads: dict[Key, Body] = {}

    # -- FineTuneJobs ------------------------------------------------------------------------------

    def finetunejob(self, namespace: str, name: str) -> Body | None:
        return self.finetunejobs.get((namespace, name))

    def store_finetunejob(self, obj: Body) -> Body:
        """Keep `obj` (from a watch event or a write's answer) unless a newer one is kept; returns the kept one."""
        key = key_of(obj)
        stored = self.finetunejobs.get(key)
        if stored is not None and stored["metadata"].get("uid") != obj["metadata"].get("uid"):
            stored = None  # a new FineTuneJob of the same name: its resourceVersions are not comparable
        if _newer(stored, obj):
            self.finetunejobs[key] = slim(obj)
        return self.finetunejobs[key]

    # -- Jobs ----------------------------------------------------------------------------------------

    def job(self, namespace: str, name: str) -> Body | None:
        return self.jobs.get((namespace, name))

    def store_job(self, obj: Body, deleted: bool = False) -> None:
        key = key_of(obj)
        stored = self.jobs.get(key)
        if stored is not None and stored["metadata"].get("uid") != obj["metadata"].get("uid"):
            stored = None  # a recreated Job
        if deleted:
            if stored is None or _newer(stored, obj):
                self.jobs.pop(key, None)
        elif _newer(stored, obj):
            self.jobs[key] = slim(obj)

    # -- pods ----------------------------------------------------------------------------------------

    def pods(self, namespace: str, finetunejob: str) -> list[Body]:
        return list(self._pods.get((namespace, finetunejob), {}).values())

    def store_pod(self, obj: Body, deleted: bool = False) -> str | None:
        """Keep (or drop) a pod of a FineTuneJob; returns that FineTuneJob's name, None for another pod."""
        metadata = obj.get("metadata") or {}
        owner = (metadata.get("labels") or {}).get(LABEL_FINETUNEJOB)
        if not owner:
            return None
        key = (str(metadata.get("namespace") or ""), str(owner))
        pods = self._pods.setdefault(key, {})
        name = str(metadata.get("name") or "")
        if deleted:
            pods.pop(name, None)
            if not pods:
                del self._pods[key]
        elif _newer(pods.get(name), obj):
            pods[name] = slim_pod(obj)
        return str(owner)

    def forget(self, namespace: str, name: str) -> None:
        """Everything kept of a deleted FineTuneJob (its children's own DELETED events may come later)."""
        self.finetunejobs.pop((namespace, name), None)
        self.workloads.pop((namespace, name), None)

    def sizes(self) -> dict[str, int]:
        return {
            "finetunejobs": len(self.finetunejobs),
            "jobs": len(self.jobs),
            "pods": sum(len(pods) for pods in self._pods.values()),
            "workloads": len(self.workloads),
        }
