"""bench/gpu/run.py cannot be run here (no GPU); its --dry-run path runs every stage on a tiny model on CPU."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("bitsandbytes")

from bench.gpu import run as gpu_bench

pytestmark = [
    pytest.mark.slow,
    # transformers/PEFT internals, TRL's SFTConfig and kubetune's trainer still use the gradient_checkpointing
    # names that transformers 5 deprecated for activation_checkpointing.
    pytest.mark.filterwarnings(r"ignore:`(is_)?gradient_checkpointing\w*` is deprecated:FutureWarning"),
]


def test_dry_run_writes_the_report(tmp_path):
    assert gpu_bench.main(["--out", str(tmp_path), "--dry-run"]) == 0
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report["dry_run"] is True
    assert report["bitsandbytes_check"]["relative_error"] < 0.15
    distributed = report["distributed_check"]  # gloo on a CPU; NCCL where the machine has two GPUs
    assert distributed["ok"] is True and distributed["backend"] == "gloo" and distributed["world_size"] == 2
    assert report["kubetune"]["optimizer_steps"] == 2 and report["kubetune"]["real_tokens"] > 0
    assert report["seed"]["real_tokens"] > 0 and report["ratio_kubetune_vs_seed"] > 0
    # `kubetune plan`'s estimate of the run's memory is recorded (on a GPU, beside the measured peak).
    planned = report["kubetune"]["plan"]
    assert planned["estimated_peak_bytes"] > 0 and planned["planned_steps"] == 2
    assert planned["measured_peak_bytes"] is None and planned["error"] is None  # the CPU has no GPU peak


def test_peak_table_matches_device_names():
    assert gpu_bench.peak_flops("NVIDIA H200") == 989e12
    assert gpu_bench.peak_flops("NVIDIA H100 80GB HBM3") == 756e12 or gpu_bench.peak_flops("NVIDIA H100 SXM") == 989e12
    assert gpu_bench.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_bench.peak_flops("Unknown GPU") is None
