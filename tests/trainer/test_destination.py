"""A destination holds one run (issue 28, item 3): what defines a run is recorded beside its checkpoints and
result, a changed spec is refused with exit 2 naming what changed, and `output.overwrite` replaces the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.destination import NOT_DEFINING, RUN_RECORD, changes, defining_fields
from tests.trainer.conftest import DATA, LIBRARY_WARNINGS, base_config, run_in_process, slice_jsonl

pytestmark = [*(pytest.mark.filterwarnings(w) for w in LIBRARY_WARNINGS)]


def _config(**sections: object) -> TrainerConfig:
    return TrainerConfig.model_validate(base_config("/models/m", "/data/train.jsonl", "s3://bucket/run/", **sections))


def test_what_defines_a_run_leaves_out_where_and_how_often() -> None:
    fields = defining_fields(_config())
    assert fields["training.learningRate"] == 0.01 and fields["method.lora.r"] == 16
    assert fields["model.source"] == "/models/m" and fields["dataset.maxLength"] == 128
    assert not [path for path in fields if any(path.startswith(left_out) for left_out in NOT_DEFINING)]
    same = defining_fields(
        _config(
            output={"destination": "s3://bucket/other/", "overwrite": True},
            storage={"endpoint": "http://127.0.0.1:9000"},
            training={"checkpointEverySteps": 50, "maxSteps": 99, "logEverySteps": 7},
        )
    )
    assert same == fields
    other = defining_fields(
        _config(
            training={"learningRate": 0.002}, method={"type": "lora", "lora": {"r": 8, "alpha": 32, "dropout": 0.0}}
        )
    )
    assert [str(c) for c in changes(fields, other)] == [
        "method.lora.r: 16 -> 8",
        'method.type: "qlora" -> "lora"',
        "training.learningRate: 0.01 -> 0.002",
    ]


@pytest.fixture
def train(tmp_path: Path) -> Path:
    return slice_jsonl(DATA / "support-instructions.jsonl", tmp_path / "train.jsonl", 24)


slow = pytest.mark.slow


def _run(tmp_path: Path, model: Path, train: Path, destination: Path, name: str, **sections: object):
    training = {"maxSteps": 4, "checkpointEverySteps": 2, "evalEverySteps": 100, **sections.pop("training", {})}
    cfg = base_config(str(model), str(train), str(destination), training=training, **sections)
    return run_in_process(cfg, tmp_path, name)


@slow
def test_a_finished_destination_reused_with_a_new_learning_rate_is_refused(
    tmp_path: Path, tiny_model_dir: Path, train: Path
) -> None:
    destination = tmp_path / "out"
    first = _run(tmp_path, tiny_model_dir, train, destination, "first")
    assert first.code == 0, first.termination
    assert json.loads((destination / RUN_RECORD).read_text())["fields"]["training.learningRate"] == 0.01
    metrics = (destination / "metrics.json").read_text()

    again = _run(tmp_path, tiny_model_dir, train, destination, "again")  # the same run: reported as finished
    assert again.code == 0 and again.termination["result"] == first.termination["result"]

    changed = _run(tmp_path, tiny_model_dir, train, destination, "changed", training={"learningRate": 0.005})
    assert changed.code == 2, changed.termination
    error = changed.termination["error"]
    assert error["reason"] == "DestinationHoldsAnotherRun" and error["field"] == "output.destination"
    assert "training.learningRate: 0.01 -> 0.005" in error["message"]
    assert "new output.destination" in error["message"] and "output.overwrite: true" in error["message"]
    assert "result" not in changed.termination or not changed.termination["result"]  # never the old numbers
    assert (destination / "metrics.json").read_text() == metrics  # and nothing of the old run touched


@slow
def test_a_checkpoint_of_another_lora_rank_is_refused_not_crashed_on_and_overwrite_replaces_it(
    tmp_path: Path, tiny_model_dir: Path, train: Path
) -> None:
    destination = tmp_path / "out"
    first = _run(tmp_path, tiny_model_dir, train, destination, "first")
    assert first.code == 0, first.termination
    for entry in destination.iterdir():  # a kill during the final upload: checkpoints and the record remain
        if entry.name not in ("checkpoints", RUN_RECORD):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    rank8 = {"type": "qlora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    refused = _run(tmp_path, tiny_model_dir, train, destination, "rank8", method=rank8)
    assert refused.code == 2, refused.termination  # was exit 1 (state_dict size mismatch), retried by the Job
    assert "method.lora.r: 16 -> 8" in refused.termination["error"]["message"]

    replaced = _run(
        tmp_path,
        tiny_model_dir,
        train,
        destination,
        "overwrite",
        method=rank8,
        output={"destination": str(destination), "overwrite": True},
    )
    assert replaced.code == 0, replaced.termination
    assert json.loads((destination / "adapter" / "adapter_config.json").read_text())["r"] == 8
    metrics = json.loads((destination / "metrics.json").read_text())
    assert metrics["resumed_from_step"] is None and metrics["steps"] == 4  # trained afresh, not resumed
    assert json.loads((destination / RUN_RECORD).read_text())["fields"]["method.lora.r"] == 8

    # overwrite never deletes the run's own work: the same spec again reports the finished run.
    same = _run(
        tmp_path,
        tiny_model_dir,
        train,
        destination,
        "same",
        method=rank8,
        output={"destination": str(destination), "overwrite": True},
    )
    assert same.code == 0 and same.termination["result"] == replaced.termination["result"]
