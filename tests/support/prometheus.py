"""A real Prometheus for the tests: started on 127.0.0.1 with our own scrape config, queried over its HTTP API.

The `prometheus` binary comes from the distribution's package (`.ci/setup` installs it). Each instance gets
a free port, a temporary TSDB directory and a 1 s scrape interval, so a test sees new samples every
second. `promtool check metrics` (the linter for an exposition) lives here too.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from kubetune_cli.local import free_port

SCRAPE_INTERVAL_SECONDS = 1


class PrometheusError(RuntimeError):
    pass


@dataclass
class Prometheus:
    """One running Prometheus; `scrape_configs` are Prometheus' own, written into its config file."""

    scrape_configs: list[dict[str, Any]]
    binary: str = "prometheus"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    _log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Prometheus:
        self.workdir = Path(tempfile.mkdtemp(prefix="kubetune-prometheus-"))
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_INTERVAL_SECONDS}s",
                "scrape_timeout": f"{SCRAPE_INTERVAL_SECONDS}s",
                "evaluation_interval": f"{SCRAPE_INTERVAL_SECONDS}s",
            },
            "scrape_configs": self.scrape_configs,
        }
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self._log_file = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 (closed by stop())
        self.process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config_file}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise PrometheusError(f"prometheus not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        path = self.workdir / "prometheus.log" if self.workdir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the HTTP API ------------------------------------------------------------------------------

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; returns `data`, raises PrometheusError with Prometheus' message on failure."""
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        try:
            body = response.json()
        except ValueError as exc:
            raise PrometheusError(f"{path} {params}: HTTP {response.status_code} {response.text[:500]}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query (what a stat panel asks); the result's vector, or the scalar as one sample."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: float = 1) -> list[dict[str, Any]]:
        """A range query (what a time-series panel asks): one matrix entry per series."""
        return list(self.api("query_range", query=expr, start=start, end=end, step=step)["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's `label_values(<match>, <label>)` variable query lists."""
        return list(self.api(f"label/{label}/values", **{"match[]": match}))

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def wait_for(self, expr: str, timeout: float, what: str = "") -> list[dict[str, Any]]:
        """Poll an instant query until it returns a non-empty vector."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise PrometheusError(f"no data for {what or expr} within {timeout} s; targets: {self.targets()}")
            time.sleep(0.25)


def promtool_check_metrics(exposition: bytes) -> subprocess.CompletedProcess[str]:
    """`promtool check metrics` on an exposition (stdin); returncode 0 means no lint problem."""
    return subprocess.run(
        ["promtool", "check", "metrics"],
        input=exposition.decode(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def require_prometheus() -> None:
    """Fail (not skip) when the binaries are missing: CI installs them, so a missing one is a setup bug."""
    missing = [name for name in ("prometheus", "promtool") if shutil.which(name) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not on PATH; run .ci/setup (it installs the distribution's prometheus)")


@pytest.fixture
def prometheus_factory() -> Iterator[Any]:
    """Start Prometheus instances with given scrape configs; all are stopped after the test."""
    require_prometheus()
    started: list[Prometheus] = []

    def start(scrape_configs: list[dict[str, Any]]) -> Prometheus:
        instance = Prometheus(scrape_configs).start()
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()
