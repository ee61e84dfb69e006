"""FineTuneJob bodies for tests of every layer: a small valid spec, overridden per test."""

from __future__ import annotations

import copy
from typing import Any

from kubetune_operator.api import FineTuneJob, parse_finetunejob

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
