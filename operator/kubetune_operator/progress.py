"""Live progress: read the trainer's /progress while a run is Running, mirror it into status.progress.

The trainer needs no Kubernetes credentials: the operator pulls. Polls are bounded: one global semaphore
caps how many are in flight, each has a short timeout, and a pod that does not answer only marks its own
FineTuneJob (condition ProgressAvailable=False after a few failures in a row) without slowing others.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import aiohttp
from pydantic import ValidationError

from kubetune_operator.builders import LABEL_COMPLETION_INDEX, LABEL_FINETUNEJOB
from kubetune_operator.status import PROGRESS_CONDITION, build_condition
from kubetune_trainer import contract
from kubetune_trainer.contract import Progress


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
