"""Live progress: read the trainer's /progress while a run is Running, mirror it into status.progress.

The trainer needs no Kubernetes credentials: the operator pulls. Polls are bounded: one global semaphore
caps how many are in flight, each has a short timeout, and a pod that does not answer only marks its own
FineTuneJob (condition ProgressAvailable=False after a few failures in a row) without slowing others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from pydantic import ValidationError

from kubetune_operator.builders import LABEL_COMPLETION_INDEX, LABEL_FINETUNEJOB
from kubetune_operator.status import PROGRESS_CONDITION, build_condition
from kubetune_trainer import contract
from kubetune_trainer.contract import Progress

if TYPE_CHECKING:
    from kubetune_operator.cache import Key
    from kubetune_operator.metrics import Metrics
    from kubetune_operator.settings import Settings


def trainer_endpoint(pod: dict[str, Any]) -> tuple[str, str, int] | None:
    """(FineTuneJob name, pod IP, metrics port) of a running rank-0 trainer pod, else None."""
    metadata, status = pod.get("metadata", {}), pod.get("status", {})
    owner = (metadata.get("labels") or {}).get(LABEL_FINETUNEJOB)
    ip = status.get("podIP")
    if not owner or not ip or status.get("phase") != "Running" or metadata.get("deletionTimestamp"):
        return None
    if (metadata.get("labels") or {}).get(LABEL_COMPLETION_INDEX, "0") != "0":
        return None  # a multi-node run: global rank 0 runs in pod 0, the only one serving /progress
    port = contract.METRICS_PORT
    for container in pod.get("spec", {}).get("containers") or []:
        for declared in container.get("ports") or []:
            if declared.get("name") == contract.METRICS_PORT_NAME:
                port = int(declared["containerPort"])
    return owner, str(ip), port


def url_of(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{contract.PROGRESS_PATH}"


class ProgressPoller:
    """HTTP polls of trainer pods, shared by every FineTuneJob; made at startup, closed at cleanup."""

    def __init__(self, concurrency: int, timeout_seconds: float) -> None:
        self._semaphore = asyncio.Semaphore(concurrency)
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def _client(self) -> aiohttp.ClientSession:
        if self._closed:  # a daemon may still poll while the operator shuts down
            raise ProgressError("the operator is stopping")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()

    async def poll(self, url: str) -> dict[str, Any]:
        """The trainer's progress (wire names); raises ProgressError with a readable message."""
        session = await self._client()
        async with self._semaphore:
            try:
                async with session.get(url) as response:
                    if response.status != 200:
                        raise ProgressError(f"GET {url}: HTTP {response.status}")
                    body = await response.read()
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                raise ProgressError(f"GET {url}: {type(error).__name__}: {error}".rstrip(": ")) from None
        try:
            return Progress.model_validate_json(body).wire()
        except (ValidationError, ValueError) as error:
            raise ProgressError(f"GET {url}: not a progress document: {str(error).splitlines()[0]}") from None


class ProgressError(Exception):
    """A poll that did not yield progress."""


def progress_condition(
    conditions: list[dict[str, Any]], available: bool, reason: str, message: str, generation: int | None, now: datetime
) -> list[dict[str, Any]] | None:
    """`conditions` with ProgressAvailable set as given, or None when it already says so."""
    current = next((c for c in conditions if c.get("type") == PROGRESS_CONDITION), None)
    entry = build_condition(PROGRESS_CONDITION, available, reason, message, current, generation, now)
    if current is not None and all(current.get(key) == entry[key] for key in ("status", "reason", "message")):
        return None
    return [c for c in conditions if c.get("type") != PROGRESS_CONDITION] + [entry]


@dataclass(frozen=True)
class Polled:
    """What the poller last found for a Running FineTuneJob (the sync publishes it)."""

    progress: dict[str, Any] | None = None
    failures: int = 0
    error: str = ""


class ProgressFollower:
    """One poll loop per Running FineTuneJob: it polls the trainer every progress_interval_seconds, keeps what it
    found, and queues a sync when that changed (`enqueue`); the sync adds it to the status (`with_progress`), so
    status keeps one writer."""

    def __init__(
        self,
        poller: ProgressPoller,
        settings: Settings,
        metrics: Metrics,
        trainer_url: Callable[[str, str], str | None],
        enqueue: Callable[[str, str], None],
        clock: Callable[[], datetime],
    ) -> None:
        self.poller = poller
        self.settings = settings
        self.metrics = metrics
        self.trainer_url = trainer_url
        self.enqueue = enqueue
        self.clock = clock
        self._loops: dict[Key, asyncio.Task[None]] = {}
        self._polled: dict[Key, Polled] = {}
        self._closed = False

    def follow(self, key: Key, running: bool) -> None:
        """Poll `key` while it is Running; stop and forget it once it is not."""
        if running and key not in self._loops and not self._closed:
            self._loops[key] = asyncio.create_task(self._loop(key), name=f"kubetune-progress-{key[1]}")
        elif not running and key in self._loops:
            self.forget(key)

    def forget(self, key: Key) -> None:
        self._polled.pop(key, None)
        task = self._loops.pop(key, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._loops.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.poller.close()

    async def _loop(self, key: Key) -> None:
        while not self._closed:
            before = self._polled.get(key, Polled())
            polled = await self._poll(key, before)
            self._polled[key] = polled
            threshold = self.settings.progress_failure_threshold
            failing, was_failing = polled.failures >= threshold, before.failures >= threshold
            moved = polled.progress != before.progress or failing != was_failing
            if moved or (failing and polled.error != before.error):
                self.enqueue(*key)
            await asyncio.sleep(self.settings.progress_interval_seconds)

    async def _poll(self, key: Key, before: Polled) -> Polled:
        url = self.trainer_url(*key)
        if url is None:
            return Polled(before.progress, before.failures + 1, "no running trainer pod with a pod IP yet")
        try:
            progress = await self.poller.poll(url)
        except ProgressError as problem:
            self.metrics.progress_polls.labels("error").inc()
            return Polled(before.progress, before.failures + 1, str(problem))
        run = progress.get("run")
        progress = {name: value for name, value in progress.items() if name != "run"}  # status names its run
        if run is not None and run != "/".join(key):  # a pod IP answered by another run's trainer
            self.metrics.progress_polls.labels("error").inc()
            return Polled(before.progress, before.failures + 1, f"{url} serves the trainer of {run}, not of this run")
        self.metrics.progress_polls.labels("ok").inc()
        self.metrics.observe_progress(*key, progress)
        return Polled(progress)

    def with_progress(self, key: Key, status: dict[str, Any], generation: int | None) -> dict[str, Any]:
        """`status` with what was polled while Running: progress, and ProgressAvailable when polls failed
        progress_failure_threshold times in a row (or recovered after)."""
        polled = self._polled.get(key)
        if polled is None or status.get("phase") != "Running":
            return status
        status = dict(status)
        if polled.progress is not None:
            status["progress"] = polled.progress
        conditions = list(status.get("conditions") or [])
        updated = None
        if polled.failures == 0:
            if any(c.get("type") == PROGRESS_CONDITION for c in conditions):  # only a recovery is worth writing
                updated = progress_condition(conditions, True, "Polled", "", generation, self.clock())
        elif polled.failures >= self.settings.progress_failure_threshold:
            updated = progress_condition(conditions, False, "PollFailed", polled.error, generation, self.clock())
        if updated is not None:
            status["conditions"] = updated
        return status
