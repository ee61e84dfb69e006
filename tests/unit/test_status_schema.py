"""Every status the operator writes is declared in the CRD: a structural schema silently drops the rest."""

from __future__ import annotations

import pathlib
from typing import Any

import jsonschema
import pytest
import yaml

from kubetune_operator.progress import progress_condition
from kubetune_operator.status import compute_status, failed_status, trainer_ending
from kubetune_trainer.contract import CheckpointRef, Progress, TerminationMessage, TrainerError
from tests.objects import INVALID_MESSAGE, NOW, SUCCEEDED_MESSAGE, finetunejob, job, terminated_pod
from tests.unit.test_status import SITUATIONS

CRD = pathlib.Path(__file__).parents[2] / "crds" / "kubetune.dev_finetunejobs.yaml"


def closed(schema: Any) -> Any:
    """The schema with unknown properties forbidden wherever properties are listed (as pruning would)."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    return schema


STATUS_SCHEMA = closed(yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"])[
    "properties"
]["status"]


def statuses() -> list[dict[str, Any]]:
    found = [
        compute_status(finetunejob(spec=spec), observed, pods, {}, NOW) for _, spec, observed, pods, *_ in SITUATIONS
    ]
    done = compute_status(
        finetunejob(),
        job(("Complete", "CompletionsReached", ""), succeeded=1),
        [terminated_pod(0, SUCCEEDED_MESSAGE)],
        {},
        NOW,
    )
    progress = Progress(stage="train", step=5, total_steps=10, percent=50, train_loss=1.0, eta="1m", eta_seconds=60)
    live = {**found[7], "progress": progress.wire()}
    live["conditions"] = progress_condition(live["conditions"], False, "PollFailed", "timeout", 1, NOW)
    refused = failed_status("x", 1, "InvalidSpec", "spec.model: field required", None, NOW)
    return [*found, done, live, refused, *local_statuses()]


def local_statuses() -> list[dict[str, Any]]:
    """What `kubetune run` prints for each way the trainer can end."""
    preempted = TerminationMessage(outcome="preempted", exit_code=3, checkpoint=CheckpointRef(step=4, uri="s3://b/c/"))
    failed = TerminationMessage(
        outcome="failed", exit_code=1, error=TrainerError(reason="StorageError", message="bucket gone")
    )
    endings = [
        (TerminationMessage.model_validate_json(SUCCEEDED_MESSAGE), 0),
        (TerminationMessage.model_validate_json(INVALID_MESSAGE), 2),
        (preempted, 3),
        (failed, 1),
        (None, 137),
    ]
    return [trainer_ending(message, code).status() for message, code in endings]


@pytest.mark.parametrize("status", statuses())
def test_status_fits_the_crd_schema(status: dict[str, Any]) -> None:
    jsonschema.validate(status, STATUS_SCHEMA)
