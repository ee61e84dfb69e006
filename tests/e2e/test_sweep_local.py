"""`kubetune sweep` end to end: the real CLI runs a FineTuneSweep's trials with the real trainer on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune_cli.tiny import write_tiny_model
from tests.e2e.test_local import DATA, kubetune

pytestmark = pytest.mark.slow


def sweep_file(tmp_path: Path, **spec: object) -> Path:
    model = write_tiny_model(tmp_path / "tiny-llama")
    sweep = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": "lr"},
        "spec": {
            "template": {
                "spec": {
                    "model": {"source": str(model)},
                    "dataset": {"train": str(DATA / "support-instructions.jsonl"), "maxLength": 128, "evalSplit": 0.1},
                    "training": {
                        "maxSteps": 12,
                        "batchSize": 4,
                        "gradientAccumulationSteps": 1,
                        "evalEverySteps": 4,
                        "logEverySteps": 2,
                    },
                    "output": {"destination": str(tmp_path / "out") + "/"},
                    "resources": {"gpus": 0},
                }
            },
            "parameters": [{"name": "training.learningRate", "float": {"min": 1e-4, "max": 0.05, "log": True}}],
            "trials": 3,
            **spec,
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_a_three_trial_sweep_finds_the_trial_with_the_lowest_eval_loss(tmp_path: Path) -> None:
    path = sweep_file(tmp_path, pruner={"type": "none"}, algorithm={"type": "random", "seed": 7})
    done = kubetune("sweep", str(path), "--workdir", str(tmp_path / "work"), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("lr-")]
    assert [row[:2] for row in rows] == [["lr-0", "Succeeded"], ["lr-1", "Succeeded"], ["lr-2", "Succeeded"]], (
        done.stdout
    )
    # Each trial's own record of its result: the trainer's termination message, and its own destination.
    losses = {}
    for number in range(3):
        message = json.loads((tmp_path / "work" / f"lr-{number}" / "termination-log").read_text())
        losses[f"lr-{number}"] = message["result"]["evalLoss"]
        assert (tmp_path / "out" / f"lr-{number}" / "adapter").is_dir()
    assert len({row[4] for row in rows}) == 3, "three different learning rates"
    best = min(losses, key=losses.__getitem__)
    assert f"best: {best} evalLoss {losses[best]:.4f}" in done.stdout, (losses, done.stdout)


def test_plan_on_a_sweep_names_the_trials_the_worst_case_memory_and_gpu_hours(tmp_path: Path) -> None:
    path = sweep_file(
        tmp_path,
        parameters=[
            {"name": "training.learningRate", "float": {"min": 1e-4, "max": 0.05, "log": True}},
            {"name": "dataset.maxLength", "int": {"min": 64, "max": 128}},
        ],
        trials=6,
    )
    done = kubetune("plan", str(path), "--gpu", "L4", "-o", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    plan = json.loads(done.stdout)
    assert plan["trials"] == 6 and plan["fits"] is True
    assert plan["worst_case_parameters"]["dataset.maxLength"] == 128  # the longest sequences need the most memory
    assert plan["worst_peak_gpu_memory"] > 0 and plan["gpu_hours_at_most"] > 0
    table = kubetune("plan", str(path), "--gpu", "L4")
    assert "trials         6 (1 at a time" in table.stdout and "GPU-hours      at most" in table.stdout, table.stdout
    # A trial at an edge of the search space that the trainer would refuse: named, before any trial runs.
    too_short = sweep_file(
        tmp_path / "short", parameters=[{"name": "dataset.maxLength", "int": {"min": 16, "max": 128}}]
    )
    refused = kubetune("plan", str(too_short), "--gpu", "L4")
    assert refused.returncode == 2 and 'invalid input with {"dataset.maxLength": 16}' in refused.stderr, refused.stderr
