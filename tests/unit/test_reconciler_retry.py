"""A sync that fails on a watch event is retried in the background (Kopf does not retry event handlers)."""

from __future__ import annotations

import asyncio
from typing import Any

from kubetune_operator.kube import ApiError
from kubetune_operator.metrics import Metrics
from kubetune_operator.progress import ProgressPoller
from kubetune_operator.reconcile import Reconciler
from kubetune_operator.settings import Settings


class FlakyKube:
    """Fails the first read, then finds the FineTuneJob gone (the sync ends there)."""

    def __init__(self) -> None:
        self.reads = 0

    async def get(self, *_: Any) -> None:
        self.reads += 1
        if self.reads == 1:
            raise ApiError(500, "etcd timeout")

    def close(self) -> None:
        pass


async def failed_event_sync_is_retried() -> None:
    kube = FlakyKube()
    reconciler = Reconciler(kube, Settings(), Metrics(), ProgressPoller(1, 1))  # type: ignore[arg-type]
    await reconciler.sync_from_event("default", "run", retry_seconds=0.01)
    assert kube.reads == 1
    for _ in range(100):
        if kube.reads >= 2:
            break
        await asyncio.sleep(0.01)
    assert kube.reads == 2
    await reconciler.close()


def test_failed_event_sync_is_retried() -> None:
    # A loop of its own, closed here: neither pytest-asyncio's nor asyncio.run's (both leave a loop behind
    # in the main thread that a later test's garbage collection reports as an unclosed-loop ResourceWarning).
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(failed_event_sync_is_retried())
    finally:
        loop.close()
