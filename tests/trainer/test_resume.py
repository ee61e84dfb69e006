"""SIGTERM mid-training checkpoints and exits 3; the rerun resumes from that step and finishes.
Subprocesses, as in a pod: the signal handler, /progress and exit codes are the real ones."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.support.s3 import S3Endpoint
from tests.trainer.conftest import S3Run, TrainerProcess, s3_env

pytestmark = pytest.mark.slow


def test_sigterm_checkpoints_then_rerun_resumes(s3_moto: S3Endpoint, s3_run: S3Run, tmp_path: Path) -> None:
    bucket = s3_run.bucket
    cfg = s3_run.config(
        "run",
        rows=60,
        # No periodic checkpoint before the signal: the one found later is the SIGTERM one.
        training={"maxSteps": 16, "checkpointEverySteps": 1000, "evalEverySteps": 1000, "logEverySteps": 2},
    )
    env = s3_env(s3_moto)
    first = TrainerProcess(cfg, tmp_path, "first", env)
    try:
        progress = first.wait_for_step(3, timeout=120)
        assert progress["totalSteps"] == 16
        signalled = time.monotonic()
        first.process.send_signal(signal.SIGTERM)
        code = first.wait(timeout=30)
        stop_seconds = time.monotonic() - signalled
    finally:
        first.kill()
    assert code == 3, first.log()[-3000:]
    message = first.result()
    assert message["outcome"] == "preempted"
    step = message["checkpoint"]["step"]
    assert step >= 3
    assert message["checkpoint"]["uri"] == f"s3://{bucket}/run/checkpoints/step-{step}/"
    keys = s3_moto.list_keys(bucket, "run/")
    assert f"run/checkpoints/step-{step}/COMPLETE" in keys
    assert f"run/checkpoints/step-{step}/adapter_model.safetensors" in keys
    assert f"run/checkpoints/step-{step}/optimizer.pt" in keys
    assert "run/COMPLETE" not in keys
    print(f"SIGTERM to exit: {stop_seconds:.1f} s")
    assert stop_seconds < 20

    second = TrainerProcess(cfg, tmp_path, "second", env)
    try:
        assert second.wait(timeout=240) == 0, second.log()[-3000:]
    finally:
        second.kill()
    assert f"resuming from step {step}" in second.log()
    metrics = json.loads(s3_moto.read(bucket, "run/metrics.json"))
    assert metrics["resumed_from_step"] == step
    assert metrics["steps"] == 16
    logged = [entry["step"] for entry in metrics["loss_history"]]
    assert logged[0] <= step < logged[-1] == 16  # history carries on across the restart
    assert "train step 1/16" not in second.log()  # it did not start over
    assert "run/COMPLETE" in s3_moto.list_keys(bucket, "run/")
