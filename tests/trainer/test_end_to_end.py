"""Real QLoRA/LoRA/full runs on the tiny model, S3 to S3: the loss falls and the artifacts are usable."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.s3 import S3Endpoint
from tests.trainer.conftest import (
    DATA,
    LIBRARY_WARNINGS,
    base_config,
    run_in_process,
    slice_jsonl,
    storage_section,
)

pytestmark = [pytest.mark.slow, *(pytest.mark.filterwarnings(w) for w in LIBRARY_WARNINGS)]

TRAIN_FILES = {
    "instruction": "support-instructions.jsonl",
    "chat": "support-chat.jsonl",
    "text": "support-instructions.jsonl",  # rendered below into {"text": ...} rows
}


def upload_data(endpoint: S3Endpoint, bucket: str, tmp_path: Path, fmt: str, rows: int = 60) -> str:
    local = slice_jsonl(DATA / TRAIN_FILES[fmt], tmp_path / "data" / f"{fmt}.jsonl", rows)
    if fmt == "text":
        records = [json.loads(line) for line in local.read_text().splitlines()]
        local.write_text("".join(json.dumps({"text": r["prompt"] + "\n" + r["response"]}) + "\n" for r in records))
    endpoint.client().upload_file(str(local), bucket, f"data/{fmt}.jsonl")
    return f"s3://{bucket}/data/{fmt}.jsonl"


def loss_fell(metrics: dict[str, Any]) -> tuple[float, float]:
    losses = [entry["loss"] for entry in metrics["loss_history"]]
    assert len(losses) >= 6, losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.05, f"loss did not fall: {losses}"
    return first, last


def check_artifacts(endpoint: S3Endpoint, bucket: str, prefix: str, *, adapter: bool, merged: bool) -> dict:
    keys = set(endpoint.list_keys(bucket, prefix))
    root = f"{prefix}/"
    expected = {"metrics.json", "README.md", "samples.jsonl", "COMPLETE"}
    expected |= {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json"}
    if not adapter:
        expected = {e for e in expected if not e.startswith("adapter/")} | {"model/config.json", "model/tokenizer.json"}
    if merged:
        expected |= {"merged/config.json", "merged/model.safetensors"}
    missing = {e for e in expected if root + e not in keys}
    assert not missing, f"missing {missing} in {sorted(keys)}"
    complete = json.loads(endpoint.read(bucket, root + "COMPLETE"))
    assert complete["result"]["steps"] > 0
    checkpoints = {k.split("/")[2] for k in keys if k.startswith(root + "checkpoints/")}
    assert 1 <= len(checkpoints) <= 2, checkpoints  # checkpointsToKeep
    return json.loads(endpoint.read(bucket, root + "metrics.json"))


def reload_and_generate(endpoint: S3Endpoint, bucket: str, prefix: str, base_dir: Path, tmp_path: Path) -> str:
    """The adapter loads with PeftModel.from_pretrained on the base (what users and vLLM do) and generates."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = tmp_path / "reloaded"
    local.mkdir()
    client = endpoint.client()
    for key in endpoint.list_keys(bucket, f"{prefix}/adapter/"):
        client.download_file(bucket, key, str(local / key.rsplit("/", 1)[-1]))
    with safe_open(str(local / "adapter_model.safetensors"), "pt") as tensors:
        names = list(tensors.keys())
    assert names and all("lora_" in n for n in names), [n for n in names if "lora_" not in n]  # no embed/head
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    inputs = tokenizer("### Instruction:\nQS-401?\n\n### Response:\n", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    return tokenizer.decode(out[0])


def test_qlora_4bit_against_seaweedfs_with_credentials(
    s3_seaweed: S3Endpoint, s3_bucket_name: str, tiny_model_dir: Path, tmp_path: Path, s3_credentials: Any
) -> None:
    s3_credentials(s3_seaweed)
    bucket = s3_seaweed.make_bucket(s3_bucket_name)
    s3_seaweed.upload_dir(tiny_model_dir, bucket, "models/tiny")
    train = upload_data(s3_seaweed, bucket, tmp_path, "instruction")
    cfg = base_config(
        f"s3://{bucket}/models/tiny/",
        train,
        f"s3://{bucket}/runs/qlora",
        storage=storage_section(s3_seaweed),
        evaluation={"prompts": ["My page shows QS-401", "How do I export logs?"], "maxNewTokens": 12},
        output={"destination": f"s3://{bucket}/runs/qlora", "mergeAdapter": True},
    )
    result = run_in_process(cfg, tmp_path)
    assert result.code == 0, result.termination
    assert result.termination["outcome"] == "succeeded"
    assert result.termination["artifacts"]["adapter"] == f"s3://{bucket}/runs/qlora/adapter/"
    metrics = check_artifacts(s3_seaweed, bucket, "runs/qlora", adapter=True, merged=True)
    loss_fell(metrics)
    assert metrics["eval_loss"] is not None and metrics["perplexity"] > 1
    samples = [json.loads(line) for line in s3_seaweed.read(bucket, "runs/qlora/samples.jsonl").splitlines()]
    assert [s["prompt"] for s in samples] == cfg["evaluation"]["prompts"]
    card = s3_seaweed.read(bucket, "runs/qlora/README.md").decode()
    assert "qlora" in card and "4-bit nf4" in card and "eval loss" in card
    reload_and_generate(s3_seaweed, bucket, "runs/qlora", tiny_model_dir, tmp_path)

    # The same destination again: the run is done, so nothing trains and the result is reported again.
    started = time.monotonic()
    again = run_in_process(cfg, tmp_path, name="again")
    assert again.code == 0
    assert again.termination["result"] == result.termination["result"]
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("method", "lr"),
    [
        ({"type": "qlora", "quantization": {"bits": 8}, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}, 0.01),
        (
            {
                "type": "lora",
                "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["q_proj", "v_proj", "down_proj"]},
            },
            0.01,
        ),
        ({"type": "full"}, 0.003),
    ],
    ids=["qlora8", "lora", "full"],
)
def test_methods(
    method: dict,
    lr: float,
    s3_moto: S3Endpoint,
    s3_bucket_name: str,
    tiny_model_s3: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    s3_credentials: Any,
) -> None:
    s3_credentials(s3_moto)
    bucket = s3_bucket_name  # tiny_model_s3 created it
    train = upload_data(s3_moto, bucket, tmp_path, "instruction")
    destination = f"s3://{bucket}/runs/{method['type']}"
    cfg = base_config(
        tiny_model_s3,
        train,
        destination,
        method=method,
        training={"learningRate": lr},
        storage=storage_section(s3_moto),
        evaluation={"prompts": ["QS-401?"], "maxNewTokens": 6},
    )
    result = run_in_process(cfg, tmp_path)
    assert result.code == 0, result.termination
    full = method["type"] == "full"
    artifacts = result.termination["artifacts"]
    assert artifacts.get("merged") == (f"{destination}/model/" if full else None), artifacts
    metrics = check_artifacts(s3_moto, bucket, f"runs/{method['type']}", adapter=not full, merged=False)
    loss_fell(metrics)
    if not full:
        reload_and_generate(s3_moto, bucket, f"runs/{method['type']}", tiny_model_dir, tmp_path)


@pytest.mark.parametrize("fmt", ["chat", "text"])
def test_formats(
    fmt: str,
    s3_moto: S3Endpoint,
    s3_bucket_name: str,
    tiny_model_s3: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    s3_credentials: Any,
) -> None:
    s3_credentials(s3_moto)
    bucket = s3_bucket_name
    train = upload_data(s3_moto, bucket, tmp_path, fmt)
    cfg = base_config(
        tiny_model_s3,
        train,
        f"s3://{bucket}/runs/{fmt}",
        dataset={"format": fmt},
        storage=storage_section(s3_moto),
        evaluation={"prompts": ["QS-401?"], "maxNewTokens": 6},
    )
    result = run_in_process(cfg, tmp_path)
    assert result.code == 0, result.termination
    metrics = check_artifacts(s3_moto, bucket, f"runs/{fmt}", adapter=True, merged=False)
    loss_fell(metrics)
    reload_and_generate(s3_moto, bucket, f"runs/{fmt}", tiny_model_dir, tmp_path)
