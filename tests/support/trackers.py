"""Real experiment trackers for the tests: an MLflow tracking server on loopback (SQLite backend, a temporary
artifact root), and a reader for the run directory W&B writes in offline mode.

W&B keeps an offline run's history in `run-<id>.wandb`, a LevelDB-style log of protobuf records (the format
`wandb sync` uploads); wandb ships the record definitions but no reader, so `wandb_history` is one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.s3 import HOST, free_port


@dataclass(frozen=True)
class MlflowServer:
    url: str
    log: Path

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url)


def _mlflow_command() -> list[str]:
    found = shutil.which("mlflow", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "mlflow"]


@contextlib.contextmanager
def mlflow_server(root: Path, *, timeout: float = 90) -> Iterator[MlflowServer]:
    """`mlflow server` on 127.0.0.1 with one worker, a SQLite store and an artifact root under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "mlflow.log"
    command = [
        *_mlflow_command(),
        "server",
        "--host", HOST,
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root", (root / "artifacts").as_uri(),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"mlflow server did not start (exit {process.poll()}):\n{tail}")
            time.sleep(0.25)
        yield MlflowServer(url, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# The W&B transaction log: a 7-byte file header, then 32 KiB blocks of records, each with a 7-byte header
# (CRC-32, length, type: full, or first/middle/last of a record split across blocks).
_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    offset, pending = _HEADER, b""
    while offset + _HEADER <= len(data):
        room = _BLOCK - offset % _BLOCK
        if room < _HEADER:  # the rest of the block is padding
            offset += room
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[offset : offset + _HEADER])
        body = data[offset + _HEADER : offset + _HEADER + length]
        offset += _HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            yield pending + body
            pending = b""


def wandb_run_dir(root: Path) -> Path:
    """The one offline run directory W&B wrote under `root` (<root>/wandb/offline-run-...)."""
    runs = sorted(root.glob("**/wandb/offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {root}, found {runs}"
    return runs[0]


def _wandb_typed_records(run_dir: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    (log,) = run_dir.glob("run-*.wandb")
    for raw in _wandb_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def _item_key(item: Any) -> str:
    return str(item.key or "/".join(item.nested_key))


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every history row (one per `wandb.log`) of an offline run, keys as logged."""
    return [
        {_item_key(item): json.loads(item.value_json) for item in record.history.item}
        for record in _wandb_typed_records(run_dir)
        if record.WhichOneof("record_type") == "history"
    ]


def wandb_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary as its summary records left it (later updates win)."""
    summary: dict[str, Any] = {}
    for record in _wandb_typed_records(run_dir):
        if record.WhichOneof("record_type") == "summary":
            summary.update({_item_key(item): json.loads(item.value_json) for item in record.summary.update})
    return summary
