"""A sync refused for longer than any fixed number of tries is retried until it succeeds, and says so in status.

Kopf does not retry event handlers: the reconciler's work queue does, with per-key backoff and no limit.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from kubetune_operator.kube import ApiError
from kubetune_operator.metrics import Metrics
from kubetune_operator.progress import ProgressPoller
from kubetune_operator.reconcile import Reconciler
from kubetune_operator.settings import Settings
from tests.objects import finetunejob_body

QUOTA_REFUSAL = (
    'jobs.batch "run" is forbidden: exceeded quota: no-jobs, requested: count/jobs.batch=1, '
    "used: count/jobs.batch=0, limited: count/jobs.batch=0"
)


class QuotaKube:
    """An API server whose quota refuses the Job `refusals` times (ConfigMaps pass); keeps the status written."""

    def __init__(self, body: dict[str, Any], refusals: int) -> None:
        self.body = body
        self.refusals = refusals
        self.job_creates = 0
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.created: dict[str, dict[str, Any]] = {}

    async def get(self, resource: Any, namespace: str, name: str) -> dict[str, Any] | None:
        return self.created.get(resource.plural)

    async def ensure(self, obj: dict[str, Any], owner: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        if obj["kind"] == "Job":
            self.job_creates += 1
            if self.job_creates <= self.refusals:
                raise ApiError(403, QUOTA_REFUSAL)
        created = {**obj, "metadata": {**obj["metadata"], "uid": f"uid-{obj['kind']}", "resourceVersion": "5"}}
        self.created[obj["kind"].lower() + "s"] = created
        return created, True

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        merged = {**(self.body.get("status") or {}), **patch}
        status = {key: value for key, value in merged.items() if value is not None}
        version = str(int(self.body["metadata"]["resourceVersion"]) + 1)
        self.body = {**self.body, "metadata": {**self.body["metadata"], "resourceVersion": version}, "status": status}
        self.statuses.append(copy.deepcopy(status))
        return copy.deepcopy(self.body)

    def event(self, obj: dict[str, Any], type: str, reason: str, message: str) -> None:
        self.events.append((type, reason, message))

    def close(self) -> None:
        pass


async def refused_for_long() -> None:
    body = finetunejob_body("run", "default")
    body["metadata"].update(uid="ftj-uid", resourceVersion="1", generation=1)
    kube = QuotaKube(body, refusals=12)  # the reconciler used to give up after 5
    metrics = Metrics()
    settings = Settings(retry_base_seconds=0.001, retry_max_seconds=0.01)
    reconciler = Reconciler(kube, settings, metrics, ProgressPoller(1, 1))  # type: ignore[arg-type]
    reconciler.observe_finetunejob(body, deleted=False)
    for _ in range(500):
        if reconciler.cache.job("default", "run") is not None:
            break
        await asyncio.sleep(0.01)
    assert kube.job_creates == 13 and reconciler.cache.job("default", "run") is not None
    for _ in range(500):  # a Pending reason's change is written once it held COALESCE_SECONDS
        if kube.statuses[-1]["reason"] != "CreateRefused":
            break
        await asyncio.sleep(0.01)
    await reconciler.close()
    cleared = kube.statuses[-1]
    assert cleared["reason"] == "WaitingForPod" and "refused" not in cleared["message"]
    refused = kube.statuses[0]
    assert (refused["phase"], refused["reason"]) == ("Pending", "CreateRefused")
    assert "Job run was refused (HTTP 403)" in refused["message"] and "exceeded quota: no-jobs" in refused["message"]
    ready = next(c for c in refused["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "CreateRefused" and "no-jobs" in ready["message"]
    assert next(e for e in kube.events if e[1] == "CreateRefused")[0] == "Warning"
    assert len(kube.statuses) == 2, "the same refusal is written once, not once per retry"
    assert 'kubetune_sync_retries_total{reason="CreateRefused"} 12.0' in metrics.render().decode()


def test_a_refusal_outlasting_many_retries_is_retried_until_it_clears_and_shown_in_status() -> None:
    # A loop of its own, closed here: neither pytest-asyncio's nor asyncio.run's (both leave a loop behind
    # in the main thread that a later test's garbage collection reports as an unclosed-loop ResourceWarning).
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(refused_for_long())
    finally:
        loop.close()


async def relisted_after_own_write() -> None:
    body = finetunejob_body("run", "default")
    body["metadata"].update(uid="ftj-uid", resourceVersion="1", generation=1)
    kube = QuotaKube(body, refusals=0)
    metrics = Metrics()
    reconciler = Reconciler(kube, Settings(), metrics, ProgressPoller(1, 1))  # type: ignore[arg-type]

    def syncs() -> float:
        return reconciler.metrics.reconcile_total.labels("ok")._value.get()  # type: ignore[no-any-return]

    async def settled(count: float) -> None:
        for _ in range(300):
            if syncs() >= count and reconciler.queue.idle():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{syncs()} syncs, expected {count}")

    reconciler.observe_finetunejob(body, deleted=False)
    await settled(1)
    written = copy.deepcopy(kube.body)  # the status the sync wrote, as the watch echoes it
    before = syncs()
    reconciler.observe_finetunejob(written, deleted=False)  # the echo of its own write: nothing to do
    await asyncio.sleep(0.05)
    assert syncs() == before
    reconciler.observe_finetunejob(copy.deepcopy(written), deleted=False)  # a re-list (a watch restarted)
    await settled(before + 1)
    await reconciler.close()


def test_a_relisted_finetunejob_is_synced_even_at_the_resource_version_already_kept() -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(relisted_after_own_write())
    finally:
        loop.close()
