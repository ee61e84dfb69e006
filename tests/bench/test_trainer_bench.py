"""The trainer bench's contenders still run: seed recipe and TRL baseline on a tiny workload, then the
common evaluator on their adapters. Numbers are not checked - only that the bench code has not rotted."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")

from bench.trainer import evaluate, seed_recipe, trl_baseline
from bench.trainer import workload as wl

pytestmark = [
    pytest.mark.slow,
    # transformers/PEFT internals, TRL's SFTConfig and kubetune's trainer still use the gradient_checkpointing
    # names that transformers 5 deprecated for activation_checkpointing.
    pytest.mark.filterwarnings(r"ignore:`(is_)?gradient_checkpointing\w*` is deprecated:FutureWarning"),
]


def test_seed_and_trl_contenders_train_and_evaluate(tmp_path):
    workload = wl.prepare(tmp_path / "work", wl.SMOKE_MODEL, wl.SMOKE_DATA)
    train_file = str(workload.train_subset(8))

    seed = seed_recipe.train(str(workload.model_dir), train_file, str(tmp_path / "seed"))
    trl = trl_baseline.train(str(workload.model_dir), train_file, str(tmp_path / "trl"), packing=True)

    assert seed["examples"] == trl["examples"] == 8
    assert seed["processed_tokens"] == 8 * wl.MAX_LENGTH > seed["real_tokens"] > 0
    assert trl["real_tokens"] > 0 and trl["sequences"] < 8  # packed
    jobs = [{"adapter": r["adapter"], "quantization": r["quantization"]} for r in (seed, trl)]
    scored = evaluate.evaluate(str(workload.model_dir), str(workload.eval_file), jobs)
    assert all(math.isfinite(s["eval_loss"]) and s["eval_tokens"] > 0 for s in scored)
