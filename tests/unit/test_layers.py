"""The layers hold (STYLE.md habit 10): the pure layers import neither kopf nor the Kubernetes client, the
operator never reaches torch or the trainer's training code, the contract, config and API sit at the bottom,
and only the CLI and local mode (kubetune_cli) import both sides.

The contracts live in pyproject ([tool.importlinter]); this runs them, so breaking a layer fails the suite.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[2]


def test_import_contracts_hold() -> None:
    lint_imports = shutil.which("lint-imports") or str(pathlib.Path(sys.executable).parent / "lint-imports")
    if not pathlib.Path(lint_imports).exists():
        pytest.fail("lint-imports (import-linter, a dev dependency) is not installed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / part) for part in ("operator", "trainer", "cli"))}
    result = subprocess.run([lint_imports], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
