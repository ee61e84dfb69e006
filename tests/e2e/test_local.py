"""`kubetune run` and `kubetune demo` end to end: the real CLI, the real trainer, real S3 on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubetune_trainer.contract import EXIT_FAILED, EXIT_INVALID_INPUT, EXIT_OK, EXIT_PREEMPTED
from tests.support.s3 import S3Endpoint
from tests.support.wheel import PACKAGES, install_wheel
from tests.unit.test_status_schema import STATUS_SCHEMA

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "cli" / "kubetune_cli" / "data"


def kubetune(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def local_job(model: str, train: str, destination: str, **training: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "local-run"},
        "spec": {
            "model": {"source": model},
            "dataset": {"train": train, "maxLength": 128, "evalSplit": 0.1},
            "training": {"maxSteps": 8, "batchSize": 4, "gradientAccumulationSteps": 1, "learningRate": 1e-2}
            | training,
            "output": {"destination": destination},
            "resources": {"gpus": 0},
        },
    }


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def status_of(stdout: str) -> dict[str, Any]:
    block = stdout[stdout.index("status:") :]
    block = block.split("\nrun the same command", 1)[0].split("\ntrainer log:", 1)[0]
    return yaml.safe_load(block)["status"]


def test_run_with_local_paths(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    path = write_job(
        tmp_path / "job.yaml",
        # long enough (a second or more) for the CLI's progress polls to see training
        local_job(str(tiny_model_dir), f"file://{DATA}/support-instructions.jsonl", str(out), maxSteps=60),
    )
    result = kubetune("run", str(path), "--workdir", str(tmp_path / "work"))
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    status = status_of(result.stdout)
    assert status["phase"] == "Succeeded"
    assert status["reason"] == "Succeeded"  # as the operator writes it
    jsonschema.validate(status, STATUS_SCHEMA)  # every field is one the CRD declares
    assert status["result"]["steps"] == 60
    assert status["artifacts"]["adapter"] == f"{out}/adapter/"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "COMPLETE").exists()
    assert "stage: train" in result.stdout and re.search(r"step \d+/60", result.stdout)


def test_run_from_s3_to_s3_with_endpoint_override(tmp_path: Path, s3_moto: S3Endpoint, tiny_model_dir: Path) -> None:
    for bucket in ("models", "data", "out"):
        s3_moto.make_bucket(bucket)
    s3_moto.upload_dir(tiny_model_dir, "models", "tiny")
    s3_moto.client().upload_file(str(DATA / "support-instructions.jsonl"), "data", "train.jsonl")
    job = local_job("s3://models/tiny/", "s3://data/train.jsonl", "s3://out/run/")
    path = write_job(tmp_path / "job.yaml", job)
    result = kubetune(
        "run",
        str(path),
        "--workdir",
        str(tmp_path / "work"),
        "--max-steps",
        "4",
        "--s3-endpoint",
        s3_moto.url,
        env=s3_moto.env(),
    )
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert status_of(result.stdout)["result"]["steps"] == 4
    keys = s3_moto.list_keys("out", "run/")
    assert "run/adapter/adapter_model.safetensors" in keys and "run/COMPLETE" in keys


def _wait_for_step(process: subprocess.Popen[str], lines: list[str], step: int, timeout: float = 180) -> None:
    """Read the CLI's output until it names its progress URL, then poll that until `step` is done."""
    deadline = time.monotonic() + timeout
    url = None
    assert process.stdout is not None
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if match := re.search(r"progress: (http://\S+)", line):
            url = match.group(1)
    assert url, "".join(lines)
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if json.load(response).get("step", 0) >= step:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_ctrl_c_checkpoints_and_the_same_command_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    job = local_job(
        str(tiny_model_dir), str(DATA / "support-instructions.jsonl"), str(out), maxSteps=400, checkpointEverySteps=1000
    )
    path = write_job(tmp_path / "job.yaml", job)
    command = [sys.executable, "-m", "kubetune_cli.main", "run", str(path), "--workdir", str(tmp_path / "work")]
    # Started with SIGINT ignored, as a background job of a non-interactive shell (CI) is: Python then leaves
    # SIGINT ignored, and this test once saw the run go on to step 400.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    lines: list[str] = []
    try:
        _wait_for_step(process, lines, 5)
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rest, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    output = "".join(lines) + rest
    assert process.returncode == EXIT_PREEMPTED, output
    assert "press Ctrl-C again to stop without saving" in output  # the escape hatch is announced (issue 29.6)
    status = status_of(output)
    stopped_at = status["checkpoint"]["step"]
    assert status["phase"] == "Suspended" and stopped_at >= 5, status
    jsonschema.validate(status, STATUS_SCHEMA)
    assert "run the same command again to resume" in output
    assert (out / "checkpoints" / f"step-{stopped_at}" / "COMPLETE").exists()

    again = kubetune("run", str(path), "--workdir", str(tmp_path / "work"), "--max-steps", str(stopped_at + 3))
    assert again.returncode == EXIT_OK, again.stdout + again.stderr
    assert f"resuming from step {stopped_at}" in again.stdout, again.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == stopped_at
    assert status_of(again.stdout)["result"]["steps"] == stopped_at + 3


