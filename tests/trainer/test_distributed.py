"""Two processes under torchrun (gloo on CPU): real DDP, preemption and resume, one set of artifacts, and
rank 0's exit code through the launcher."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.support.s3 import S3Endpoint
from tests.trainer.conftest import S3Run, TrainerProcess, base_config, s3_env

pytestmark = pytest.mark.slow


STEPS = 200


def test_launch_command() -> None:
    from kubetune_trainer.contract import launch_command

    assert launch_command(1) == [
        "python", "-m", "kubetune_trainer", "--config", "/etc/kubetune/config.json",
        "--termination-log", "/dev/termination-log",
    ]  # fmt: skip
    assert launch_command(4)[-2:] == ["--nproc-per-node", "4"]


def test_torchrun_two_processes_preempt_resume_and_write_one_set_of_artifacts(
    s3_moto: S3Endpoint, s3_run: S3Run, tmp_path: Path
) -> None:
    bucket = s3_run.bucket
    cfg = s3_run.config(
        "ddp",
        rows=40,
        method={"type": "lora", "lora": {"r": 8, "alpha": 16}},
        # Long enough that the SIGTERM lands mid-run: a step of the tiny model takes ~15 ms, and 10 steps once
        # ended between two polls of wait_for_step, before the signal was sent.
        training={"maxSteps": STEPS, "checkpointEverySteps": 1000, "evalEverySteps": 5, "logEverySteps": 1},
    )
    env = {**s3_env(s3_moto), "OMP_NUM_THREADS": "1"}

    # SIGTERM reaches the launcher, torchrun passes it to both workers; they agree on the step to stop at.
    first = TrainerProcess(cfg, tmp_path, "first", env, args=["--nproc-per-node", "2"])
    try:
        first.wait_for_step(2, timeout=180)
        first.process.send_signal(signal.SIGTERM)
        code = first.wait(timeout=40)
    finally:
        first.kill()
    assert code == 3, first.log()[-4000:]
    step = first.result()["checkpoint"]["step"]
    keys = s3_moto.list_keys(bucket, "ddp/")
    assert {f"ddp/checkpoints/step-{step}/rng_state_{rank}.pth" for rank in (0, 1)} <= set(keys)
    assert f"ddp/checkpoints/step-{step}/COMPLETE" in keys

    second = TrainerProcess(cfg, tmp_path, "second", env, args=["--nproc-per-node", "2"])
    try:
        code = second.wait(timeout=300)
    finally:
        second.kill()
    log = second.log()
    assert code == 0, log[-4000:]
    assert second.result()["outcome"] == "succeeded"
    keys = s3_moto.list_keys(bucket, "ddp/")
    assert keys.count("ddp/adapter/adapter_model.safetensors") == 1
    assert keys.count("ddp/COMPLETE") == 1
    metrics = json.loads(s3_moto.read(bucket, "ddp/metrics.json"))
    assert metrics["world_size"] == 2 and metrics["steps"] == STEPS and metrics["resumed_from_step"] == step
    assert log.count("artifacts written to") == 1  # rank 0 only


def test_invalid_input_on_two_processes_reaches_the_pod_as_exit_2(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The multi-GPU pod's command (the launcher, `--nproc-per-node 2`): torchrun alone would turn the
    workers' exit 2 into 1, and the Job's podFailurePolicy would retry invalid input."""
    from kubetune_trainer.contract import launch_command

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no response here"}\n')
    cfg = base_config(str(tiny_model_dir), str(bad), str(tmp_path / "out"))
    args = launch_command(2, "CONFIG", "TERMINATION")
    node = TrainerProcess(cfg, tmp_path, "bad", {"OMP_NUM_THREADS": "1"}, args=args[args.index("TERMINATION") + 1 :])
    try:
        assert node.wait(timeout=240) == 2, node.log()[-3000:]
    finally:
        node.kill()
    assert node.result()["error"]["reason"] == "InvalidDataset"
