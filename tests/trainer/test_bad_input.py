"""Bad input ends a run at once with exit 2 (or 1 for an unreachable endpoint) and a TrainerError naming it."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.s3 import S3Endpoint, free_port
from tests.trainer.conftest import DATA, LIBRARY_WARNINGS, base_config, run_in_process, slice_jsonl, storage_section

pytestmark = [*(pytest.mark.filterwarnings(w) for w in LIBRARY_WARNINGS)]


def write_rows(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "How do I export logs?", "response": "Open Help > Export logs."}


def local_run(tmp_path: Path, model: Path, train: str, **sections: Any):
    cfg = base_config(str(model), train, str(tmp_path / "out"), **sections)
    return run_in_process(cfg, tmp_path)


def assert_invalid(result, reason: str, *fragments: str) -> dict:
    assert result.code == 2, result.termination
    error = result.termination["error"]
    assert error["reason"] == reason, error
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ({"prompt": "hi"}, "missing field 'response'"),
        ({"prompt": "hi", "response": 42}, "'response' must be a str, got int"),
        ({"prompt": "hi", "response": ["a", "b"]}, "'response' must be a str, got list"),
    ],
    ids=["missing-field", "number", "list"],
)
def test_bad_row_names_file_and_line(tmp_path: Path, tiny_model_dir: Path, row: dict, fragment: str) -> None:
    train = write_rows(tmp_path / "train.jsonl", [GOOD, GOOD, row, GOOD])
    error = assert_invalid(local_run(tmp_path, tiny_model_dir, train), "InvalidDataset", fragment, f"{train}:3")
    assert error["file"] == train and error["line"] == 3


def test_empty_dataset(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "train.jsonl").write_text("\n")
    assert_invalid(local_run(tmp_path, tiny_model_dir, str(tmp_path / "train.jsonl")), "EmptyDataset", "no rows")


def test_every_example_truncated_to_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    train = write_rows(tmp_path / "train.jsonl", [GOOD] * 4)
    result = local_run(
        tmp_path,
        tiny_model_dir,
        train,
        dataset={"maxLength": 16, "template": "### Instruction:\n{prompt}\n" * 3 + "{response}"},
    )
    assert_invalid(result, "InvalidDataset", "truncated to nothing", "maxLength 16")


def test_missing_local_dataset(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert_invalid(local_run(tmp_path, tiny_model_dir, str(tmp_path / "nope.jsonl")), "ObjectNotFound", "nope.jsonl")


def test_model_dir_without_config_json(tmp_path: Path, tiny_model_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "config.json").unlink()
    train = write_rows(tmp_path / "train.jsonl", [GOOD] * 4)
    assert_invalid(local_run(tmp_path, model, train), "InvalidModel", "no config.json")


def test_unknown_target_module_lists_the_real_ones(tmp_path: Path, tiny_model_dir: Path) -> None:
    train = write_rows(tmp_path / "train.jsonl", [GOOD] * 4)
    result = local_run(tmp_path, tiny_model_dir, train, method={"type": "lora", "lora": {"targetModules": ["qkv"]}})
    assert_invalid(result, "UnknownTargetModule", "['qkv']", "q_proj", "down_proj")
    assert "lm_head" not in result.termination["error"]["message"]


def test_qlora_without_bitsandbytes(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what a platform without bitsandbytes looks like
    train = write_rows(tmp_path / "train.jsonl", [GOOD] * 4)
    assert_invalid(local_run(tmp_path, tiny_model_dir, train), "QuantizationUnavailable", "bitsandbytes", "lora")


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    from kubetune_trainer.__main__ import main

    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "model": {"source": "s3://models/x/"},
                "dataset": {"train": "s3://data/t.jsonl", "maxLength": 1},
                "output": {"destination": "s3://out/run"},
            }
        )
    )
    termination = tmp_path / "termination.json"
    assert main(["--config", str(config), "--termination-log", str(termination)]) == 2
    error = json.loads(termination.read_text())["error"]
    assert error["reason"] == "InvalidConfig" and error["field"] == "dataset.maxLength", error
    assert len(termination.read_bytes()) < 4096


def test_bad_config_is_worded_as_the_api_words_a_bad_spec(tmp_path: Path) -> None:
    """The trainer's config errors read as `kubetune validate` and the operator's do (`path: message`)."""
    from kubetune_trainer.__main__ import load_config
    from kubetune_trainer.errors import InvalidInput

    config = tmp_path / "config.json"
    spec = {"model": {"source": "s3://models/x/"}, "dataset": {"train": "s3://data/t.jsonl", "maxLenght": 512},
            "output": {"destination": "s3://out/run"}}  # fmt: skip
    config.write_text(json.dumps(spec))
    with pytest.raises(InvalidInput) as raised:
        load_config(str(config))
    assert raised.value.error.field == "dataset.maxLenght"
    assert raised.value.error.message == f"{config}: dataset.maxLenght: unknown field"


@pytest.fixture
def s3_model(s3_moto: S3Endpoint, s3_bucket_name: str, tiny_model_s3: str, tmp_path: Path, s3_credentials: Any):
    s3_credentials(s3_moto)
    train = slice_jsonl(DATA / "support-instructions.jsonl", tmp_path / "train.jsonl", 8)
    s3_moto.client().upload_file(str(train), s3_bucket_name, "data/train.jsonl")
    return s3_bucket_name, tiny_model_s3


def s3_run(endpoint: S3Endpoint, tmp_path: Path, model: str, train: str, destination: str):
    cfg = base_config(model, train, destination, storage=storage_section(endpoint))
    return run_in_process(cfg, tmp_path)


def test_missing_s3_dataset_object(s3_moto: S3Endpoint, s3_model, tmp_path: Path) -> None:
    bucket, model = s3_model
    result = s3_run(s3_moto, tmp_path, model, f"s3://{bucket}/data/missing.jsonl", f"s3://{bucket}/out")
    assert_invalid(result, "ObjectNotFound", f"s3://{bucket}/data/missing.jsonl")


def test_missing_s3_model(s3_moto: S3Endpoint, s3_model, tmp_path: Path) -> None:
    bucket, _ = s3_model
    result = s3_run(
        s3_moto, tmp_path, f"s3://{bucket}/models/absent/", f"s3://{bucket}/data/train.jsonl", f"s3://{bucket}/out"
    )
    assert_invalid(result, "ObjectNotFound", "models/absent")


def test_missing_bucket(s3_moto: S3Endpoint, s3_model, tmp_path: Path) -> None:
    bucket, model = s3_model
    result = s3_run(s3_moto, tmp_path, model, f"s3://{bucket}/data/train.jsonl", "s3://no-such-bucket-kt/out")
    assert_invalid(result, "BucketNotFound", "no-such-bucket-kt")


def test_wrong_credentials_on_seaweedfs(
    s3_seaweed: S3Endpoint, s3_bucket_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_seaweed.make_bucket(s3_bucket_name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    started = time.monotonic()
    result = s3_run(s3_seaweed, tmp_path, f"s3://{bucket}/m/", f"s3://{bucket}/t.jsonl", f"s3://{bucket}/out")
    assert_invalid(result, "AccessDenied", "SignatureDoesNotMatch", "credentials")
    assert time.monotonic() - started < 10  # not retried


def test_unreachable_endpoint_fails_fast_and_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    url = f"http://127.0.0.1:{free_port()}"
    cfg = base_config("s3://models/m/", "s3://data/t.jsonl", "s3://out/run", storage={"endpoint": url})
    started = time.monotonic()
    result = run_in_process(cfg, tmp_path)
    assert result.code == 1
    assert result.termination["error"]["reason"] == "StorageUnreachable"
    assert url in result.termination["error"]["message"]
    assert time.monotonic() - started < 15


def test_a_model_larger_than_the_pods_disk_is_refused_before_its_download(
    s3_moto: S3Endpoint, s3_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Downloading it would get the pod evicted at spec.resources.disk, and an eviction is a disruption that the
    Job retries without end: exit 2 instead (FailJob), naming the field to raise."""
    from kubetune_trainer.contract import DISK_BYTES_ENV

    bucket, model = s3_model
    monkeypatch.setenv(DISK_BYTES_ENV, "4096")  # the tiny model is about 1 MB
    result = s3_run(s3_moto, tmp_path, model, f"s3://{bucket}/data/train.jsonl", f"s3://{bucket}/out")
    error = assert_invalid(result, "DiskTooSmall", model, "spec.resources.disk")
    assert not (tmp_path / "work" / "model").exists()
    monkeypatch.setenv(DISK_BYTES_ENV, str(50 * 1024**3))
    assert s3_run(s3_moto, tmp_path, model, f"s3://{bucket}/data/train.jsonl", f"s3://{bucket}/out2").code == 0, error
