"""A sync that fails on a watch event is retried in the background (Kopf does not retry event handlers)."""

from __future__ import annotations

import asyncio
from typing import Any

from kubetune_operator.kube import ApiError
from kubetune_operator.metrics import Metrics
from kubetune_operator.progress import ProgressPoller
from kubetune_operator.reconcile import Reconciler
from kubetune_operator.settings import Settings
from tests.objects import finetunejob_body


class FlakyKube:
    """Refuses the first create (an API hiccup); records the calls after it."""

    def __init__(self) -> None:
        self.creates = 0

    async def ensure(self, obj: dict[str, Any], owner: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        self.creates += 1
        if self.creates == 1:
            raise ApiError(500, "etcd timeout")
        return {**obj, "metadata": {**obj["metadata"], "uid": f"uid-{obj['kind']}"}}, True

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return {}

    @staticmethod
    def event(*_: Any) -> None:
        pass

    def close(self) -> None:
        pass


async def failed_event_sync_is_retried() -> None:
    kube = FlakyKube()
    reconciler = Reconciler(kube, Settings(), Metrics(), ProgressPoller(1, 1))  # type: ignore[arg-type]
    body = finetunejob_body("run", "default")
    body["metadata"].update(uid="ftj-uid", resourceVersion="1", generation=1)
    reconciler.cache.store_finetunejob(body)
    await reconciler.sync_from_event("default", "run", retry_seconds=0.01)
    assert kube.creates == 1
    for _ in range(100):
        if reconciler.cache.job("default", "run") is not None:
            break
        await asyncio.sleep(0.01)
    assert kube.creates == 3  # retried: the ConfigMap, then the Job
    assert reconciler.cache.job("default", "run") is not None
    await reconciler.close()


def test_failed_event_sync_is_retried() -> None:
    # A loop of its own, closed here: neither pytest-asyncio's nor asyncio.run's (both leave a loop behind
    # in the main thread that a later test's garbage collection reports as an unclosed-loop ResourceWarning).
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(failed_event_sync_is_retried())
    finally:
        loop.close()
