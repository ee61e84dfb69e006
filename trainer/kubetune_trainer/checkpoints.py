"""Checkpoints under `<destination>/checkpoints/step-N/` and stopping on SIGTERM without losing work.

A checkpoint is complete when its `COMPLETE` marker exists; the marker is uploaded after every other
file, so a checkpoint cut short by a crash is never resumed from. Only complete checkpoints count,
the newest `checkpointsToKeep` are kept, and the newest complete one is never deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.contract import CHECKPOINTS_DIR, COMPLETE_MARKER, STOP_GRACE_ENV, stop_grace_seconds
from kubetune_trainer.storage import Storage, join, parse_uri

log = logging.getLogger(__name__)

# Without the env var (the image run by hand) the pod has Kubernetes' default grace.
DEFAULT_STOP_GRACE_SECONDS = float(stop_grace_seconds())
# Matched against the part below `<destination>/checkpoints/` only: a destination may itself contain
# `/step-3/` (a sweep's layout), which must not pass for a checkpoint.
_STEP = re.compile(r"step-(\d+)/")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    uri: str


def checkpoint_uri(destination: str, step: int) -> str:
    return join(destination, CHECKPOINTS_DIR, f"step-{step}") + "/"


def list_checkpoints(storage: Storage, destination: str) -> tuple[list[Checkpoint], list[Checkpoint]]:
    """(complete, incomplete) checkpoints under the destination, oldest first."""
    steps: dict[int, bool] = {}
    base = join(destination, CHECKPOINTS_DIR) + "/"
    for uri in storage.list(base):
        match = _STEP.match(_below(base, uri))
        if match:
            step = int(match.group(1))
            steps[step] = steps.get(step, False) or uri.endswith("/" + COMPLETE_MARKER)
    complete = [Checkpoint(s, checkpoint_uri(destination, s)) for s in sorted(steps) if steps[s]]
    incomplete = [Checkpoint(s, checkpoint_uri(destination, s)) for s in sorted(steps) if not steps[s]]
    return complete, incomplete


def _below(base: str, uri: str) -> str:
    """The part of a listed `uri` below the listed prefix `base`, with / separators."""
    loc, listed = parse_uri(base), parse_uri(uri)
    if loc.scheme == "s3":
        return listed.key[len(loc.key) :]
    return Path(listed.path).relative_to(Path(loc.path)).as_posix()


def latest_checkpoint(storage: Storage, destination: str) -> Checkpoint | None:
    complete, _ = list_checkpoints(storage, destination)
    return complete[-1] if complete else None


def download_checkpoint(storage: Storage, checkpoint: Checkpoint, local_dir: Path) -> Path:
    """A private local copy of a checkpoint in `local_dir`, to resume from.

    For a local destination `Storage.download` hands back the original directory: it is copied, never
    changed, so the checkpoint there keeps its marker and stays complete.
    """
    shutil.rmtree(local_dir, ignore_errors=True)  # a copy left by an earlier attempt may be partial
    source = storage.download(checkpoint.uri, local_dir)
    if source.resolve() != local_dir.resolve():
        shutil.copytree(source, local_dir, ignore=shutil.ignore_patterns(COMPLETE_MARKER))
    (local_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    return local_dir


def upload_checkpoint(storage: Storage, local_dir: Path, destination: str, step: int) -> tuple[Checkpoint, int]:
    """Upload every file of a local checkpoint, then the marker. Returns it and the bytes uploaded."""
    target = checkpoint_uri(destination, step)
    size = storage.upload_dir(local_dir, target)
    files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    marker = {"step": step, "files": files, "bytes": size, "time": time.time()}
    storage.write_bytes(join(target, COMPLETE_MARKER), json.dumps(marker).encode())
    return Checkpoint(step, target), size


def prune_checkpoints(storage: Storage, destination: str, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest
    complete (leftovers of interrupted uploads). Returns the deleted steps."""
    complete, incomplete = list_checkpoints(storage, destination)
    if not complete:
        return []
    newest = complete[-1].step
    doomed = complete[: -max(keep, 1)] + [c for c in incomplete if c.step < newest]
    for checkpoint in doomed:
        storage.delete_prefix(checkpoint.uri)
    return sorted(c.step for c in doomed)


class Preempted(Exception):
    """SIGTERM arrived while there was nothing to checkpoint (before training started)."""


class StopRequest:
    """Set by SIGTERM: the training loop finishes its current step, checkpoints and returns.

    A watchdog makes the bound hard: if the process has not exited `grace` seconds after the signal,
    it exits with code 1 (the checkpoint, if any was completed, is still there for the next attempt).
    """

    def __init__(self, grace: float | None = None):
        self.grace = grace if grace is not None else float(os.environ.get(STOP_GRACE_ENV, DEFAULT_STOP_GRACE_SECONDS))
        self.event = threading.Event()
        self.received_at: float | None = None
        self.on_timeout: Callable[[], None] | None = None  # e.g. write the termination message
        # Until training starts there is no progress to save: a signal then stops the run where it is.
        self.interruptible = True
        self._finished = threading.Event()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def install(self) -> Any:
        """Handle SIGTERM from now on; returns the previous handler (main thread only, else None)."""
        if threading.current_thread() is threading.main_thread():
            return signal.signal(signal.SIGTERM, self._on_signal)
        return None

    def request(self) -> None:
        if self.event.is_set():
            return
        self.received_at = time.monotonic()
        self.event.set()
        threading.Thread(target=self._watchdog, name="kubetune-stop-watchdog", daemon=True).start()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request()
        if self.interruptible:
            log.warning("SIGTERM before training started: stopping now")
            raise Preempted("SIGTERM before training started")
        log.warning("SIGTERM: finishing the current step, then checkpointing (at most %.0f s)", self.grace)

    def finish(self) -> None:
        """The run is over (its exit code is decided): the watchdog has nothing left to guard."""
        self._finished.set()

    def _watchdog(self) -> None:
        if self._finished.wait(self.grace):
            return
        log.error("still running %.0f s after SIGTERM; exiting without a new checkpoint", self.grace)
        if self.on_timeout is not None:
            self.on_timeout()
        logging.shutdown()
        os._exit(1)
