"""A FineTuneSweep on the real control plane: trials are FineTuneJobs the operator creates one after another, the
study survives an operator SIGKILLed mid-sweep (no trial duplicated or lost, the same next trial), and deleting
the sweep deletes its trials (the garbage collector, by ownerReferences).

The trainer containers are simulated by KWOK (each trial's eval loss set in its termination message), as in
test_lifecycle; `tests/e2e/test_sweep_local.py` runs real trainers through the same search and pruner.
"""

from __future__ import annotations

import json

import pytest

from kubetune_operator.api import parse_finetunesweep
from kubetune_operator.search import Search
from kubetune_operator.sweep import ANNOTATION_PARAMETERS, LABEL_SWEEP, trial_record
from kubetune_trainer.contract import EXIT_OK, Result, TerminationMessage
from tests.cluster.conftest import GROUP, PLURAL, VERSION, Kube, OperatorProcess, wait_for
from tests.objects import SPEC

SWEEPS = "finetunesweeps"


def finished_with(eval_loss: float) -> str:
    return TerminationMessage(
        outcome="succeeded", exit_code=EXIT_OK, result=Result(eval_loss=eval_loss, steps=10)
    ).encode()


def trials(kube: Kube, ns: str) -> list[dict]:
    listed = kube.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, label_selector=f"{LABEL_SWEEP}=lr")
    return sorted(listed["items"], key=lambda t: t["metadata"]["name"])


def sweep_status(kube: Kube, ns: str) -> dict:
    return kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, SWEEPS, "lr").get("status") or {}


def test_a_sweep_runs_its_trials_through_an_operator_restart_and_goes_with_them(
    kube: Kube, ns: str, operator: OperatorProcess
) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneSweep",
        "metadata": {"name": "lr", "namespace": ns},
        "spec": {
            "template": {"spec": SPEC},
            "parameters": [{"name": "training.learningRate", "float": {"min": 1e-5, "max": 1e-2, "log": True}}],
            "trials": 3,
            "parallelTrials": 1,
            "pruner": {"type": "none"},
            "algorithm": {"type": "random", "seed": 1},
        },
    }
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, SWEEPS, body)
    losses = [1.5, 0.9, 1.2]

    kube.run_pod_to(ns, 0, finished_with(losses[0]), name="lr-0")
    kube.wait_running_pod(ns, "lr-1")
    assert len(trials(kube, ns)) == 2, "parallelTrials 1: trial 1 starts once trial 0 finished"
    operator.kill()  # mid-sweep: trial 1 runs and finishes while no operator watches
    kube.run_pod_to(ns, 0, finished_with(losses[1]), name="lr-1")
    operator.start()
    kube.run_pod_to(ns, 0, finished_with(losses[2]), name="lr-2")

    status = wait_for(lambda: (s := sweep_status(kube, ns)).get("phase") == "Succeeded" and s, 60,
                      lambda: f"the sweep to succeed; status: {sweep_status(kube, ns)}")  # fmt: skip
    names = [t["metadata"]["name"] for t in trials(kube, ns)]
    assert names == ["lr-0", "lr-1", "lr-2"], "no trial duplicated or lost"
    assert (status["progress"], status["succeeded"], status["bestTrial"], status["bestValue"]) == (
        "3/3",
        3,
        "lr-1",
        0.9,
    )
    assert [t["state"] for t in status["trials"]] == ["Succeeded"] * 3
    # The trial started after the restart is the one an uninterrupted operator would have started.
    sweep = parse_finetunesweep(kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, SWEEPS, "lr"))
    found = trials(kube, ns)
    expected = Search(sweep.spec, "lr", [trial_record(sweep, t) for t in found[:2]]).next_parameters()
    assert json.loads(found[2]["metadata"]["annotations"][ANNOTATION_PARAMETERS]) == expected
    assert status["bestParameters"] == json.loads(found[1]["metadata"]["annotations"][ANNOTATION_PARAMETERS])
    table = kube.kubectl("get", "fts", "-n", ns).stdout
    assert table.split("\n")[1].split()[:5] == ["lr", "3/3", "0", "0.9", "lr-1"], table
    print(table)  # the printer columns, for the record

    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, SWEEPS, "lr")
    wait_for(
        lambda: not trials(kube, ns),
        60,
        lambda: f"the trials to go with the sweep: {[t['metadata']['name'] for t in trials(kube, ns)]}",
    )


pytestmark = pytest.mark.usefixtures("operator")
