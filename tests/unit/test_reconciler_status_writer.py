"""One writer of status: the progress poller's findings and the sync's phase reach status through the one sync
path, serialized per FineTuneJob, and a sync with nothing new writes nothing (reads come from the cache)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from kubetune_operator.builders import build_trainer_job
from kubetune_operator.metrics import Metrics
from kubetune_operator.progress import ProgressError
from kubetune_operator.reconcile import Reconciler
from kubetune_operator.settings import Settings
from tests.objects import finetunejob, finetunejob_body

KEY = ("default", "run")


class RecordingKube:
    """The status subresource of one FineTuneJob; every patch notes whether its sync lock was held."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.reconciler: Reconciler | None = None
        self.patches: list[tuple[dict[str, Any], bool]] = []
        self.other_calls: list[str] = []

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        assert self.reconciler is not None
        self.patches.append((patch, self.reconciler._locks[(namespace, name)].locked()))
        status = {**(self.body.get("status") or {}), **patch}
        version = str(int(self.body["metadata"]["resourceVersion"]) + 1)
        self.body = {**self.body, "metadata": {**self.body["metadata"], "resourceVersion": version}, "status": status}
        return copy.deepcopy(self.body)

    def __getattr__(self, name: str) -> Any:  # any other API call (get, create, list) is a failure here
        self.other_calls.append(name)
        raise AssertionError(f"unexpected API call {name}: the sync must read from the cache")

    @staticmethod
    def event(*_: Any) -> None:
        pass

    def close(self) -> None:
        pass


class ScriptedPoller:
    """The trainer's /progress: answers from a script, then repeats the last answer."""

    def __init__(self, answers: list[dict[str, Any] | Exception]) -> None:
        self.answers = answers

    async def poll(self, url: str) -> dict[str, Any]:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def close(self) -> None:
        pass


def running_objects() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    body = finetunejob_body("run", "default")
    body["metadata"].update(uid="ftj-uid", resourceVersion="1", generation=1)
    job = build_trainer_job(finetunejob("run", uid="ftj-uid", namespace="default", generation=1), Settings())
    job["metadata"].update(uid="job-uid", resourceVersion="2")
    job["status"] = {"active": 1, "ready": 1, "startTime": "2026-01-01T00:00:00Z"}
    pod = {
        "metadata": {
            "name": "run-0",
            "namespace": "default",
            "resourceVersion": "3",
            "labels": {"kubetune.dev/finetunejob": "run"},
            "ownerReferences": [{"kind": "Job", "name": "run", "uid": "job-uid"}],
            "managedFields": [{"manager": "kubelet"}],
        },
        "spec": {"containers": [{"name": "trainer", "image": "x", "env": [{"name": "A", "value": "b"}]}]},
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.7",
            "containerStatuses": [
                {"name": "trainer", "state": {"running": {"startedAt": "2026-01-01T00:00:01Z"}}, "ready": True}
            ],
        },
    }
    return body, job, pod


async def settle(reconciler: Reconciler, kube: RecordingKube, patches: int) -> None:
    for _ in range(300):
        if len(kube.patches) >= patches and reconciler.queue.idle():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(kube.patches)} status patches, expected {patches}: {kube.patches}")


async def poller_and_sync_write_through_one_path() -> None:
    body, job, pod = running_objects()
    kube = RecordingKube(body)
    progress = {"step": 3, "totalSteps": 10, "percent": 30.0}
    poller = ScriptedPoller([progress, ProgressError("GET ...: refused")])
    settings = Settings(progress_interval_seconds=0.02, progress_failure_threshold=2)
    reconciler = Reconciler(kube, settings, Metrics(), poller)  # type: ignore[arg-type]
    kube.reconciler = reconciler
    reconciler.observe_job(job, deleted=False)
    reconciler.observe_pod(pod, deleted=False)
    reconciler.observe_finetunejob(body, deleted=False)
    # Running, then the first poll's progress, then ProgressAvailable=False after two refused polls.
    await settle(reconciler, kube, 3)
    written = len(kube.patches)
    reconciler.observe_pod({**pod, "metadata": {**pod["metadata"], "resourceVersion": "9"}}, deleted=False)
    await asyncio.sleep(0.1)  # a sync ran (the pod event) and found nothing to write
    assert len(kube.patches) == written
    await reconciler.close()
    assert kube.other_calls == []
    assert all(locked for _, locked in kube.patches), "a status write outside the FineTuneJob's sync"
    assert kube.patches[0][0]["phase"] == "Running"
    assert kube.patches[1][0] == {"progress": progress}
    status = kube.body["status"]
    assert status["phase"] == "Running" and status["progress"] == progress
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Running"]["status"] == "True"  # the poller's write did not drop the sync's conditions
    assert conditions["ProgressAvailable"]["status"] == "False"
    assert "refused" in conditions["ProgressAvailable"]["message"]
    # The pod was kept without its managedFields and without the spec beyond containers' names and ports.
    kept = reconciler.cache.pods("default", "run")[0]
    assert "managedFields" not in kept["metadata"] and kept["spec"] == {"containers": [{"name": "trainer"}]}


def test_poller_and_sync_write_status_through_one_path() -> None:
    loop = asyncio.new_event_loop()  # see test_reconciler_retry: a loop of its own, closed here
    try:
        loop.run_until_complete(poller_and_sync_write_through_one_path())
    finally:
        loop.close()


async def progress_of_another_run_is_not_written() -> None:
    body, job, pod = running_objects()
    kube = RecordingKube(body)
    ours = {"run": "default/run", "step": 3, "totalSteps": 10, "percent": 30.0}
    # The pod's address answered by another run's trainer (an IP reused between two polls; in tests/cluster, the
    # next trial's pod polled on this machine's port while the pruned trial's trainer still stops there).
    theirs = {"run": "default/other", "step": 9, "totalSteps": 10, "percent": 90.0}
    poller = ScriptedPoller([dict(ours), dict(theirs)])
    settings = Settings(progress_interval_seconds=0.02, progress_failure_threshold=2)
    reconciler = Reconciler(kube, settings, Metrics(), poller)  # type: ignore[arg-type]
    kube.reconciler = reconciler
    reconciler.observe_job(job, deleted=False)
    reconciler.observe_pod(pod, deleted=False)
    reconciler.observe_finetunejob(body, deleted=False)
    await settle(reconciler, kube, 3)
    await reconciler.close()
    status = kube.body["status"]
    assert status["progress"] == {"step": 3, "totalSteps": 10, "percent": 30.0}  # ours, without the run's name
    condition = next(c for c in status["conditions"] if c["type"] == "ProgressAvailable")
    assert condition["status"] == "False" and "serves the trainer of default/other" in condition["message"]


def test_progress_of_another_run_is_not_written() -> None:
    loop = asyncio.new_event_loop()  # see test_reconciler_retry: a loop of its own, closed here
    try:
        loop.run_until_complete(progress_of_another_run_is_not_written())
    finally:
        loop.close()