def _start_and_wait(tmp_path: Path, tiny_model_dir: Path) -> tuple[subprocess.Popen[str], list[str], Path]:
    out = tmp_path / "out"
    job = local_job(
        str(tiny_model_dir), str(DATA / "support-instructions.jsonl"), str(out), maxSteps=400, checkpointEverySteps=1000
    )
    path = write_job(tmp_path / "job.yaml", job)
    command = [sys.executable, "-m", "kubetune_cli.main", "run", str(path), "--workdir", str(tmp_path / "work")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[str] = []
    _wait_for_step(process, lines, 5)
    return process, lines, out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_like_ctrl_c(tmp_path: Path, tiny_model_dir: Path, signum: int) -> None:
    process, lines, out = _start_and_wait(tmp_path, tiny_model_dir)
    try:
        process.send_signal(signum)
        rest, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    output = "".join(lines) + rest
    assert process.returncode == EXIT_PREEMPTED, output
    assert "Traceback" not in output
    status = status_of(output)
    assert status["phase"] == "Suspended" and status["checkpoint"]["step"] >= 5, status
    assert (out / "checkpoints" / f"step-{status['checkpoint']['step']}" / "COMPLETE").exists()


def test_the_trainer_checkpoints_and_stops_when_kubetune_run_is_killed(tmp_path: Path, tiny_model_dir: Path) -> None:
    process, _, out = _start_and_wait(tmp_path, tiny_model_dir)
    process.kill()  # SIGKILL: nothing of the CLI runs, the trainer is left alone
    process.communicate(timeout=30)
    termination = tmp_path / "work" / "termination-log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not termination.exists():
        time.sleep(0.5)
    message = json.loads(termination.read_text())
    assert message["outcome"] == "preempted" and message["exitCode"] == EXIT_PREEMPTED, message
    assert (out / "checkpoints" / f"step-{message['checkpoint']['step']}" / "COMPLETE").exists()


def test_invalid_file_fails_before_anything_loads(tmp_path: Path) -> None:
    job = local_job("/models/x", "/data/train.jsonl", "/out")
    job["spec"]["training"]["learningRate"] = -1
    path = write_job(tmp_path / "job.yaml", job)
    started = time.monotonic()
    result = kubetune("run", str(path))
    assert result.returncode == 1
    validate = kubetune("validate", str(path))
    assert result.stderr == validate.stderr and "spec.training.learningRate" in result.stderr
    assert time.monotonic() - started < 30
    assert not (ROOT / ".kubetune" / "local-run").exists()


def test_missing_local_path_is_named(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_job(
        tmp_path / "job.yaml", local_job(str(tiny_model_dir), str(tmp_path / "nope.jsonl"), str(tmp_path / "o"))
    )
    result = kubetune("run", str(path), "--workdir", str(tmp_path / "work"))
    assert result.returncode == EXIT_INVALID_INPUT
    assert f"spec.dataset.train: {tmp_path / 'nope.jsonl'} does not exist" in result.stderr


def test_unreachable_endpoint_fails_fast(tmp_path: Path) -> None:
    from kubetune_cli.local import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    path = write_job(tmp_path / "job.yaml", local_job("s3://models/tiny/", "s3://data/train.jsonl", "s3://out/run/"))
    started = time.monotonic()
    result = kubetune("run", str(path), "--workdir", str(tmp_path / "work"), "--s3-endpoint", endpoint)
    assert result.returncode == EXIT_FAILED  # transient, not invalid input (retrying can help)
    assert f"cannot reach {endpoint}" in result.stderr
    assert time.monotonic() - started < 30


# peft 0.21 reads transformers' `is_gradient_checkpointing`, deprecated in transformers 5: not ours to fix.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_demo_end_to_end_from_a_wheel(tmp_path: Path) -> None:
    """`pip install kubetune[local,trainer]` + `kubetune demo`, run outside the checkout."""
    installed = install_wheel(tmp_path / "install")
    show = f"import {', '.join(PACKAGES)}; print({', '.join(f'{name}.__file__' for name in PACKAGES)})"
    where = subprocess.run(
        [str(installed.python), "-c", show],
        capture_output=True, text=True, timeout=120, env=installed.env(), cwd=tmp_path, check=True,
    ).stdout.split()  # fmt: skip
    assert len(where) == len(PACKAGES) and all(path.startswith(str(installed.venv)) for path in where), where
    result = subprocess.run(
        [str(installed.kubetune), "demo", "--model", "tiny", "--workdir", str(tmp_path / "demo"), "--max-steps", "20"],
        capture_output=True, text=True, timeout=600, env=installed.env(), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    artifacts = tmp_path / "demo" / "artifacts"
    assert f"artifacts: {artifacts}" in result.stdout
    assert re.search(r"train loss: [\d.]+ -> [\d.]+ over 20 steps", result.stdout)
    assert "Q: How do I reset my Quillstack password?" in result.stdout
    cluster_yaml = result.stdout.split("the same job on a cluster (kubectl apply -f -):\n---\n", 1)[1]
    from tests.support.admission import admit

    assert admit(yaml.safe_load(cluster_yaml)) == []

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "tiny-llama")
    model = PeftModel.from_pretrained(base, artifacts / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(artifacts / "adapter")
    inputs = tokenizer("### Instruction:\nHow do I export my data?\n\n### Response:\n", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics["train_loss"] < metrics["first_train_loss"]
    # The same eval data through the base model (the adapter off), and each sample answered by both.
    assert metrics["base_eval_loss"] > metrics["eval_loss"]
    assert f"eval loss on held-out questions: {metrics['base_eval_loss']:.3f} (base model) ->" in result.stdout
    samples = [json.loads(line) for line in (artifacts / "samples.jsonl").read_text().splitlines()]
    assert all(set(s) == {"prompt", "completion", "base_completion"} for s in samples)
