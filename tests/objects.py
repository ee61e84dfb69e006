"""Objects for tests of every layer: FineTuneJob bodies (a small valid spec, overridden per test), the Job and
pods the Job controller and kubelet write, and the termination messages the trainer writes."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from kubetune_operator.api import FineTuneJob, parse_finetunejob
from kubetune_trainer.contract import (
    EXIT_INVALID_INPUT,
    EXIT_OK,
    Artifacts,
    CheckpointRef,
    Result,
    TerminationMessage,
    TrainerError,
)

SPEC: dict[str, Any] = {
    "model": {"source": "s3://models/tiny/"},
    "dataset": {"train": "s3://datasets/support/train.jsonl"},
    "training": {"maxSteps": 10},
    "output": {"destination": "s3://artifacts/support-bot/"},
}


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# The finalizer Kopf added while a progress daemon ran (before the operator reconciled from its own caches);
# objects an earlier version left behind still carry it until the operator removes it.
LEGACY_FINALIZER = "kubetune.dev/finalizer"


def finetunejob_body(
    name: str = "support-bot", namespace: str = "default", spec: dict[str, Any] | None = None, **metadata: Any
) -> dict[str, Any]:
    """A FineTuneJob as `kubectl apply` sends it; `spec` is merged into the minimal valid one."""
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace, **metadata},
        "spec": merge(SPEC, spec or {}),
    }


def finetunejob(name: str = "support-bot", spec: dict[str, Any] | None = None, **metadata: Any) -> FineTuneJob:
    """A parsed FineTuneJob as the API server would hand it over (uid and generation set)."""
    metadata = {"uid": "0e5f3c1a-0000-4000-8000-000000000001", "generation": 1, **metadata}
    return parse_finetunejob(finetunejob_body(name, spec=spec, **metadata))


# -- what the Job controller, the kubelet and the trainer write -----------------------------------------------

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
JOB_UID = "job-uid-1"


def succeeded_message(steps: int = 10) -> str:
    """What a trainer that finished writes (exit 0), for the FineTuneJob `run` that tests/cluster applies."""
    return TerminationMessage(
        outcome="succeeded",
        exit_code=EXIT_OK,
        result=Result(
            train_loss=1.25, eval_loss=1.5, perplexity=4.48, train_seconds=12.0, trained_tokens=4096, steps=steps
        ),
        artifacts=Artifacts(
            adapter="s3://artifacts/run/adapter/",
            metrics="s3://artifacts/run/metrics.json",
            model_card="s3://artifacts/run/README.md",
        ),
    ).encode()


def invalid_input_message(
    field: str = "dataset.fields.response", message: str = "row has no 'response'", line: int = 7
) -> str:
    """What a trainer that refused a row of its training data (exit 2) writes."""
    return TerminationMessage(
        outcome="invalid",
        exit_code=EXIT_INVALID_INPUT,
        error=TrainerError(
            reason="InvalidDataset", message=message, field=field, file="s3://datasets/support/train.jsonl", line=line
        ),
    ).encode()


# What support-bot's trainer writes when it finishes (with its last checkpoint), and when it refuses its data.
SUCCEEDED_MESSAGE = TerminationMessage(
    outcome="succeeded",
    exit_code=0,
    result=Result(train_loss=1.25, eval_loss=1.5, perplexity=4.48, train_seconds=30, trained_tokens=1000, steps=10),
    artifacts=Artifacts(
        adapter="s3://artifacts/support-bot/adapter/", model_card="s3://artifacts/support-bot/README.md"
    ),
    checkpoint=CheckpointRef(step=10, uri="s3://artifacts/support-bot/checkpoints/step-10/"),
).encode()
INVALID_MESSAGE = invalid_input_message(
    "dataset.fields.prompt", "column 'prompt' is missing; columns are: question, answer", line=1
)


def job(*conditions: tuple[str, str, str], suspend: bool = False, queue: str | None = None, **counts: int) -> dict:
    """support-bot's batch/v1 Job as the Job controller reports it: `conditions` as (type, reason, message)."""
    labels = {"kueue.x-k8s.io/queue-name": queue} if queue else {}
    return {
        "metadata": {"name": "support-bot", "namespace": "default", "uid": JOB_UID, "labels": labels},
        "spec": {"suspend": suspend},
        "status": {
            **counts,
            "conditions": [
                {"type": kind, "status": "True", "reason": reason, "message": message,
                 "lastTransitionTime": "2026-01-02T03:00:00Z"}
                for kind, reason, message in conditions
            ],
        },
    }  # fmt: skip


def pod(name: str = "support-bot-abcde", phase: str = "Pending", **status: Any) -> dict:
    """A pod of that Job, with `status` as the kubelet writes it."""
    return {
        "metadata": {
            "name": name,
            "namespace": "default",
            "creationTimestamp": "2026-01-02T02:00:00Z",
            "ownerReferences": [{"kind": "Job", "name": "support-bot", "uid": JOB_UID, "controller": True}],
        },
        "status": {"phase": phase, **status},
    }


def trainer_state(**state: Any) -> list[dict]:
    return [{"name": "trainer", "state": state}]


def running_pod(name: str = "support-bot-abcde") -> dict:
    return pod(name, "Running", containerStatuses=trainer_state(running={"startedAt": "2026-01-02T02:30:00Z"}))


def terminated_pod(exit_code: int, message: str = "", reason: str = "Error", name: str = "support-bot-abcde") -> dict:
    terminated = {
        "exitCode": exit_code,
        "reason": reason,
        "message": message,
        "startedAt": "2026-01-02T02:30:00Z",
        "finishedAt": "2026-01-02T02:59:00Z",
    }
    return pod(
        name, "Succeeded" if exit_code == 0 else "Failed", containerStatuses=trainer_state(terminated=terminated)
    )
