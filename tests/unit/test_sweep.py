"""FineTuneSweep: the API's refusals (named by field), the search rebuilt from its trials, the trials and status."""

from __future__ import annotations

import copy
import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune_operator.api import SpecError, parse_finetunesweep
from kubetune_operator.search import Search, TrialRecord
from kubetune_operator.sweep import (
    ANNOTATION_PRUNED,
    build_trial,
    compute_sweep_status,
    pruned_patch,
    trial_record,
)
from tests.support.admission import admit
from tests.support.catalog import SWEEP_BAD, SWEEP_BASE

NOW = datetime(2026, 12, 6, tzinfo=UTC)
SWEEP: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneSweep",
    "metadata": {"name": "lr", "namespace": "team", "uid": "sweep-uid", "generation": 1},
    "spec": {
        "template": {
            "metadata": {"labels": {"team": "a"}},
            "spec": {
                "model": {"source": "s3://models/llama/"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"destination": "s3://out/lr/"},
                "scheduling": {"queueName": "gpus"},
            },
        },
        "parameters": [{"name": "training.learningRate", "float": {"min": 1e-5, "max": 1e-2, "log": True}}],
        "trials": 4,
        "parallelTrials": 2,
        "pruner": {"startupTrials": 1},
    },
}


def sweep_with(**spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(SWEEP)
    body["spec"].update(spec)
    return body


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"parameters": [{"name": "training.learningrate", "float": {"min": 1e-5, "max": 1e-2}}]}, "parameters.0"),
        ({"parameters": [{"name": "training.learningRate", "float": {"min": 1e-2, "max": 1e-5}}]}, "float.min"),
        ({"parameters": [{"name": "method.lora.r", "int": {"min": 64, "max": 8}}]}, "int.min"),
        (
            {
                "parameters": [{"name": "training.learningRate", "float": {"min": 1e-5, "max": 1e-2}}],
                "algorithm": {"type": "grid"},
            },
            "grid",
        ),
        ({"parallelTrials": 5}, "parallelTrials"),
        ({"trials": 101}, "trials"),
        ({"parameters": [{"name": "method.lora.r", "float": {"min": 4, "max": 8}}]}, "float ranges only number"),
        (
            {"parameters": [{"name": "method.lora.r", "int": {"min": 4, "max": 8}, "categorical": {"choices": [4]}}]},
            "exactly one",
        ),
        (
            {"parameters": [{"name": "training.lrScheduler", "categorical": {"choices": ["cosine", "sideways"]}}]},
            "'sideways'",
        ),
    ],
)
def test_a_bad_sweep_is_refused_naming_the_field(spec: dict[str, Any], named: str) -> None:
    with pytest.raises(SpecError) as refused:
        parse_finetunesweep(sweep_with(**spec))
    assert named in str(refused.value)


def test_an_objective_or_pruner_that_needs_evaluation_is_refused_without_an_eval_set() -> None:
    body = sweep_with(pruner={"type": "none"})
    body["spec"]["template"]["spec"]["dataset"]["evalSplit"] = 0
    with pytest.raises(SpecError, match="objective evalLoss needs an eval set"):
        parse_finetunesweep(body)
    body["spec"]["objective"] = {"metric": "trainLoss"}
    parse_finetunesweep(body)  # nothing evaluates: trainLoss, unpruned, is fine
    body["spec"]["pruner"] = {"type": "median"}
    with pytest.raises(SpecError, match="pruning compares trials at each evaluation"):
        parse_finetunesweep(body)


def finished(number: int, rate: float, losses: list[float], state: str = "Succeeded") -> TrialRecord:
    steps = {10 * (i + 1): loss for i, loss in enumerate(losses)}
    return TrialRecord(
        number, {"training.learningRate": rate}, state, losses[-1] if state == "Succeeded" else None, steps
    )  # type: ignore[arg-type]


def test_the_study_rebuilt_from_the_same_trials_suggests_the_same_next_trial() -> None:
    spec = parse_finetunesweep(SWEEP).spec
    history = [finished(0, 1e-4, [2.0, 1.5]), finished(1, 3e-3, [1.8, 1.2]), finished(2, 5e-5, [2.2], "Running")]
    first = Search(spec, "lr", history).next_parameters()
    assert Search(spec, "lr", list(reversed(history))).next_parameters() == first  # order of the watch does not matter
    assert Search(spec, "lr", history[:2]).next_parameters() != first  # a different history, another trial
    assert 1e-5 <= first["training.learningRate"] <= 1e-2


def test_a_grid_runs_each_combination_once_then_is_exhausted() -> None:
    body = sweep_with(
        parameters=[
            {"name": "training.learningRate", "categorical": {"choices": [1e-4, 1e-3]}},
            {"name": "method.lora.r", "categorical": {"choices": [8, 16]}},
        ],
        algorithm={"type": "grid"},
        trials=10,
    )
    spec = parse_finetunesweep(body).spec
    records: list[TrialRecord] = []
    while not (search := Search(spec, "grid", records)).done():
        records.append(TrialRecord(search.next_number, search.next_parameters(), "Succeeded", 1.0))
    points = {(r.parameters["training.learningRate"], r.parameters["method.lora.r"]) for r in records}
    assert len(records) == 4 and points == {(1e-4, 8), (1e-4, 16), (1e-3, 8), (1e-3, 16)}


