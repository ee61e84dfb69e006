"""A destination holds one run, written by one trainer at a time: the record of what defines the run
(`run.json`), checked before anything is resumed or reported, and the lease (`lease.json`) its trainer holds.

A destination reused with another spec used to report the old run's numbers as the new run's (a finished
one) or crash resuming a checkpoint of another shape (lora.r 16 then 8: exit 1, retried until the Job's
backoffLimit). Now the first attempt writes `run.json` (the defining fields and their digest) next to
`checkpoints/` and `COMPLETE`; every later attempt compares: the same run resumes or reports as before,
another run fails with exit 2 naming each changed field, unless `output.overwrite` asks to replace it.

The lease: two trainers once wrote one destination at once (a SIGKILLed `kubetune run`'s trainer still saving
while the rerun's resumed; one job from two work dirs; two FineTuneJobs naming one destination). The trainer
itself (rank 0) holds `lease.json` (holder, renewed every third of its term) from its first step to its exit, with
S3's conditional writes, so at most one holder wins a race. Another trainer finds it held and waits: for a holder
of the same run (the same job and work dir: a restarted pod, a rerun after a killed CLI) until it lets go; for any
other holder until it either renews (alive: exit 2 naming it, as a pod of a second FineTuneJob on the destination
must fail, not crash-loop) or lets its term pass unrenewed (gone: taken over). The term is measured on the
waiter's own clock, from the moment it saw the lease unchanged, so clocks that disagree cannot end a live lease.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.contract import CHECKPOINTS_DIR, COMPLETE_MARKER
from kubetune_trainer.errors import InvalidInput, TrainerFailure
from kubetune_trainer.storage import Storage, join

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"

# What defines a run is everything in the trainer's config that shapes its weights or the artifacts it leaves,
# except these (camelCase paths, as in the spec), each for its reason:
NOT_DEFINING: dict[str, str] = {
    # where the run is, not what it is; and what to do when the destination holds another run
    "output.destination": "the run's place, not the run",
    "output.overwrite": "what to do on a mismatch, not the run",
    # how S3 is reached: a new endpoint or region for the same bucket is the same run
    "storage": "how the destination is reached",
    "tracking": "who watches the run; the weights are the same",
    # how often state is saved or logged changes no weight
    "training.checkpointEverySteps": "how often state is saved",
    "training.checkpointsToKeep": "how many saved states are kept",
    "training.logEverySteps": "how often the loss is logged",
    # the run's length: a stopped run resumed for fewer or more steps (`kubetune run --max-steps`) goes on
    # with the same weights and optimizer state; the scheduler follows the new length
    "training.maxSteps": "the run's length",
    "training.epochs": "the run's length",
}


def defining_fields(cfg: TrainerConfig) -> dict[str, Any]:
    """The spec fields that define the run, as flat camelCase paths (`training.learningRate`), defaults filled in."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if prefix in NOT_DEFINING:
            return
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = value

    walk("", cfg.model_dump(mode="json", by_alias=True, exclude_none=True))
    return flat


