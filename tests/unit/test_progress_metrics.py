"""Pure helpers of the progress poller and the metrics registry."""

from __future__ import annotations

from kubetune_operator.metrics import Metrics
from kubetune_operator.progress import progress_condition, trainer_endpoint, url_of
from tests.objects import NOW


def pod(phase: str = "Running", ip: str | None = "10.0.0.7", **labels: str) -> dict:
    return {
        "metadata": {"name": "p", "labels": {"kubetune.dev/finetunejob": "run", **labels}},
        "spec": {"containers": [{"name": "trainer", "ports": [{"name": "metrics", "containerPort": 9555}]}]},
        "status": {"phase": phase, "podIP": ip},
    }


def test_trainer_endpoint_of_a_running_rank_zero_pod() -> None:
    assert trainer_endpoint(pod()) == ("run", "10.0.0.7", 9555)
    assert trainer_endpoint(pod(ip=None)) is None
    assert trainer_endpoint(pod("Pending")) is None
    assert trainer_endpoint(pod(**{"batch.kubernetes.io/job-completion-index": "1"})) is None
    assert url_of("10.0.0.7", 9400) == "http://10.0.0.7:9400/progress"
    assert url_of("fd00::7", 9400) == "http://[fd00::7]:9400/progress"


def test_progress_condition_changes_only_when_needed() -> None:
    failed = progress_condition([], False, "PollFailed", "timeout", 1, NOW)
    assert failed is not None and failed[-1]["status"] == "False"
    assert progress_condition(failed, False, "PollFailed", "timeout", 1, NOW) is None
    recovered = progress_condition(failed, True, "Polled", "", 1, NOW)
    assert recovered is not None and [c["status"] for c in recovered] == ["True"]


def test_metrics_series_follow_the_finetunejobs() -> None:
    metrics = Metrics()
    metrics.observe_phase("ns", "run", {}, {"phase": "Pending"}, "2026-01-02T03:00:00Z")
    running = {"phase": "Running", "startTime": "2026-01-02T03:01:00Z"}
    metrics.observe_phase("ns", "run", {"phase": "Pending"}, running, "2026-01-02T03:00:00Z")
    metrics.observe_progress("ns", "run", {"percent": 25.0, "trainLoss": 1.75})
    done = {**running, "phase": "Succeeded", "completionTime": "2026-01-02T04:01:00Z"}
    metrics.observe_phase("ns", "run", running, done, "2026-01-02T03:00:00Z")
    text = metrics.render().decode()
    assert 'kubetune_finetunejobs{phase="Succeeded"} 1.0' in text
    assert "kubetune_queue_wait_seconds_sum 60.0" in text
    assert 'kubetune_run_duration_seconds_sum{outcome="succeeded"} 3600.0' in text
    assert 'kubetune_run_progress_ratio{finetunejob="run",namespace="ns"} 0.25' in text
    assert 'kubetune_run_train_loss{finetunejob="run",namespace="ns"} 1.75' in text
    assert 'kubetune_reconcile_total{result="ok"} 0.0' in text
    assert "kubetune_reconcile_errors_total 0.0" in text
    assert 'kubetune_sync_retries_total{reason="CreateRefused"} 0.0' in text
    assert 'kubetune_progress_polls_total{result="error"} 0.0' in text
    metrics.forget("ns", "run")
    text = metrics.render().decode()
    assert 'finetunejob="run"' not in text
    assert 'kubetune_finetunejobs{phase="Succeeded"} 0.0' in text
