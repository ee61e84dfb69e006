"""Tests that need something this machine may lack (docker, a real node): skipped on a developer's machine
without it, a failure in CI (CI=true), where .ci/setup must have provided it."""

from __future__ import annotations

import os

import pytest


def require(problem: str | None, what: str, hint: str = "") -> None:
    """Return when `problem` is None; otherwise fail in CI (`what` must run there) or skip with the hint."""
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run {what}, but {problem}" + (f" ({hint})" if hint else ""))
    pytest.skip(f"{problem}; {hint}" if hint else problem)
