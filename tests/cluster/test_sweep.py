"""A FineTuneSweep on the real control plane: trials are FineTuneJobs the operator creates one after another.

The first test simulates the trainer containers with KWOK (each trial's eval loss set in its termination
message, as in test_lifecycle): the study survives an operator SIGKILLed mid-sweep (no trial duplicated or lost,
the same next trial), and deleting the sweep deletes its trials (the garbage collector, by ownerReferences).
The second runs each trial's container as a real trainer process on the tiny model, as test_progress does (the
loopback KWOK node, whose pod IPs reach this machine): the operator polls each trial's evaluations, prunes the
trial whose learning rate diverges, and the sweep names the best learning rate.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune_cli.tiny import write_tiny_model
from kubetune_operator.api import parse_finetunesweep
from kubetune_operator.search import Search, TrialRecord
from kubetune_operator.sweep import ANNOTATION_PARAMETERS, ANNOTATION_PRUNED, LABEL_SWEEP, trial_record
from kubetune_trainer.contract import EXIT_OK, EXIT_PREEMPTED, Result, TerminationMessage
from tests.cluster.conftest import GROUP, PLURAL, VERSION, Kube, OperatorProcess, wait_for
from tests.cluster.controlplane import LOOPBACK_NODE, LOOPBACK_TAINT
from tests.cluster.test_progress import DATASET, trainer_process
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


# The highest learning rate the API allows: full fine-tuning of the tiny model diverges at it (an eval loss near 58
# at step 5, where chance is 6.9 and the others reach 6.4-6.8).
DIVERGING = 1.0
MAX_STEPS = 100  # enough for the operator to prune the diverging trial on a fast machine (~0.05 s a step)
TRIAL_TIMEOUT = 600  # seconds: a trial trains for seconds on an idle machine, minutes on a loaded one


def run_trainers(kube: Kube, ns: str, scratch: Path, count: int) -> dict[str, tuple[int, int]]:
    """Play the kubelet for `count` trials run one at a time: start each trial pod's trainer when the pod runs;
    when it ends, its exit code and termination message become the container's; when the pod is deleted (a
    suspended, pruned trial), SIGTERM it. Returns each trial's (exit code, last step it trained)."""
    outcomes = {}
    for number in range(count):
        name = f"lr-{number}"
        pod = kube.wait_running_pod(ns, name, timeout=120)["metadata"]["name"]
        (scratch / name).mkdir(parents=True)
        trainer = trainer_process(kube, ns, scratch / name, name=name)
        stopped, deadline = False, time.monotonic() + TRIAL_TIMEOUT
        try:
            while trainer.poll() is None:
                log = scratch / name / "trainer.log"
                assert time.monotonic() < deadline, f"{name} still running; its pods: {kube.pods(ns, name)}; " \
                    f"status: {kube.status(ns, name)}; log: {log.read_text()[-2000:]}"  # fmt: skip
                current = [p for p in kube.pods(ns, name) if p["metadata"]["name"] == pod]
                if not current or current[0]["metadata"].get("deletionTimestamp"):
                    trainer.send_signal(signal.SIGTERM)  # what the kubelet does to a deleted pod's container
                    trainer.wait(timeout=120)
                    stopped = True
                time.sleep(0.2)
        finally:
            if trainer.poll() is None:
                trainer.kill()
                trainer.wait()
        if not stopped:
            kube.set_fate(ns, pod, trainer.returncode, (scratch / name / "termination-log").read_text())
        steps = re.findall(r"train step (\d+)/", (scratch / name / "trainer.log").read_text())
        outcomes[name] = (trainer.returncode, int(steps[-1]) if steps else 0)
    return outcomes


