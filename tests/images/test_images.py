"""The two images, run as the cluster runs them: read-only root filesystem, UID 65532, and the trainer with exactly
the pod the Job builder writes, fine-tuning the tiny model from S3 to S3 (SeaweedFS on the host's loopback, reached
through a proxy on the host's end of a veth pair into the container's private network namespace, so the trainer's
0.0.0.0:9400 listens there only), its exit code and termination message read as the operator reads them."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from kubetune_operator.builders import build_trainer_configmap, build_trainer_job
from kubetune_operator.settings import Settings
from kubetune_operator.status import Ending, parse_termination_message, trainer_ending
from kubetune_trainer.contract import EXIT_INVALID_INPUT, EXIT_OK
from tests.images.containers import (
    BUILD_TIMEOUT_SECONDS,
    REPO_ROOT,
    PrivateNetwork,
    Volumes,
    docker_run_args,
    private_network,
)
from tests.objects import finetunejob
from tests.support.outage import outage_proxy
from tests.support.s3 import S3Endpoint

# The first test of a session may build the images (build.sh; seconds when they are current).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 900)]

DATASET = REPO_ROOT / "cli" / "kubetune_cli" / "data" / "support-instructions.jsonl"
RUN_TIMEOUT_SECONDS = 600
CREDENTIALS_SECRET = "s3-credentials"


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)


def run_container(*args: str, timeout: float = RUN_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
    """`docker run --rm` under a name of its own, removed whatever happens (a timeout leaves no container)."""
    name = f"kubetune-test-{uuid.uuid4().hex[:12]}"
    try:
        return docker("run", "--rm", "--name", name, *args, timeout=timeout)
    finally:
        docker("rm", "--force", name)


def python_in(image: str, code: str) -> Any:
    """What `code` prints as JSON, run by the image's Python read-only as 65532 with no network, and /tmp writable as
    in every pod of ours (an emptyDir there)."""
    result = run_container(
        *("--read-only", "--tmpfs", "/tmp", "--user", "65532:65532", "--network", "none"),
        *("--entrypoint", "python", image, "-c", code),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- both images ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["operator", "trainer"])
def test_image_runs_as_65532_and_keeps_no_build_secret(images: dict[str, str], name: str) -> None:
    config = json.loads(docker("image", "inspect", images[name]).stdout)[0]["Config"]
    assert config["User"] == "65532:65532"  # runAsNonRoot without runAsUser takes the image's
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", images[name]).stdout
    assert "BEGIN CERTIFICATE" not in history
    found = python_in(
        images[name],
        "import json, os; print(json.dumps({'uid': os.getuid(), 'ca': os.path.exists('/run/secrets/ca')}))",
    )
    assert found == {"uid": 65532, "ca": False}  # the build's CA secret is not in any layer


# -- operator ---------------------------------------------------------------------------------------------------


def test_operator_image_runs_read_only_as_65532(images: dict[str, str]) -> None:
    result = run_container(
        "--read-only", "--user", "65532:65532", "--cap-drop", "ALL", "--network", "none", images["operator"], "--help"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: kubetune operator")
    # The whole operator imports (Kopf, the Kubernetes client, prometheus-client), and no torch is installed.
    found = python_in(
        images["operator"],
        "import importlib.util, json, kubetune_operator.main;"
        " print(json.dumps({'torch': importlib.util.find_spec('torch') is not None}))",
    )
    assert found == {"torch": False}


# -- trainer ----------------------------------------------------------------------------------------------------


def test_trainer_image_has_the_cuda_builds(images: dict[str, str]) -> None:
    """One image for GPU and CPU nodes: torch's CUDA build, and the bitsandbytes kernel library for its CUDA."""
    found = python_in(
        images["trainer"],
        "import importlib.util, json, pathlib, torch;"
        " bnb = pathlib.Path(importlib.util.find_spec('bitsandbytes').submodule_search_locations[0]);"
        " libraries = sorted(p.name for p in bnb.glob('libbitsandbytes_*'));"
        " print(json.dumps({'cuda': torch.version.cuda, 'libraries': libraries}))",
    )
    assert found["cuda"], "torch is a CPU build"
    major, minor = found["cuda"].split(".")[:2]
    assert f"libbitsandbytes_cuda{major}{minor}.so" in found["libraries"]


