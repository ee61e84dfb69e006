"""`kubetune run examples/dpo.yaml --max-steps N` end to end: the example as shipped, on S3 and on local files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubetune_trainer.contract import EXIT_OK
from tests.e2e.test_local import ROOT, kubetune, status_of, write_job
from tests.support.s3 import S3Endpoint
from tests.unit.test_status_schema import STATUS_SCHEMA

EXAMPLE = ROOT / "examples" / "dpo.yaml"
PREFERENCES = ROOT / "examples" / "data" / "preferences.jsonl"

pytestmark = pytest.mark.slow


def _s3_parts(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _check_dpo_result(status: dict[str, Any], metrics: dict[str, Any], steps: int) -> None:
    assert status["phase"] == "Succeeded", status
    jsonschema.validate(status, STATUS_SCHEMA)  # the reward fields are ones the CRD declares
    assert status["result"]["steps"] == steps
    assert 0 <= status["result"]["rewardAccuracy"] <= 1 and "rewardMargin" in status["result"]
    assert metrics["objective"] == "dpo" and metrics["dpo"]["beta"] == 0.1
    assert metrics["reward_history"][0]["step"] == 1  # logged at the first step, then every logEverySteps
    assert metrics["eval_reward_history"], metrics  # evalSplit 0.1 of the 40 pairs
    assert metrics["train_examples"] + metrics["eval_examples"] == 40


def test_dpo_example_from_s3_as_shipped(tmp_path: Path, s3_moto: S3Endpoint, tiny_model_dir: Path) -> None:
    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
    model_bucket, model_prefix = _s3_parts(spec["model"]["source"])
    data_bucket, data_key = _s3_parts(spec["dataset"]["train"])
    out_bucket, out_prefix = _s3_parts(spec["output"]["destination"])
    for bucket in {model_bucket, data_bucket, out_bucket}:
        s3_moto.make_bucket(bucket)
    s3_moto.upload_dir(tiny_model_dir, model_bucket, model_prefix.rstrip("/"))
    s3_moto.client().upload_file(str(PREFERENCES), data_bucket, data_key)
    result = kubetune(
        "run",
        str(EXAMPLE),
        "--workdir",
        str(tmp_path / "work"),
        "--max-steps",
        "3",
        "--s3-endpoint",
        s3_moto.url,
        env=s3_moto.env(),
    )
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    metrics = json.loads(s3_moto.read(out_bucket, out_prefix + "metrics.json"))
    _check_dpo_result(status_of(result.stdout), metrics, 3)
    keys = s3_moto.list_keys(out_bucket, out_prefix)
    for name in ("adapter/adapter_model.safetensors", "README.md", "samples.jsonl", "COMPLETE"):
        assert out_prefix + name in keys, keys
    assert "objective: dpo" in s3_moto.read(out_bucket, out_prefix + "README.md").decode()


def test_dpo_example_on_local_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    job = yaml.safe_load(EXAMPLE.read_text())
    spec = job["spec"]
    spec["model"]["source"] = str(tiny_model_dir)
    spec["dataset"]["train"] = f"file://{PREFERENCES}"
    spec["output"]["destination"] = str(tmp_path / "out")
    del spec["storage"]
    result = kubetune(
        "run", str(write_job(tmp_path / "dpo.yaml", job)), "--workdir", str(tmp_path / "work"), "--max-steps", "2"
    )
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    _check_dpo_result(status_of(result.stdout), metrics, 2)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
