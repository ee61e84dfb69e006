"""The real operator (Kopf, in-process through KopfRunner) against the emulated API server: the `operator` and
`cluster` fixtures, for tests/api and tests/metrics (loaded by tests/conftest.py's `pytest_plugins`).

Each test gets a fresh API server (`kube_api`) and, with `operator`, a running operator configured as the
Helm chart configures it (KUBETUNE_* environment) but with short intervals. The tests play the Job
controller, the scheduler and the kubelet with `tests.kubeapi.cluster`. When a test ends, every request
the operator made is checked against the chart's RBAC (`tests/api/rbac.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import kopf.testing
import kubernetes
import pytest

from kubetune_cli.local import free_port
from tests.api.rbac import GRANTED
from tests.kubeapi.server import KubeApiServer
from tests.objects import finetunejob_body
from tests.support.waiting import wait_for

GROUP, VERSION, PLURAL = "kubetune.dev", "v1alpha1", "finetunejobs"
OPERATOR_AGENTS = ("kopf/", "kubetune-operator")
OBSERVED_CALLS: set[tuple[str, str, str, str | None]] = set()  # over the whole run, for the summary
# Measurements for the summary: KopfRunner redirects stdout while the operator runs, so print() is lost.
REPORT_LINES: list[str] = []


class Cluster:
    """What a user does with kubectl, and what the tests read back."""

    def __init__(self, server: KubeApiServer) -> None:
        self.server = server
        self.custom = kubernetes.client.CustomObjectsApi()
        self.batch = kubernetes.client.BatchV1Api()
        self.core = kubernetes.client.CoreV1Api()

    def apply(self, name: str = "support-bot", spec: dict[str, Any] | None = None, namespace: str = "default") -> dict:
        body = finetunejob_body(name, namespace, spec=spec)
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def create_raw(self, body: dict[str, Any], namespace: str = "default") -> dict:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def ftj(self, name: str = "support-bot", namespace: str = "default") -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def status(self, name: str = "support-bot") -> dict:
        return (self.ftj(name) or {}).get("status") or {}

    def patch_spec(self, spec: dict[str, Any], name: str = "support-bot") -> dict:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, name, {"spec": spec})

    def delete_ftj(self, name: str = "support-bot") -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, name)

    def job(self, name: str = "support-bot") -> dict | None:
        return self._read(self.batch.read_namespaced_job, name)

    def configmap(self, name: str = "support-bot-trainer") -> dict | None:
        return self._read(self.core.read_namespaced_config_map, name)

    def jobs(self) -> list[dict]:
        listed = self.batch.list_namespaced_job("default")
        return [self.batch.api_client.sanitize_for_serialization(job) for job in listed.items]

    def service(self, name: str) -> dict | None:
        return self._read(self.core.read_namespaced_service, name)

    def _read(self, read: Callable[..., Any], name: str) -> dict | None:
        try:
            return self.batch.api_client.sanitize_for_serialization(read(name, "default"))
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def wait_phase(self, phase: str, name: str = "support-bot", reason: str | None = None, timeout: float = 15) -> dict:
        def reached() -> dict | None:
            status = self.status(name)
            if status.get("phase") == phase and (reason is None or status.get("reason") == reason):
                return status
            return None

        return wait_for(
            reached, timeout, lambda: f"{name} phase {phase} {reason or ''}; status now: {self.status(name)}"
        )

    def wait_job(self, name: str = "support-bot") -> dict:
        return wait_for(lambda: self.job(name), what=f"Job {name}")

    def events(self, name: str = "support-bot") -> list[dict]:
        listed = self.core.list_namespaced_event("default")
        events = [self.core.api_client.sanitize_for_serialization(e) for e in listed.items]
        return [e for e in events if e.get("involvedObject", {}).get("name") == name]


def operator_calls(server: KubeApiServer) -> set[tuple[str, str, str, str | None]]:
    return {
        (r.verb, r.group, r.resource, r.subresource)
        for r in list(server.emulator.api_requests)
        if r.user_agent.startswith(OPERATOR_AGENTS)
    }


def operator_env(**overrides: str) -> dict[str, str]:
    return {
        "KUBETUNE_TRAINER_IMAGE": "registry.example/kubetune/trainer:test",
        "KUBETUNE_LISTEN_ADDRESS": "127.0.0.1",
        "KUBETUNE_METRICS_PORT": str(free_port()),
        "KUBETUNE_PROGRESS_INTERVAL_SECONDS": "0.2",
        "KUBETUNE_PROGRESS_TIMEOUT_SECONDS": "0.5",
        "KUBETUNE_PROGRESS_FAILURE_THRESHOLD": "2",
        **overrides,
    }


LOGGERS_SET_AT_STARTUP = ("kubetune_operator", "kopf.objects")


class Operator:
    """Start and stop the operator; one test may restart it."""

    def __init__(self, server: KubeApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.server = server
        self.monkeypatch = monkeypatch
        self.env: dict[str, str] = {}
        self.runner: kopf.testing.KopfRunner | None = None
        # kubetune's start-up sets these loggers' levels for the whole process (kopf.objects to WARNING); stop()
        # puts them back, so later tests' Kopf runs in this process log as they would alone.
        self.logger_levels = {name: logging.getLogger(name).level for name in LOGGERS_SET_AT_STARTUP}

    def start(self, **env: str) -> Operator:
        self.env = operator_env(**env)
        for key, value in self.env.items():
            self.monkeypatch.setenv(key, value)
        args = ["run", "--standalone", "--all-namespaces", "-m", "kubetune_operator.main"]
        # The timeout bounds the whole operator run (the test included): generous for a loaded 2-core CI machine.
        self.runner = kopf.testing.KopfRunner(args, timeout=300)
        self.runner.__enter__()
        return self

    def stop(self) -> None:
        if self.runner is None:
            return
        runner, self.runner = self.runner, None
        runner.__exit__(None, None, None)
        for name, level in self.logger_levels.items():
            logging.getLogger(name).setLevel(level)
        assert runner.exception is None, runner.output
        assert runner.exit_code == 0, runner.output
        assert "Traceback" not in runner.output, runner.output

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['KUBETUNE_METRICS_PORT']}/metrics"


@pytest.fixture
def cluster(kube_api: KubeApiServer) -> Cluster:
    return Cluster(kube_api)


@pytest.fixture
def operator(kube_api: KubeApiServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Operator]:
    """The operator, started; stopped at the end, then its API calls checked against the chart's RBAC."""
    running = Operator(kube_api, monkeypatch).start()
    try:
        yield running
    finally:
        running.stop()
        calls = operator_calls(kube_api)
        OBSERVED_CALLS.update(calls)
        assert calls <= GRANTED, f"calls outside the chart's RBAC: {sorted(calls - GRANTED, key=str)}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in REPORT_LINES:
        terminalreporter.write_line(line)
    if OBSERVED_CALLS:
        terminalreporter.write_sep("-", "API calls made by the operator (verb, group, resource, subresource)")
        for call in sorted(OBSERVED_CALLS, key=lambda c: (c[1], c[2], c[3] or "", c[0])):
            terminalreporter.write_line(f"  {call}")