def fine_tune_in_the_image(
    image: str, s3: S3Endpoint, bucket: str, tmp_path: Path, *, train: str
) -> tuple[subprocess.CompletedProcess[str], Ending]:
    """Run the trainer as the Job builder's pod would, in a network namespace of its own (a pod's), and read its
    end as the operator does."""
    with private_network(image) as network, outage_proxy(s3.url, host=network.host_address) as s3_proxy:
        return _fine_tune(image, s3, s3_proxy.url, network, bucket, tmp_path, train=train)


def _fine_tune(
    image: str, s3: S3Endpoint, endpoint: str, network: PrivateNetwork, bucket: str, tmp_path: Path, *, train: str
) -> tuple[subprocess.CompletedProcess[str], Ending]:
    job = finetunejob(
        bucket,
        spec={
            "model": {"source": f"s3://{bucket}/models/tiny/"},
            "dataset": {"train": train, "maxLength": 128},
            "training": {"maxSteps": 4, "batchSize": 4, "gradientAccumulationSteps": 1, "learningRate": 1e-2},
            "output": {"destination": f"s3://{bucket}/out/"},
            "resources": {"gpus": 0},
            "storage": {"endpoint": endpoint, "credentialsSecretRef": {"name": CREDENTIALS_SECRET}},
        },
    )
    settings = Settings(trainer_image=image)
    configmap = build_trainer_configmap(job, settings)
    pod = build_trainer_job(job, settings)["spec"]["template"]["spec"]
    args, termination_log = docker_run_args(
        pod,
        config_maps={configmap["metadata"]["name"]: configmap["data"]},
        secrets={CREDENTIALS_SECRET: {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}},
        volumes=Volumes(tmp_path),
    )
    result = run_container(network.docker_option, *args)
    message = parse_termination_message(termination_log.read_text())
    return result, trainer_ending(message, result.returncode, result.stdout + result.stderr)


@pytest.fixture
def seeded_bucket(s3_seaweed: S3Endpoint, s3_bucket_name: str, tiny_model_dir: Path) -> str:
    s3_seaweed.make_bucket(s3_bucket_name)
    s3_seaweed.upload_dir(tiny_model_dir, s3_bucket_name, "models/tiny")
    s3_seaweed.client().upload_file(str(DATASET), s3_bucket_name, "data/train.jsonl")
    return s3_bucket_name


def test_trainer_image_fine_tunes_from_s3_to_s3_as_the_job_runs_it(
    images: dict[str, str], s3_seaweed: S3Endpoint, seeded_bucket: str, tmp_path: Path
) -> None:
    result, ending = fine_tune_in_the_image(
        images["trainer"], s3_seaweed, seeded_bucket, tmp_path, train=f"s3://{seeded_bucket}/data/train.jsonl"
    )
    assert result.returncode == EXIT_OK, result.stderr[-4000:]
    assert (ending.phase, ending.reason) == ("Succeeded", "Succeeded"), ending.message
    assert ending.result is not None and ending.result["steps"] == 4
    assert ending.artifacts is not None and ending.artifacts["adapter"] == f"s3://{seeded_bucket}/out/adapter/"
    keys = s3_seaweed.list_keys(seeded_bucket, "out/")
    assert "out/adapter/adapter_model.safetensors" in keys and "out/COMPLETE" in keys


def test_trainer_image_reports_invalid_input_as_the_operator_reads_it(
    images: dict[str, str], s3_seaweed: S3Endpoint, seeded_bucket: str, tmp_path: Path
) -> None:
    result, ending = fine_tune_in_the_image(
        images["trainer"], s3_seaweed, seeded_bucket, tmp_path, train=f"s3://{seeded_bucket}/data/missing.jsonl"
    )
    assert result.returncode == EXIT_INVALID_INPUT, result.stderr[-4000:]
    assert (ending.phase, ending.reason) == ("Failed", "InvalidInput")
    assert "missing.jsonl" in ending.message
