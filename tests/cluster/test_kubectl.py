"""What a user sees of a FineTuneJob through the real kubectl: printer columns, explain, describe, wait."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from kubetune_operator.api import FineTuneJobSpec
from kubetune_trainer.config import TrainingSpec
from kubetune_trainer.contract import Progress
from tests.cluster.conftest import GROUP, PLURAL, VERSION, Kube, wait_for
from tests.objects import succeeded_message

pytestmark = pytest.mark.usefixtures("operator")


def table(kube: Kube, ns: str, *args: str) -> dict[str, str]:
    """The one row of `kubectl get ftj run`, keyed by column header."""
    lines = kube.kubectl("get", "ftj", "run", "-n", ns, *args).stdout.splitlines()
    assert len(lines) == 2, lines
    header, row = lines
    # Columns are left-aligned under their headers; a blank cell is all spaces.
    starts = [i for i, char in enumerate(header) if char != " " and (i == 0 or header[i - 1] == " ")]
    ends = [*starts[1:], max(len(header), len(row)) + 1]
    return {header[s:e].strip(): row[s:e].strip() for s, e in zip(starts, ends, strict=True)}


def test_get_shows_phase_progress_loss_and_eta_and_wide_shows_reason(kube: Kube, ns: str) -> None:
    kube.apply(ns)
    kube.run_pod_to(ns, 0, succeeded_message())
    kube.wait_phase(ns, "Succeeded")
    columns = table(kube, ns)
    assert list(columns) == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "AGE"]
    assert columns["NAME"] == "run" and columns["PHASE"] == "Succeeded"
    wide = table(kube, ns, "-o", "wide")
    assert list(wide) == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "REASON", "AGE"]
    assert wide["REASON"] == "Succeeded"

    # KWOK's containers serve no /progress, so write status.progress as the operator mirrors it from the
    # trainer (a finished run keeps the last progress seen): the columns must read the fields it fills.
    progress = Progress(stage="done", step=10, total_steps=10, percent=100.0, train_loss=1.25, eta="0s").wire()
    kube.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, PLURAL, "run", {"status": {"progress": progress}}
    )

    def progress_shown() -> dict[str, str] | None:
        row = table(kube, ns)
        return row if row["PROGRESS"] else None

    columns = wait_for(progress_shown, 10, "the Progress column")
    assert (columns["PROGRESS"], columns["LOSS"], columns["ETA"]) == ("100", "1.25", "0s")


def test_explain_prints_the_models_descriptions(kube: Kube) -> None:
    explained = " ".join(kube.kubectl("explain", "finetunejob.spec.training").stdout.split())
    section = FineTuneJobSpec.model_fields["training"].description
    learning_rate = TrainingSpec.model_fields["learning_rate"].description
    assert section and learning_rate
    assert section in explained
    assert f"learningRate <number> {' '.join(learning_rate.split())}" in explained, explained


def test_describe_shows_the_operators_events(kube: Kube, ns: str) -> None:
    kube.apply(ns)
    kube.run_pod_to(ns, 0, succeeded_message())
    kube.wait_phase(ns, "Succeeded")

    def until_succeeded() -> list[dict[str, Any]] | None:
        events = [event for event in kube.events(ns) if event["involvedObject"]["kind"] == "FineTuneJob"]
        return events if any(event["reason"] == "Succeeded" for event in events) else None

    events = wait_for(until_succeeded, 30, lambda: f"a Succeeded event; events: {kube.events(ns)}")
    described = kube.kubectl("describe", "ftj", "run", "-n", ns).stdout
    assert "Events:" in described
    shown = described.split("Events:", 1)[1]
    assert len(events) >= 2, events  # the way there (waiting, running) as well as the end
    for event in events:
        assert event["reason"] in shown and event["message"] in shown, (event, shown)


def test_wait_for_the_succeeded_condition(kube: Kube, ns: str) -> None:
    kube.apply(ns)
    plane = kube.plane
    args = [str(plane.binaries.kubectl), f"--kubeconfig={plane.admin_kubeconfig}", "wait", "-n", ns,
            "--for=condition=Succeeded", "ftj/run", "--timeout=60s"]  # fmt: skip
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as waiting:
        kube.run_pod_to(ns, 0, succeeded_message())
        out, err = waiting.communicate(timeout=90)
    assert waiting.returncode == 0, err
    assert "finetunejob.kubetune.dev/run condition met" in out
    assert kube.status(ns)["phase"] == "Succeeded"
