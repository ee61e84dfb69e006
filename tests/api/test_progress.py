"""Live progress from the trainer's /progress into status, ProgressAvailable on failures, and metrics."""

from __future__ import annotations

import copy
import json
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.api.fixtures import Cluster, Operator, free_port, wait_for
from tests.kubeapi import cluster as kubelet


class FakeTrainer:
    """A /progress endpoint on 127.0.0.1, answering whatever the test sets."""

    def __init__(self) -> None:
        self.progress: dict[str, Any] = {"stage": "train", "step": 0, "totalSteps": 100, "percent": 0.0}
        self.status_code = 200
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(owner.progress).encode()
                self.send_response(owner.status_code if self.path == "/progress" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def trainer() -> Iterator[FakeTrainer]:
    fake = FakeTrainer()
    yield fake
    fake.close()


def run_trainer_pod(cluster: Cluster, name: str, port: int) -> dict:
    """A Running pod of the FineTuneJob's Job whose metrics port is `port` on 127.0.0.1."""
    job = copy.deepcopy(cluster.wait_job(name))
    job["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = port
    pod = kubelet.set_pod_running(kubelet.create_pod_for_job(job))
    cluster.core.patch_namespaced_pod_status(pod["metadata"]["name"], "default", {"status": {"podIP": "127.0.0.1"}})
    kubelet.update_job_status(job, active=1)
    return pod


def metrics(operator: Operator) -> str:
    with urllib.request.urlopen(operator.metrics_url, timeout=5) as response:
        return response.read().decode()


def test_progress_moves_and_an_unreachable_trainer_is_reported(
    operator: Operator, cluster: Cluster, trainer: FakeTrainer
) -> None:
    cluster.apply("live")
    cluster.apply("silent")
    run_trainer_pod(cluster, "live", trainer.port)
    run_trainer_pod(cluster, "silent", free_port())  # nothing listens there
    cluster.wait_phase("Running", "live")
    trainer.progress = {"stage": "train", "step": 10, "totalSteps": 100, "percent": 10.0, "trainLoss": 2.5}
    first = wait_for(lambda: cluster.status("live").get("progress", {}).get("step") == 10 and cluster.status("live"))
    assert first["progress"]["trainLoss"] == 2.5
    trainer.progress = {"stage": "train", "step": 60, "totalSteps": 100, "percent": 60.0, "trainLoss": 1.5}
    wait_for(lambda: cluster.status("live").get("progress", {}).get("step") == 60, what="progress moved")

    def probe_failed() -> dict | None:
        conditions = {c["type"]: c for c in cluster.status("silent").get("conditions", [])}
        condition = conditions.get("ProgressAvailable")
        return condition if condition and condition["status"] == "False" else None

    condition = wait_for(probe_failed, what="ProgressAvailable=False on the silent trainer")
    assert condition["reason"] == "PollFailed" and "127.0.0.1" in condition["message"]
    assert cluster.status("silent")["phase"] == "Running"  # still reconciled, only progress is missing

    cluster.apply("later")  # the operator keeps reconciling others
    cluster.wait_job("later")

    text = metrics(operator)
    assert 'kubetune_run_progress_ratio{finetunejob="live",namespace="default"} 0.6' in text
    assert 'kubetune_run_train_loss{finetunejob="live",namespace="default"} 1.5' in text
    assert 'kubetune_finetunejobs{phase="Running"} 2.0' in text
    assert 'kubetune_progress_polls_total{result="error"}' in text
    assert "kubetune_reconcile_duration_seconds_count" in text
    assert "kubetune_queue_wait_seconds_count 2.0" in text

    cluster.delete_ftj("live")
    wait_for(lambda: cluster.ftj("live") is None, what="live deleted")
    wait_for(lambda: 'finetunejob="live"' not in metrics(operator), what="live's series removed")


def test_progress_recovers(operator: Operator, cluster: Cluster, trainer: FakeTrainer) -> None:
    trainer.status_code = 503  # the trainer's server is up before its progress is
    cluster.apply()
    run_trainer_pod(cluster, "support-bot", trainer.port)
    cluster.wait_phase("Running")

    def progress_available() -> str | None:
        conditions = {c["type"]: c for c in cluster.status().get("conditions", [])}
        return conditions.get("ProgressAvailable", {}).get("status")

    wait_for(lambda: progress_available() == "False", what="poll failures reported")
    assert "HTTP 503" in {c["type"]: c for c in cluster.status()["conditions"]}["ProgressAvailable"]["message"]
    trainer.status_code = 200
    trainer.progress = {"stage": "train", "step": 5, "totalSteps": 100, "percent": 5.0}
    wait_for(lambda: progress_available() == "True", what="ProgressAvailable back to True")
    assert cluster.status()["progress"]["step"] == 5
