"""Waiting on a cluster in tests: poll until a condition holds, and fail saying what was last seen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import kubernetes
import pytest

T = TypeVar("T")


def wait_for(
    check: Callable[[], T | None],
    timeout: float = 15,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.05,
) -> T:
    """Poll `check` until it returns something truthy; fail with the last value seen (`what` may be a
    callable, evaluated only then, to describe the state at the time of failure). An API error counts as
    "not yet" (the object may not exist yet)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except kubernetes.client.ApiException as error:
            last = error
        else:
            if last:
                return last
        time.sleep(interval)
    described = what() if callable(what) else what
    pytest.fail(f"timed out after {timeout} s waiting for {described}; last: {last!r}")
