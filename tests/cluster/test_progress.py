"""Live progress with a real trainer: the operator polls a pod's /progress, and here a real trainer process
(a tiny model, real training on CPU) stands in for the pod's container.

The FineTuneJob is scheduled onto the KWOK node whose pods get loopback addresses, so the pod's IP reaches the
trainer's server on this machine. The trainer runs with exactly what the operator gave the pod: the
config.json from the ConfigMap and the container's command and environment from the Job (only the paths of
the mounted volumes are mapped to a scratch directory). Its termination message then becomes the container's,
so the result in the status is the real trainer's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_cli.tiny import write_tiny_model
from kubetune_trainer import contract
from tests.cluster.conftest import Kube, wait_for
from tests.cluster.controlplane import LOOPBACK_NODE, LOOPBACK_TAINT, die_with_parent

pytestmark = pytest.mark.usefixtures("operator")
DATASET = Path(__file__).resolve().parents[2] / "cli" / "kubetune_cli" / "data" / "support-instructions.jsonl"


def trainer_process(kube: Kube, ns: str, scratch: Path, name: str = "run") -> subprocess.Popen[bytes]:
    """Start the real trainer as the pod's container would run, from the objects the operator created for the
    FineTuneJob `name`."""
    config = json.loads(kube.configmap(ns, f"{name}-trainer")["data"]["config.json"])
    container = kube.job(ns, name)["spec"]["template"]["spec"]["containers"][0]
    paths = {contract.CONFIG_PATH: scratch / "config.json", contract.TERMINATION_LOG: scratch / "termination-log"}
    paths[contract.CONFIG_PATH].write_text(json.dumps(config))
    command = [str(paths.get(arg, arg)) for arg in container["command"]]
    assert command[:3] == ["python", "-m", "kubetune_trainer"], command
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for name, value in env.items():  # /cache and /tmp are the pod's emptyDirs
        if value.startswith(("/cache", "/tmp")):
            env[name] = str(scratch / value.strip("/"))
            Path(env[name]).mkdir(parents=True, exist_ok=True)
    env["KUBETUNE_WORKDIR"] = str(scratch / "work")
    assert env[contract.METRICS_PORT_ENV] == str(contract.METRICS_PORT)
    with (scratch / "trainer.log").open("wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, *command[1:]],
            # PYTHONPATH, where the tests set one: the trainer of this checkout, as the operator under test is.
            env={"PATH": "/usr/bin:/bin", **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )


def test_the_operator_polls_a_real_trainer_into_status(kube: Kube, ns: str, tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "tiny-llama")
    spec = {
        "model": {"source": str(model)},
        "dataset": {"train": str(DATASET), "maxLength": 128, "evalSplit": 0},
        "training": {"maxSteps": 300, "logEverySteps": 5, "checkpointEverySteps": 1000, "batchSize": 2},
        "output": {"destination": str(tmp_path / "out") + "/"},
        "resources": {"gpus": 0},
        "scheduling": {
            "nodeSelector": {"kubernetes.io/hostname": LOOPBACK_NODE},
            "tolerations": [{**LOOPBACK_TAINT, "operator": "Equal"}],
        },
    }
    kube.apply(ns, spec=spec)
    pod = kube.wait_running_pod(ns)
    assert pod["status"]["podIP"].startswith("127.0.100.")
    trainer = trainer_process(kube, ns, tmp_path)
    try:
        progress = wait_for(
            lambda: (p := kube.status(ns).get("progress") or {}).get("step", 0) > 0 and p.get("trainLoss") and p,
            180, lambda: f"status.progress from the trainer; status: {kube.status(ns)}",
        )  # fmt: skip
        assert progress["totalSteps"] == 300
        assert kube.status(ns)["phase"] == "Running"
        code = trainer.wait(timeout=300)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    message = (tmp_path / "termination-log").read_text()
    assert code == contract.EXIT_OK, (tmp_path / "trainer.log").read_text()[-3000:]
    kube.set_fate(ns, pod["metadata"]["name"], code, message)
    status = kube.wait_phase(ns, "Succeeded")
    assert status["result"]["steps"] == 300
    assert status["artifacts"]["adapter"].startswith(str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
