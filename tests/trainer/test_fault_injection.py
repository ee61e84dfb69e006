"""Fault injection at a small scale: a run through a fault proxy in front of a real S3 server is SIGKILLed
at seeded random moments (setup, download, training, checkpoint writes, uploads, the final save) and
restarted with the same work dir, as a pod's container is; it must end with every artifact and no run lost.

CI runs 4 kills of one seed. The larger version is the same test with more kills and other seeds
(docs/faults.md): `KUBETUNE_FAULT_KILLS=12 KUBETUNE_FAULT_SEED=1 pytest -s tests/trainer/test_fault_injection.py`
(`KUBETUNE_FAULT_MAX_DELAY=20` moves the kills later, into training and uploads).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from tests.support.outage import outage_proxy
from tests.support.s3 import S3Endpoint
from tests.trainer.conftest import S3Run, TrainerProcess, s3_env

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("KUBETUNE_FAULT_KILLS", 4))
SEED = int(os.environ.get("KUBETUNE_FAULT_SEED", 14))
# The latest kill, in seconds after the trainer is up: a loaded machine's setup can take most of the default.
MAX_DELAY = float(os.environ.get("KUBETUNE_FAULT_MAX_DELAY", 9.0))


def test_random_kills_never_lose_the_run(s3_moto: S3Endpoint, s3_run: S3Run, tmp_path: Path) -> None:
    bucket = s3_run.bucket
    rng = random.Random(SEED)
    killed_in: list[str] = []
    with outage_proxy(s3_moto.url) as proxy:
        proxy.bytes_per_second = 400_000  # the model download lasts long enough to be hit too
        cfg = s3_run.config(
            "run",
            rows=60,
            training={"maxSteps": 16, "checkpointEverySteps": 3, "evalEverySteps": 8, "logEverySteps": 1},
            storage={"endpoint": proxy.url, "region": s3_moto.region},
        )
        for attempt in range(KILLS + 1):
            trainer = TrainerProcess(cfg, tmp_path, "pod", s3_env(s3_moto))  # same work dir: an emptyDir
            try:
                if attempt < KILLS:
                    # Timed from the moment the trainer answers /progress (its imports done), so the kills land
                    # in setup, downloads, training and uploads however loaded the machine is.
                    delay = rng.uniform(0.5, MAX_DELAY)
                    stage = "starting"
                    while trainer.progress() is None and trainer.process.poll() is None:
                        time.sleep(0.05)
                    deadline = time.monotonic() + delay
                    while time.monotonic() < deadline and trainer.process.poll() is None:
                        stage = (trainer.progress() or {}).get("stage", stage)
                        time.sleep(0.05)
                    if trainer.process.poll() is None:
                        trainer.process.kill()
                        killed_in.append(stage)
                    trainer.wait(30)
                else:
                    assert trainer.wait(300) == 0, trainer.log()[-3000:]
            finally:
                trainer.kill()
            if trainer.process.returncode == 0:
                break
    keys = set(s3_moto.list_keys(bucket, "run/"))
    assert {"run/COMPLETE", "run/adapter/adapter_model.safetensors", "run/metrics.json"} <= keys
    metrics = json.loads(s3_moto.read(bucket, "run/metrics.json"))
    assert metrics["steps"] == 16
    complete = json.loads(s3_moto.read(bucket, "run/COMPLETE"))
    assert complete["result"]["steps"] == 16
    print(f"kills {len(killed_in)} in stages {killed_in}; resumed from step {metrics['resumed_from_step']}; lost 0")
