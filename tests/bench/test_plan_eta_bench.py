"""The plan-ETA bench still runs: on the tiny model, one case's plan is made for this CPU and the same config is
trained and timed for the steps the plan counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.trainer import plan_eta

pytestmark = [pytest.mark.filterwarnings(r"ignore:`(is_)?gradient_checkpointing\w*` is deprecated:FutureWarning")]


def test_one_case_is_planned_trained_and_timed(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = plan_eta.measure("qlora-defaults", 2, tiny_model_dir, tmp_path)
    assert result["steps"] == 2 and result["trained_tokens"] > 0
    assert result["cpu"]["gemm_flops"] > 1e9 and result["cpu"]["dtype"] in ("bf16", "fp32")
    low, high = result["plan_seconds"]
    assert 0 < low < high and result["measured_seconds"] > 0
    assert result["within"] == (low <= result["measured_seconds"] <= high)
    assert 0 < result["implied_utilisation"] < 1
