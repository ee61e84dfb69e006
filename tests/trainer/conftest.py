"""Helpers for real training runs on the tiny model: configs, small data slices, in-process and subprocess runs.

Runs are kept small (maxLength 128, batch 2, 8-16 steps) so that the whole module fits in a few minutes
on two cores; the learning rate is high because the tiny model starts from random weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.s3 import S3Endpoint

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "cli" / "kubetune_cli" / "data"

# Warnings raised inside the libraries, not by our use of them; everything else stays an error.
LIBRARY_WARNINGS = [
    # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` alias in PeftModel.__init__.
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    # bitsandbytes' CPU 4-bit kernel has no registered autograd kernel; torch warns once per process.
    "ignore:bitsandbytes.*an autograd kernel was not registered:UserWarning",
]


def slice_jsonl(source: Path, target: Path, rows: int, start: int = 0) -> Path:
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines[start : start + rows]) + "\n")
    return target


def base_config(model: str, train: str, destination: str, **sections: Any) -> dict[str, Any]:
    """A small, fast run; `sections` extend top-level sections (one level deep); `method` replaces."""
    cfg: dict[str, Any] = {
        "model": {"source": model},
        "dataset": {"train": train, "maxLength": 128, "evalSplit": 0.1},
        "method": {"type": "qlora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "training": {
            "maxSteps": 12,
            "learningRate": 0.01,
            "lrScheduler": "constant",
            "warmupRatio": 0.0,
            "maxGradNorm": 1.0,
            "batchSize": 2,
            "gradientAccumulationSteps": 1,
            "logEverySteps": 1,
            "evalEverySteps": 6,
            "checkpointEverySteps": 5,
            "checkpointsToKeep": 2,
        },
        "output": {"destination": destination},
    }
    for key, value in sections.items():
        if key != "method" and isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        elif value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


@dataclass
class S3Run:
    """A run of the tiny model from S3 to S3 (moto): `config` uploads its training rows and writes its config."""

    s3: S3Endpoint
    bucket: str
    model: str  # the tiny model's s3:// prefix
    tmp_path: Path

    def config(self, prefix: str, *, rows: int, **sections: Any) -> dict[str, Any]:
        """`base_config` for s3://bucket/`prefix`, training on the first `rows` support rows (uploaded as
        data/train.jsonl), storage at the endpoint unless `sections` names another."""
        train = slice_jsonl(DATA / "support-instructions.jsonl", self.tmp_path / "train.jsonl", rows)
        self.s3.client().upload_file(str(train), self.bucket, "data/train.jsonl")
        sections = {"storage": storage_section(self.s3), **sections}
        return base_config(
            self.model, f"s3://{self.bucket}/data/train.jsonl", f"s3://{self.bucket}/{prefix}", **sections
        )


@pytest.fixture
def s3_run(s3_moto: S3Endpoint, s3_bucket_name: str, tiny_model_s3: str, tmp_path: Path) -> S3Run:
    return S3Run(s3_moto, s3_bucket_name, tiny_model_s3, tmp_path)


@dataclass
class RunResult:
    code: int
    termination: dict[str, Any]
    outcome: Any = None
    log: str = ""


def run_in_process(cfg: dict[str, Any], tmp_path: Path, name: str = "run") -> RunResult:
    """Load the config as the entry point does and run it in this process (no signal handler, port 0)."""
    from kubetune_trainer.__main__ import execute, load_config
    from kubetune_trainer.contract import EXIT_INVALID_INPUT
    from kubetune_trainer.errors import TrainerFailure

    config_path = tmp_path / f"{name}-config.json"
    config_path.write_text(json.dumps(cfg))
    termination = tmp_path / f"{name}-termination.json"
    try:
        config = load_config(str(config_path))
    except TrainerFailure as exc:
        return RunResult(EXIT_INVALID_INPUT, {"error": exc.error.wire()})
    code = execute(config, tmp_path / f"{name}-work", str(termination), serve_port=0)
    return RunResult(code, json.loads(termination.read_text()))


def s3_env(endpoint: S3Endpoint) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": endpoint.access_key,
        "AWS_SECRET_ACCESS_KEY": endpoint.secret_key,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture
def s3_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Point the in-process trainer's boto3 at an endpoint's credentials (the endpoint URL is in the config)."""

    def use(endpoint: S3Endpoint) -> None:
        for key, value in s3_env(endpoint).items():
            monkeypatch.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(key, raising=False)

    yield use


def storage_section(endpoint: S3Endpoint) -> dict[str, Any]:
    return {"endpoint": endpoint.url, "region": endpoint.region}


class TrainerProcess:
    """`python -m kubetune_trainer` in a subprocess, with its /progress port and log file."""

    def __init__(self, cfg: dict[str, Any], tmp_path: Path, name: str, env: dict[str, str], args: list[str] = ()):
        from tests.support.s3 import free_port

        self.port = free_port()
        self.config = tmp_path / f"{name}-config.json"
        self.config.write_text(json.dumps(cfg))
        self.termination = tmp_path / f"{name}-termination.json"
        self.log_path = tmp_path / f"{name}.log"
        full_env = {
            **os.environ,
            **env,
            "KUBETUNE_METRICS_PORT": str(self.port),
            "PYTHONPATH": os.pathsep.join([str(REPO / "trainer"), str(REPO)]),
        }
        command = [
            sys.executable,
            "-m",
            "kubetune_trainer",
            "--config",
            str(self.config),
            "--termination-log",
            str(self.termination),
            "--workdir",
            str(tmp_path / f"{name}-work"),
            *args,
        ]
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def progress(self) -> dict[str, Any] | None:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/progress", timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def wait_for_step(self, step: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"trainer exited {self.process.returncode} early:\n{self.log()[-4000:]}")
            progress = self.progress()
            if progress and progress.get("stage") == "train" and progress.get("step", 0) >= step:
                return progress
            time.sleep(0.2)
        raise AssertionError(f"no step {step} within {timeout}s:\n{self.log()[-4000:]}")

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def result(self) -> dict[str, Any]:
        return json.loads(self.termination.read_text())

    def kill(self) -> None:
        """SIGKILL it if it still runs; either way its log file is closed (a test that failed before `wait` left
        it open, and the ResourceWarning surfaced in whichever later test the collector ran in)."""
        if self.process.poll() is None:
            self.process.kill()
        self.wait(10)

    def kill_all(self) -> None:
        """SIGKILL the launcher and every process under it at once (a node lost: the kernel ends a pod's whole
        cgroup). Not by process group: torchrun starts each worker in a session of its own."""
        import psutil

        try:
            tree = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.wait(10)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny model, initialised wider (0.2) so that a LoRA adapter moves its loss in a few steps."""
    from kubetune_cli.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model-trainer"), initializer_range=0.2)