def digest(fields: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Change:
    path: str
    old: Any
    new: Any

    def __str__(self) -> str:
        absent = "(unset)"
        old = absent if self.old is None else json.dumps(self.old)
        new = absent if self.new is None else json.dumps(self.new)
        return f"{self.path}: {old} -> {new}"


def changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[Change]:
    return [
        Change(path, recorded.get(path), current.get(path))
        for path in sorted(set(recorded) | set(current))
        if recorded.get(path) != current.get(path)
    ]


# What a run writes at its destination: what `output.overwrite` deletes (and nothing else under the prefix,
# which may hold other runs, such as a sweep's trials).
RUN_OBJECTS = (COMPLETE_MARKER, RUN_RECORD, "metrics.json", "samples.jsonl", "README.md")
RUN_PREFIXES = (CHECKPOINTS_DIR, "adapter", "model", "merged", "wandb")


def claim(storage: Storage, cfg: TrainerConfig) -> None:
    """Make sure the destination holds this run (or nothing yet), recording it: the first step of every attempt.

    Same run: nothing changes (resume or report as before). Another run: InvalidInput (exit 2) naming what
    changed, or with output.overwrite its objects are deleted and this run recorded in its place. A destination
    with checkpoints or a result but no record (written before records existed) is taken for this run."""
    destination = cfg.output.destination
    record_uri = join(destination, RUN_RECORD)
    fields = defining_fields(cfg)
    record = {"digest": digest(fields), "fields": fields}
    if storage.exists(record_uri):
        try:
            recorded = json.loads(storage.read_bytes(record_uri))
            recorded_fields = recorded["fields"]
        except (ValueError, KeyError, TypeError):
            recorded, recorded_fields = {}, {}
        if recorded.get("digest") == record["digest"]:
            return
        found = changes(recorded_fields, fields)
        if not cfg.output.overwrite:
            raise InvalidInput(
                "DestinationHoldsAnotherRun",
                f"output.destination {destination} holds another run ({record_uri}); what changed: "
                + "; ".join(str(c) for c in found[:12])
                + (f"; and {len(found) - 12} more" if len(found) > 12 else "")
                + ". Choose a new output.destination, or set output.overwrite: true to delete that run's "
                "checkpoints and artifacts and train this one in its place",
                field="output.destination",
            )
        log.warning(
            "output.overwrite: replacing the run at %s (%s)", destination, "; ".join(str(c) for c in found[:12])
        )
        remove_run(storage, destination)
    elif storage.exists(join(destination, COMPLETE_MARKER)):
        return  # finished before runs were recorded: reported as it is, never claimed for this spec
    storage.write_bytes(record_uri, json.dumps(record, indent=2).encode())


def remove_run(storage: Storage, destination: str) -> None:
    """Delete what a run wrote at `destination`: the result marker first, so a stop midway never leaves a
    finished-looking run with half its artifacts; the record last, so a stop midway is retried."""
    storage.delete_object(join(destination, COMPLETE_MARKER))
    for prefix in RUN_PREFIXES:
        storage.delete_prefix(join(destination, prefix))
    for name in RUN_OBJECTS:
        storage.delete_object(join(destination, name))


LEASE = "lease.json"
LEASE_SECONDS_ENV = "KUBETUNE_LEASE_SECONDS"
# A holder that stops renewing (SIGKILL, a lost node) blocks the destination this long; a clean exit lets go at
# once. Renewed every third of it, so a storage hiccup of up to two renewals costs nothing.
DEFAULT_LEASE_SECONDS = 60.0
# How long a trainer waits for a holder of the same run (a restarted pod's predecessor still saving its
# checkpoint) before it gives up with exit 1: longer than the pod's stop grace.
SAME_RUN_WAIT_SECONDS = 600.0


@dataclass(frozen=True)
class Holder:
    """Who holds a destination: `run` says which run (job and work dir), `name` says it to a person."""

    id: str
    run: str
    name: str
    seconds: float
    host: str = ""
    pid: int = 0
    renewals: int = 0
    renewed_at: float = 0.0  # wall clock, for people: waiters time the term on their own clock

    @classmethod
    def this_process(cls, run: str, seconds: float) -> Holder:
        host, pid = socket.gethostname(), os.getpid()  # the host is a pod's name in a cluster
        return cls(uuid.uuid4().hex, run, f"pid {pid} on {host} ({run})", seconds, host, pid, 0, time.time())

    def is_dead_here(self) -> bool:
        """Known gone without waiting out its term: it ran on this host and its process is no more (a local
        rerun after SIGKILL). Elsewhere only its silence tells."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def decode(cls, data: bytes) -> Holder | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_SECONDS_ENV, DEFAULT_LEASE_SECONDS))


class Lease:
    """This trainer's hold on its destination (see the module's docstring): `acquire`, then `release`."""

    def __init__(
        self, storage: Storage, destination: str, run: str, *, seconds: float | None = None, poll: float = 0.5
    ) -> None:
        self.storage = storage
        self.uri = join(destination, LEASE)
        self.holder = Holder.this_process(run, seconds or lease_seconds())
        self.poll = poll
        self.on_lost: Callable[[Holder | None], None] | None = None  # told who took it
        self._version: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self, on_wait: Callable[[str], None] | None = None) -> None:
        """Hold the lease, waiting as the module's docstring says; InvalidInput (exit 2) when another run's
        trainer is alive, TrainerFailure (exit 1) when one of the same run never lets go."""
        seen: tuple[str, float] | None = None  # (version, when first seen, on our clock)
        started = time.monotonic()
        announced = ""
        while True:
            current = self.storage.read_versioned(self.uri)
            if current is None:
                if self._write(version=None):
                    return
                continue
            data, version = current
            other = Holder.decode(data)
            now = time.monotonic()
            if other is not None and other.id == self.holder.id:
                self._version = version
                return
            if seen is None or seen[0] != version:
                if seen is not None and other is not None and other.run != self.holder.run:
                    raise self._held_by_another_run(other)
                seen = (version, now)
            if (other is not None and other.is_dead_here()) or now - seen[1] >= (
                other.seconds if other else self.holder.seconds
            ):
                log.warning(
                    "taking over %s: %s is gone (not renewed for %.0f s)",
                    self.uri,
                    other.name if other else "an unreadable holder",
                    now - seen[1],
                )
                if self._write(version=version):
                    return
                seen = None
                continue
            if other is not None and other.run == self.holder.run and now - started > SAME_RUN_WAIT_SECONDS:
                raise self._still_held_by_this_run(other)
            message = f"waiting for {other.name if other else 'the holder'} to let go of {self.uri}"
            if message != announced and on_wait is not None:
                on_wait(message)
            announced = message
            time.sleep(self.poll)

    def _held_by_another_run(self, other: Holder) -> InvalidInput:
        return InvalidInput(
            "DestinationInUse",
            f"output.destination {self.uri.rsplit('/', 1)[0]}/ is being written by another trainer: "
            f"{other.name}, which renewed its lease {self.uri} while this one waited. One run per "
            "destination: give this job another output.destination, or stop the other run first",
            field="output.destination",
        )

    def _still_held_by_this_run(self, other: Holder) -> TrainerFailure:
        return TrainerFailure(
            "DestinationInUse",
            f"{other.name} still holds {self.uri} after {SAME_RUN_WAIT_SECONDS:.0f} s; is a second copy of "
            "this run still going?",
            field="output.destination",
        )

    def _write(self, *, version: str | None) -> bool:
        """One conditional write of our holder record, then a read-back (the only check on a store without
        conditional writes)."""
        new_version = self.storage.write_if(self.uri, self.holder.encode(), version=version)
        if new_version is None:
            return False
        back = self.storage.read_versioned(self.uri)
        if back is None or (Holder.decode(back[0]) or self.holder).id != self.holder.id:
            return False
        self._version = back[1]
        log.info("holding %s as %s", self.uri, self.holder.name)
        self._renewer = threading.Thread(target=self._keep, name="kubetune-lease", daemon=True)
        self._renewer.start()
        return True

    def _keep(self) -> None:
        """Renew every third of the term; a failed renewal is retried at the next, a lease taken is lost."""
        while not self._stop.wait(self.holder.seconds / 3):
            renewed = Holder(**{**asdict(self.holder), "renewals": self.holder.renewals + 1, "renewed_at": time.time()})
            try:
                version = self.storage.write_if(self.uri, renewed.encode(), version=self._version)
            except TrainerFailure as failure:
                log.warning("cannot renew %s (retrying in %.0f s): %s", self.uri, self.holder.seconds / 3, failure)
                continue
            if version is None:
                current = self.storage.read_versioned(self.uri) if not self._stop.is_set() else None
                taker = Holder.decode(current[0]) if current else None
                log.error("lost %s to %s", self.uri, taker.name if taker else "nobody (deleted)")
                if self.on_lost is not None and not self._stop.is_set():
                    self.on_lost(taker)
                return
            self.holder, self._version = renewed, version

    def release(self) -> None:
        """Let go (at exit, however the run ended): a waiting trainer goes on at once."""
        self._stop.set()
        if self._renewer is None:
            return
        self._renewer.join(timeout=10)
        try:
            current = self.storage.read_versioned(self.uri)
            if current is not None and current[1] == self._version:
                self.storage.delete_object(self.uri)
        except TrainerFailure as failure:  # it expires on its own
            log.warning("cannot release %s: %s", self.uri, failure)