def test_a_sweep_of_real_trainers_prunes_the_diverging_learning_rate_and_finds_the_best(
    kube: Kube, ns: str, tmp_path: Path
) -> None:
    rates = [3e-4, 3e-3, 3e-2, DIVERGING]
    spec: dict[str, Any] = {
        "template": {
            "spec": {
                "model": {"source": str(write_tiny_model(tmp_path / "tiny-llama"))},
                "dataset": {"train": str(DATASET), "maxLength": 64, "evalSplit": 0.05},
                "method": {"type": "full"},
                "training": {
                    "maxSteps": MAX_STEPS,
                    "logEverySteps": 1,  # the harness reads the last step trained from the log
                    "evalEverySteps": 5,
                    "checkpointEverySteps": 1000,
                    "batchSize": 1,
                },
                "output": {"destination": str(tmp_path / "out") + "/"},
                "resources": {"gpus": 0},
                "scheduling": {
                    "nodeSelector": {"kubernetes.io/hostname": LOOPBACK_NODE},
                    "tolerations": [{**LOOPBACK_TAINT, "operator": "Equal"}],
                },
            }
        },
        "parameters": [{"name": "training.learningRate", "categorical": {"choices": rates}}],
        "algorithm": {"type": "grid"},
        "trials": 4,
        "parallelTrials": 1,  # the trainers share this machine's port 9400
        "pruner": {"type": "median", "startupTrials": 2},
    }
    # A seed whose grid runs the too-high rate after the startup trials, which always finish.
    spec["algorithm"]["seed"] = next(seed for seed in range(100) if DIVERGING in grid_order(ns, spec, seed)[2:])
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, SWEEPS, sweep_body(ns, spec))
    outcomes = run_trainers(kube, ns, tmp_path / "trials", 4)

    status = wait_for(lambda: (s := sweep_status(kube, ns)).get("phase") == "Succeeded" and s, 60,
                      lambda: f"the sweep to succeed; status: {sweep_status(kube, ns)}")  # fmt: skip
    by_rate = {t["parameters"]["training.learningRate"]: t for t in status["trials"]}
    diverged = by_rate[DIVERGING]
    assert diverged["state"] == "Pruned", status["trials"]
    assert outcomes[diverged["name"]][0] == EXIT_PREEMPTED, "stopped cleanly: a checkpoint, then exit 3"
    assert outcomes[diverged["name"]][1] < MAX_STEPS, outcomes
    pruned_trial = next(t for t in trials(kube, ns) if t["metadata"]["name"] == diverged["name"])
    assert pruned_trial["spec"]["runPolicy"]["suspend"] and ANNOTATION_PRUNED in pruned_trial["metadata"]["annotations"]
    succeeded = {t["name"]: t["value"] for t in status["trials"] if t["state"] == "Succeeded"}
    assert status["bestTrial"] == min(succeeded, key=succeeded.__getitem__) and status["bestValue"] == min(
        succeeded.values()
    )
    assert status["bestParameters"]["training.learningRate"] != DIVERGING
    assert len(succeeded) >= 2, "the two startup trials finish: the best is chosen among real results"
    run = sum(steps for _, steps in outcomes.values())
    print(kube.kubectl("get", "fts", "-n", ns).stdout)
    print("\n".join(f"{t['name']} {t['state']} lr={t['parameters']['training.learningRate']} value={t.get('value')} "
                    f"step={t.get('step')} trained={outcomes[t['name']][1]}" for t in status["trials"]))  # fmt: skip
    print(f"steps trained: {run} of {4 * MAX_STEPS} for the full sweep")


def grid_order(ns: str, spec: dict[str, Any], seed: int) -> list[float]:
    """The learning rates a grid sweep with this seed runs, in order (what the operator's search will ask)."""
    sweep = parse_finetunesweep(sweep_body(ns, {**spec, "algorithm": {"type": "grid", "seed": seed}}))
    records: list[TrialRecord] = []
    for number in range(4):
        values = Search(sweep.spec, "lr", records).next_parameters()
        records.append(TrialRecord(number, values, "Succeeded", 1.0))
    return [record.parameters["training.learningRate"] for record in records]


def sweep_body(ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneSweep", "metadata": {"name": "lr", "namespace": ns},
            "spec": spec}  # fmt: skip


pytestmark = pytest.mark.usefixtures("operator")
