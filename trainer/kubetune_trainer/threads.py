"""The CPU threads torch trains with, fixed before torch loads its OpenMP runtime (it reads the environment once).

Two defaults of torch's cost a CPU run dearly where the CPUs are not all its own:

- **How many.** torch sizes its pool from the machine's cores, not the container's CPU limit. A pod limited to
  4 CPUs on a 64-core node ran 64 threads on 4 CPUs of quota, and the kernel throttled all of them together.
  `OMP_NUM_THREADS` is set to the CPUs this process may use: its affinity, capped by its cgroup's CPU quota
  (rounded down, at least 1, as Go's automaxprocs does), divided among the workers of a multi-GPU launch.
- **How they wait.** OpenMP's threads spin between parallel regions. When another process shares the cores (a
  laptop, a CPU node shared with other pods), a spinning thread takes the CPU the thread it waits for needs.
  With the other core of two kept busy (`stress-ng --cpu 1`), 4 SmolLM2 steps took 28 s spinning and 14 s with
  `OMP_WAIT_POLICY=PASSIVE`; on a quiet machine passive waiting costs about a sixth (9-10 s against 11 s;
  bench/trainer/plan_eta.py, 2026-12-07). kubetune chooses passive: a run on a shared machine degrades by the
  share it lost, not threefold.

Both are defaults: a variable already set (the pod template's `env`, the shell of `kubetune run`) wins.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def _own_cgroup(root: Path, controller: str) -> list[Path]:
    """This process's cgroup directories for `controller` (cgroup v2's unified one when ""), innermost first.

    Inside a container the cgroup namespace makes its own cgroup the root of the mount; on a host (or without
    a namespace) /proc/self/cgroup gives the path below it. Every ancestor's quota applies too."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return [root]
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (controller in controllers.split(",")) if controller else not controllers:
            own = root / path.lstrip("/")
            return [own, *own.parents[: len(own.relative_to(root).parts)]] if own.is_dir() else [root]
    return [root]


def _quota(directory: Path) -> float | None:
    """The CPU quota set on one cgroup directory, in CPUs; None when it sets none."""
    try:
        if (directory / "cpu.max").exists():  # v2: "max 100000" or "150000 100000"
            quota, period = (directory / "cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())  # v1: -1 when unlimited
        return None if quota_us <= 0 else quota_us / int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The tightest CPU quota over this process's cgroup and its ancestors (a pod's CPU limit), or None."""
    v1 = root / "cpu"
    directories = _own_cgroup(v1, "cpu") if (v1 / "cpu.cfs_quota_us").exists() else _own_cgroup(root, "")
    quotas = [q for q in map(_quota, directories) if q is not None]
    return min(quotas) if quotas else None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process can keep busy: its affinity, capped by its CPU quota rounded down, at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(root)
    return max(1, min(cpus, math.floor(quota))) if quota is not None else cpus


def configure(environ: MutableMapping[str, str], workers: int = 1, root: Path = CGROUP_ROOT) -> str:
    """Set the thread defaults in `environ` for `workers` processes sharing this one's CPUs; says what it chose."""
    cpus = usable_cpus(root)
    environ.setdefault("OMP_NUM_THREADS", str(max(1, cpus // workers)))
    for name, value in DEFAULTS.items():
        environ.setdefault(name, value)
    quota = cpu_quota(root)
    limit = f", CPU limit {quota:g}" if quota is not None else ""
    return (
        f"CPU threads per worker: {environ['OMP_NUM_THREADS']} ({cpus} usable CPUs{limit}; "
        f"OMP_WAIT_POLICY={environ['OMP_WAIT_POLICY']})"
    )