def test_the_median_pruner_stops_a_trial_behind_the_median_and_a_diverged_one() -> None:
    spec = parse_finetunesweep(SWEEP).spec
    done = finished(0, 1e-4, [2.0, 1.5, 1.2])
    behind = finished(1, 1e-2, [3.0], "Running")
    ahead = finished(1, 1e-3, [1.9], "Running")
    diverged = TrialRecord(1, {"training.learningRate": 1e-2}, "Running", None, {10: math.nan})
    assert Search(spec, "lr", [done, behind]).should_prune(behind)
    assert not Search(spec, "lr", [done, ahead]).should_prune(ahead)
    assert Search(spec, "lr", [done, diverged]).should_prune(diverged)
    assert not Search(spec, "lr", [behind]).should_prune(behind), "no trial has finished: startupTrials 1"


def test_a_trial_is_the_template_with_its_values_owned_by_the_sweep_and_reads_back_as_its_record() -> None:
    sweep = parse_finetunesweep(SWEEP)
    trial = build_trial(sweep, 3, {"training.learningRate": 3e-4})
    assert trial["metadata"]["name"] == "lr-3"
    assert trial["metadata"]["ownerReferences"][0] | {"uid": "sweep-uid", "kind": "FineTuneSweep", "controller": True} \
        == trial["metadata"]["ownerReferences"][0]  # fmt: skip
    assert trial["metadata"]["labels"] == {"team": "a", "kubetune.dev/sweep": "lr"}
    assert trial["spec"]["training"]["learningRate"] == 3e-4
    assert trial["spec"]["scheduling"]["queueName"] == "gpus"  # Kueue admits trials like any run
    assert trial["spec"]["output"]["destination"] == "s3://out/lr/lr-3/"  # a destination holds one run
    assert json.loads(trial["metadata"]["annotations"]["kubetune.dev/trial-parameters"]) == {
        "training.learningRate": 3e-4
    }

    running = {**trial, "status": {"phase": "Running", "progress": {"evaluations": [{"step": 10, "evalLoss": 2.5}]}}}
    assert trial_record(sweep, running) == TrialRecord(3, {"training.learningRate": 3e-4}, "Running", None, {10: 2.5})
    pruned = copy.deepcopy(running)
    pruned["metadata"]["annotations"][ANNOTATION_PRUNED] = "10"
    assert trial_record(sweep, pruned).state == "Pruned"
    assert pruned_patch(10)["spec"] == {"runPolicy": {"suspend": True}}
    succeeded = {**running, "status": {"phase": "Succeeded", "result": {"evalLoss": 1.25, "steps": 40}}}
    assert trial_record(sweep, succeeded).value == 1.25
    assert trial_record(sweep, succeeded).intermediate == {40: 1.25}  # the final evaluation, if no poll saw it
    finished_anyway = {**pruned, "status": succeeded["status"]}  # it finished before its stop took effect
    assert trial_record(sweep, finished_anyway).state == "Succeeded"


def test_the_status_counts_trials_and_names_the_best() -> None:
    sweep = parse_finetunesweep(SWEEP)
    records = [finished(0, 1e-4, [2.0, 1.5]), finished(1, 3e-3, [1.8, 1.2]), finished(2, 1e-2, [4.0], "Pruned"),
               finished(3, 1e-3, [1.9], "Running")]  # fmt: skip
    status = compute_sweep_status(sweep, Search(sweep.spec, "lr", records), {}, NOW)
    assert (status["phase"], status["progress"], status["running"], status["pruned"]) == ("Running", "3/4", 1, 1)
    assert (status["bestTrial"], status["bestValue"]) == ("lr-1", 1.2)
    assert status["bestParameters"] == {"training.learningRate": 3e-3}
    assert status["trials"][2] == {"name": "lr-2", "number": 2, "parameters": {"training.learningRate": 1e-2},
                                   "state": "Pruned", "value": 4.0, "step": 10}  # fmt: skip
    done = compute_sweep_status(sweep, Search(sweep.spec, "lr", [*records[:3], finished(3, 1e-3, [1.0])]), status, NOW)
    assert (done["phase"], done["bestTrial"], done["progress"]) == ("Succeeded", "lr-3", "4/4")


@pytest.mark.parametrize(("case", "obj", "names"), SWEEP_BAD, ids=[case for case, _, _ in SWEEP_BAD])
def test_models_and_crd_refuse_the_same_sweeps(case: str, obj: dict[str, Any], names: str) -> None:
    with pytest.raises(SpecError) as refused:
        parse_finetunesweep(obj)
    from_server = admit(obj)
    assert any(names in problem for problem in refused.value.problems), refused.value.problems
    assert any(names in problem for problem in from_server), from_server


def test_the_models_and_the_crd_admit_the_base_sweep() -> None:
    parse_finetunesweep(SWEEP_BASE)
    assert admit(SWEEP_BASE) == []


def test_the_operator_exports_trials_by_state_and_the_best_value_then_forgets_a_deleted_sweep() -> None:
    from kubetune_operator.metrics import Metrics

    metrics = Metrics()
    metrics.observe_sweep("team", "lr", {"running": 1, "succeeded": 2, "pruned": 1, "failed": 0, "bestValue": 1.2})
    text = metrics.render().decode()
    assert 'kubetune_sweep_trials{finetunesweep="lr",namespace="team",state="Pruned"} 1.0' in text
    assert 'kubetune_sweep_best_value{finetunesweep="lr",namespace="team"} 1.2' in text
    metrics.forget_sweep("team", "lr")
    assert 'finetunesweep="lr"' not in metrics.render().decode()
