"""objective dpo in the config models and in `kubetune run`'s progress line (no torch needed)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_cli.local import progress_line
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.contract import Progress


def dpo(settings: dict[str, Any] | None = None, max_length: int = 2048) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": {"source": "/models/base"},
            "dataset": {"train": "/data/prefs.jsonl", "format": "preference", "maxLength": max_length},
            "objective": {"type": "dpo", **({"dpo": settings} if settings is not None else {})},
            "output": {"destination": "/out"},
        }
    )


def test_dpo_defaults_are_the_papers() -> None:
    spec = dpo().objective.effective_dpo()
    assert spec is not None
    assert (spec.beta, spec.loss, spec.sft_weight, spec.reference_model) == (0.1, "sigmoid", 0.0, None)
    assert spec.effective_label_smoothing() == 0.0
    assert spec.effective_max_prompt_length(2048) == 1024  # half of dataset.maxLength when unset


@pytest.mark.parametrize(("loss", "smoothing"), [("robust", 0.1), ("exo_pair", 1e-3), ("ipo", 0.0)])
def test_label_smoothing_defaults_per_loss(loss: str, smoothing: float) -> None:
    spec = dpo({"loss": loss}).objective.effective_dpo()
    assert spec is not None and spec.effective_label_smoothing() == smoothing


def test_sft_has_no_dpo_settings() -> None:
    cfg = TrainerConfig.model_validate(
        {"model": {"source": "/m"}, "dataset": {"train": "/d.jsonl"}, "output": {"destination": "/o"}}
    )
    assert cfg.objective.type == "sft" and cfg.objective.effective_dpo() is None
    assert "dpo" not in cfg.trainer_json()["objective"]


def test_progress_line_shows_the_rewards_of_a_dpo_run() -> None:
    line = progress_line(
        Progress(stage="train", step=3, total_steps=10, train_loss=0.5, reward_accuracy=0.75, reward_margin=0.4)
    )
    assert "reward acc 0.75 margin 0.400" in line
    assert "reward" not in progress_line(Progress(stage="train", step=3, total_steps=10, train_loss=0.5))
