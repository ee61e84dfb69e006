"""Rendering the kubetune chart with the real helm binary, for the chart tests."""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.tools import ensure_helm

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "kubetune"
RELEASE_NAMESPACE = "kubetune-system"


@dataclass(frozen=True)
class Chart:
    helm: Path
    path: Path = CHART_DIR

    def _run(self, *args: str, values: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values_file:
            yaml.safe_dump(values or {}, values_file)
            values_file.flush()
            return subprocess.run(
                [str(self.helm), *args, "--values", values_file.name],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )

    def template(self, values: dict[str, Any] | None = None, release: str = "kubetune") -> list[dict[str, Any]]:
        """Every object `helm template` renders, parsed; fails the test when rendering fails."""
        result = self._run("template", release, str(self.path), "--namespace", RELEASE_NAMESPACE, values=values)
        assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def template_error(self, values: dict[str, Any]) -> str:
        """The error `helm template` prints for values it must reject."""
        result = self._run("template", "kubetune", str(self.path), "--namespace", RELEASE_NAMESPACE, values=values)
        assert result.returncode != 0, f"helm template accepted {values!r}"
        return result.stderr

    def lint(self, values: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
        return self._run("lint", "--strict", str(self.path), values=values)


@pytest.fixture(scope="session")
def chart() -> Chart:
    return Chart(helm=ensure_helm())
