"""A destination holds one run: the record of what defines it (`run.json`), checked before anything is resumed
or reported.

A destination reused with another spec used to report the old run's numbers as the new run's (a finished
one) or crash resuming a checkpoint of another shape (lora.r 16 then 8: exit 1, retried until the Job's
backoffLimit). Now the first attempt writes `run.json` (the defining fields and their digest) next to
`checkpoints/` and `COMPLETE`; every later attempt compares: the same run resumes or reports as before,
another run fails with exit 2 naming each changed field, unless `output.overwrite` asks to replace it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.contract import CHECKPOINTS_DIR, COMPLETE_MARKER
from kubetune_trainer.errors import InvalidInput
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
