"""Two processes under torchrun (gloo on CPU): real DDP, one set of artifacts, rank 0's exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.s3 import S3Endpoint
from tests.trainer.conftest import DATA, TrainerProcess, base_config, s3_env, slice_jsonl, storage_section

pytestmark = pytest.mark.slow


def test_launch_command() -> None:
    from kubetune_trainer.__main__ import launch_command

    assert launch_command(1) == [
        "python", "-m", "kubetune_trainer", "--config", "/etc/kubetune/config.json",
        "--termination-log", "/dev/termination-log",
    ]  # fmt: skip
    assert launch_command(4)[-2:] == ["--nproc-per-node", "4"]


def test_torchrun_two_processes_write_one_set_of_artifacts(
    s3_moto: S3Endpoint, s3_bucket_name: str, tiny_model_s3: str, tmp_path: Path
) -> None:
    bucket = s3_bucket_name
    train = slice_jsonl(DATA / "support-instructions.jsonl", tmp_path / "train.jsonl", 40)
    s3_moto.client().upload_file(str(train), bucket, "data/train.jsonl")
    cfg = base_config(
        tiny_model_s3,
        f"s3://{bucket}/data/train.jsonl",
        f"s3://{bucket}/ddp",
        method={"type": "lora", "lora": {"r": 8, "alpha": 16}},
        training={"maxSteps": 6, "checkpointEverySteps": 3, "evalEverySteps": 3, "logEverySteps": 2},
        storage=storage_section(s3_moto),
    )
    env = {**s3_env(s3_moto), "OMP_NUM_THREADS": "1"}
    trainer = TrainerProcess(cfg, tmp_path, "ddp", env, args=["--nproc-per-node", "2"])
    try:
        code = trainer.wait(timeout=300)
    finally:
        trainer.kill()
    log = trainer.log()
    assert code == 0, log[-4000:]
    assert trainer.result()["outcome"] == "succeeded"
    keys = s3_moto.list_keys(bucket, "ddp/")
    assert keys.count("ddp/adapter/adapter_model.safetensors") == 1
    assert keys.count("ddp/COMPLETE") == 1
    assert sum(k.endswith("/COMPLETE") and "/checkpoints/" in k for k in keys) == 2  # steps 3 and 6
    assert "ddp/checkpoints/step-6/rng_state_1.pth" in keys  # every rank's RNG state is in the checkpoint
    metrics = json.loads(s3_moto.read(bucket, "ddp/metrics.json"))
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    assert log.count("artifacts written to") == 1  # rank 0 only
