"""A queued run whose Job was deleted is recreated only once Kueue's Workload of the old Job is gone: Kueue does
not admit a Job recreated under the same name while that Workload remains."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from kubetune_operator.metrics import Metrics
from kubetune_operator.progress import ProgressPoller
from kubetune_operator.reconcile import Reconciler
from kubetune_operator.settings import Settings
from tests.objects import finetunejob_body


class ChildrenKube:
    """Records the children created; no Job exists until one is created."""

    def __init__(self) -> None:
        self.created: list[str] = []

    async def get(self, resource: Any, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    async def ensure(self, obj: dict[str, Any], owner: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        self.created.append(obj["kind"])
        return {**obj, "metadata": {**obj["metadata"], "uid": f"new-{obj['kind']}", "resourceVersion": "9"}}, True

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return {}

    @staticmethod
    def event(*_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def old_workload() -> dict[str, Any]:
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {
            "name": "job-run-1a2b3",
            "namespace": "default",
            "uid": "old-workload",
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "run", "uid": "old-job"}],
        },
    }


async def recreated_after_the_workload_goes() -> None:
    body = finetunejob_body("run", "default", spec={"scheduling": {"queueName": "gpu"}})
    body["metadata"].update(uid="ftj-uid", resourceVersion="5", generation=1)
    body["status"] = {"phase": "Running", "observedGeneration": 1}  # its Job was deleted mid-run
    kube = ChildrenKube()
    metrics = Metrics()
    reconciler = Reconciler(kube, Settings(), metrics, ProgressPoller(1, 1))  # type: ignore[arg-type]
    reconciler.cache.store_finetunejob(body)
    reconciler.observe_workload(old_workload(), deleted=False)  # queues a sync
    for _ in range(300):
        if 'kubetune_sync_retries_total{reason="Waiting"} 1.0' in metrics.render().decode():
            break
        await asyncio.sleep(0.01)
    assert kube.created == [], "the Job was recreated while the old Job's Workload remained"
    reconciler.observe_workload(copy.deepcopy(old_workload()), deleted=True)
    for _ in range(300):
        if "Job" in kube.created:
            break
        await asyncio.sleep(0.01)
    await reconciler.close()
    assert kube.created == ["ConfigMap", "Job"]


def test_a_queued_runs_job_is_recreated_only_once_the_old_jobs_workload_is_gone() -> None:
    loop = asyncio.new_event_loop()  # see test_reconciler_retry: a loop of its own, closed here
    try:
        loop.run_until_complete(recreated_after_the_workload_goes())
    finally:
        loop.close()
