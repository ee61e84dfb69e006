"""Lint, format, types and layering are part of the suite, so README's one test command checks them all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        # strict for the public API: the models, the contract, the CRD generator
        [
            "mypy",
            "--strict",
            "--follow-imports=silent",
            "trainer/kubetune_trainer/config.py",
            "trainer/kubetune_trainer/contract.py",
            "operator/kubetune_operator/api.py",
            "operator/kubetune_operator/crd.py",
            "cli/kubetune_cli/manifests.py",
            "cli/kubetune_cli/kubeyaml.py",
            "operator/kubetune_operator/spelling.py",
            "operator/kubetune_operator/search.py",
            "operator/kubetune_operator/sweep.py",
        ],
        # the layers of pyproject's [tool.importlinter] (who imports whom): test_layers runs lint-imports
    ],
    ids=["ruff", "ruff-format", "mypy"],
)
def test_tool_passes(command: list[str]) -> None:
    result = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
