"""The memory bench still runs and attributes what a step keeps: on the tiny model, one packed row's saved
tensors are broken down by kind, and with the fused loss (the default) the loss keeps no logits."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.trainer import memory

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`(is_)?gradient_checkpointing\w*` is deprecated:FutureWarning"),
]


def test_one_step_is_broken_down_by_kind(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = memory.measure(256, {}, model_dir=tiny_model_dir, work=tmp_path)
    saved = result["saved_for_backward_bytes"]
    assert 0 < result["label_positions"] <= result["tokens"] <= 256
    assert result["saved_for_backward_total_bytes"] == sum(saved.values()) > 0
    for kind in ("MLP", "attention", "RMSNorm", "LoRA"):
        assert any(name.startswith(kind) for name in saved), (kind, saved)
    loss = next(size for name, size in saved.items() if name.startswith("the causal LM's loss"))
    vocabulary_row = 4 * result["label_positions"] * 1000  # one fp32 logit per label position and token
    assert loss < vocabulary_row / 4 and result["logits_bytes"] == 0  # fused: no logits kept or returned
    assert "peak RSS" in memory.report("defaults", result)
