"""A FineTuneSweep's trials as FineTuneJobs, and its status, as pure functions (no API calls).

`build_trial` makes a trial's FineTuneJob (owned by the sweep, its parameters in an annotation); `trial_record`
reads one back into the search's `TrialRecord`; `compute_sweep_status` derives the sweep's status from the
records. The sweep controller (`sweep_controller`) and `kubetune sweep` both use them.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from kubetune_operator import API_GROUP, API_VERSION, KIND, SWEEP_KIND
from kubetune_operator.api import EVALUATED_METRICS, FineTuneSweep, trial_spec
from kubetune_operator.search import Search, TrialRecord, objective_of, trials_to_run
from kubetune_operator.status import build_condition

LABEL_SWEEP = f"{API_GROUP}/sweep"  # on every trial: the sweep it belongs to
ANNOTATION_TRIAL = f"{API_GROUP}/trial-number"
ANNOTATION_PARAMETERS = f"{API_GROUP}/trial-parameters"  # JSON: the values the search chose
ANNOTATION_PRUNED = f"{API_GROUP}/pruned-at-step"  # set when the pruner stopped the trial


def trial_name(sweep_name: str, number: int) -> str:
    return f"{sweep_name}-{number}"


def build_trial(sweep: FineTuneSweep, number: int, parameters: dict[str, Any]) -> dict[str, Any]:
    """Trial `number`'s FineTuneJob: the template with the parameters set, writing under its own name in the
    template's output.destination (a destination holds one run), owned by the sweep (its deletion deletes the
    trials), in the template's Kueue queue like any run."""
    name = trial_name(sweep.metadata.name, number)
    spec = trial_spec(sweep.spec.template.spec, parameters)
    output = spec.output.model_copy(update={"destination": f"{spec.output.destination.rstrip('/')}/{name}/"})
    spec = spec.model_copy(update={"output": output})
    metadata = sweep.spec.template.metadata
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": sweep.metadata.namespace,
            "labels": {**metadata.labels, LABEL_SWEEP: sweep.metadata.name},
            "annotations": {
                **metadata.annotations,
                ANNOTATION_TRIAL: str(number),
                ANNOTATION_PARAMETERS: json.dumps(parameters, sort_keys=True),
            },
            "ownerReferences": [
                {
                    "apiVersion": f"{API_GROUP}/{API_VERSION}",
                    "kind": SWEEP_KIND,
                    "name": sweep.metadata.name,
                    "uid": sweep.metadata.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
    }


def pruned_patch(step: int) -> dict[str, Any]:
    """Stop a pruned trial as a user suspends a run: the trainer checkpoints on SIGTERM and exits; the
    annotation records why (the trial's state is Pruned from then on)."""
    return {"metadata": {"annotations": {ANNOTATION_PRUNED: str(step)}}, "spec": {"runPolicy": {"suspend": True}}}


def record_of(
    number: int, parameters: dict[str, Any], status: dict[str, Any], metric: str, pruned: bool
) -> TrialRecord:
    """A trial's record from its FineTuneJob status (the operator's, or the one `kubetune run` computes)."""
    value, intermediate = objective_of(metric, status)
    steps = (status.get("result") or {}).get("steps")
    if value is not None and steps is not None and metric in EVALUATED_METRICS:
        intermediate.setdefault(int(steps), value)  # the final evaluation, which a poll may not have seen
    phase = status.get("phase")
    if phase == "Succeeded":  # before the pruner's mark: a trial may finish before its stop takes effect
        state = "Succeeded" if value is not None else "Failed"  # finished without the metric: nothing to compare
    elif pruned:
        state = "Pruned"
    elif phase == "Failed":
        state = "Failed"
    else:
        state = "Running"
    return TrialRecord(number, parameters, state, value if state == "Succeeded" else None, intermediate)  # type: ignore[arg-type]


def is_trial_of(body: dict[str, Any], sweep_uid: str | None) -> bool:
    """Whether a FineTuneJob is a trial of this sweep (owned by it, with a trial number)."""
    metadata = body.get("metadata") or {}
    owned = any(ref.get("uid") == sweep_uid for ref in metadata.get("ownerReferences") or [])
    return owned and ANNOTATION_TRIAL in (metadata.get("annotations") or {})


def trial_record(sweep: FineTuneSweep, body: dict[str, Any]) -> TrialRecord:
    """A trial FineTuneJob (as the API serves it) as the search's record."""
    annotations = body["metadata"].get("annotations") or {}
    return record_of(
        int(annotations[ANNOTATION_TRIAL]),
        json.loads(annotations.get(ANNOTATION_PARAMETERS) or "{}"),
        body.get("status") or {},
        sweep.spec.objective.metric,
        ANNOTATION_PRUNED in annotations,
    )


def trial_status(sweep_name: str, record: TrialRecord) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": trial_name(sweep_name, record.number),
        "number": record.number,
        "parameters": record.parameters,
        "state": record.state,
    }
    if record.reported() is not None:
        entry["value"] = record.reported()
    if record.last_step is not None:
        entry["step"] = record.last_step
    return entry


def compute_sweep_status(
    sweep: FineTuneSweep, search: Search, previous: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """The sweep's status from its trials (as the search holds them): trials, counts, best, phase, conditions."""
    records, name = search.records, sweep.metadata.name
    counts = {
        state: sum(1 for r in records if r.state == state) for state in ("Running", "Succeeded", "Pruned", "Failed")
    }
    total = trials_to_run(sweep.spec)
    finished = counts["Succeeded"] + counts["Pruned"] + counts["Failed"]
    best = search.best()
    if finished >= total and counts["Running"] == 0:
        phase, reason = ("Succeeded", "TrialsDone") if best is not None else ("Failed", "NoTrialSucceeded")
        message = (
            f"{finished} trials finished; best {trial_name(name, best.number)}"
            if best
            else (f"none of the {finished} trials succeeded with {sweep.spec.objective.metric}")
        )
    else:
        phase, reason = "Running", "TrialsRunning"
        message = f"{counts['Running']} running, {finished} of {total} finished"
    generation = sweep.metadata.generation
    before = {entry.get("type"): entry for entry in previous.get("conditions") or []}
    conditions = [
        build_condition(kind, phase == kind, reason, message, before.get(kind), generation, now)
        for kind in ("Running", "Succeeded", "Failed")
    ]
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions,
        "observedGeneration": generation,
        "trials": [trial_status(name, record) for record in records],
        "progress": f"{finished}/{total}",
        "running": counts["Running"],
        "succeeded": counts["Succeeded"],
        "pruned": counts["Pruned"],
        "failed": counts["Failed"],
        "reason": reason,
        "message": message,
    }
    if best is not None:
        status.update(bestTrial=trial_name(name, best.number), bestValue=best.value, bestParameters=best.parameters)
    return status
