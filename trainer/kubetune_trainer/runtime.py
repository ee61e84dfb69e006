"""The trainer process's runtime, fixed before torch loads (the libraries read it once): CPU threads, how they
wait, and the memory allocator. `__main__` applies it first thing; it must stay torch-free.

Three defaults cost a CPU run dearly:

- **How many threads.** torch sizes its pool from the machine's cores, not the container's CPU limit. A pod
  limited to 4 CPUs on a 64-core node ran 64 threads on 4 CPUs of quota, and the kernel throttled all of them
  together. `OMP_NUM_THREADS` is set to the CPUs this process may use: its affinity, capped by its cgroup's CPU
  quota (rounded down, at least 1, as Go's automaxprocs does), divided among the workers of a multi-GPU launch.
- **How they wait.** OpenMP's threads spin between parallel regions. When another process shares the cores (a
  laptop, a CPU node shared with other pods), a spinning thread takes the CPU the thread it waits for needs.
  With the other core of two kept busy (`stress-ng --cpu 1`), 4 SmolLM2 steps took 28 s spinning and 14 s with
  `OMP_WAIT_POLICY=PASSIVE`; on a quiet machine passive waiting costs about a sixth (9-10 s against 11 s;
  bench/trainer/plan_eta.py, 2026-12-07). kubetune chooses passive: a run on a shared machine degrades by the
  share it lost, not threefold.
- **The allocator.** A step allocates and frees gigabytes of activations. glibc's malloc either keeps them in a
  heap that fragments (SmolLM2, one pass of the bench's rows: 4.7 GiB peak RSS) or, with its mmap threshold
  fixed low, maps and zero-fills fresh pages for every buffer (3.4 GiB, but 43 % of the step time: 269 against
  450 tokens/s). tcmalloc reuses freed pages without either cost: 498-516 tokens/s at 3.7 GiB, its heap growing
  to 4.1 GiB over 4x the rows (2026-12-07, docs/performance.md). It has to be loaded before anything else
  (`LD_PRELOAD`), so the trainer re-executes itself once with it when the library is installed (the image has
  it) and the speed-up is on; without it, `speedups.return_freed_memory` fixes glibc's threshold (memory over
  speed).

The thread variables are defaults: one already set (the pod template's `env`, the shell of `kubetune run`)
wins. `KUBETUNE_SPEEDUPS_OFF=tcmalloc` keeps glibc's malloc.
"""

from __future__ import annotations

import ctypes.util
import math
import os
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}

SPEEDUPS_OFF_ENV = "KUBETUNE_SPEEDUPS_OFF"
# The trainer's named speed-ups (kubetune_trainer.speedups describes the others, with their measurements).
SPEEDUPS = (
    "tcmalloc",
    "mmap-threshold",
    "bf16-weights",
    "input-cast",
    "shared-dropout",
    "dropout-mask",
    "fused-lora",
    "fused-loss",
)
TCMALLOC = "tcmalloc_minimal"  # Debian's libtcmalloc-minimal4 (gperftools, without the heap profiler)
REEXECUTED_ENV = "KUBETUNE_ALLOCATOR_REEXEC"  # set on the re-executed process: never loop


def enabled(name: str) -> bool:
    """Whether the speed-up `name` is on (not named in KUBETUNE_SPEEDUPS_OFF, which is not `all`)."""
    if name not in SPEEDUPS:
        raise ValueError(f"unknown speed-up {name!r}; known: {', '.join(SPEEDUPS)}")
    off = {part.strip() for part in os.environ.get(SPEEDUPS_OFF_ENV, "").split(",") if part.strip()}
    unknown = off - {*SPEEDUPS, "all"}
    if unknown:
        raise ValueError(
            f"{SPEEDUPS_OFF_ENV}={os.environ[SPEEDUPS_OFF_ENV]!r}: unknown {', '.join(sorted(unknown))}; "
            f"use 'all' or names from: {', '.join(SPEEDUPS)}"
        )
    return "all" not in off and name not in off


def allocator() -> str:
    """The malloc this process runs on: "tcmalloc" when it is loaded, else "glibc"."""
    try:
        return "tcmalloc" if "libtcmalloc" in Path("/proc/self/maps").read_text() else "glibc"
    except OSError:
        return "glibc"


def preload_allocator(command: Sequence[str]) -> None:
    """Re-execute this process as `command` (same pid; the entry point passes its own command line) with
    tcmalloc preloaded, when it is installed, not loaded yet and the speed-up is on; return otherwise. Call it
    before anything else happens."""
    if os.environ.get(REEXECUTED_ENV) or not enabled("tcmalloc") or allocator() == "tcmalloc":
        return
    library = ctypes.util.find_library(TCMALLOC)  # a soname: the dynamic loader finds it as it finds any library
    if library is None:
        return
    preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD", ""), library]))
    # tcmalloc reports every allocation over 1 GiB on stderr by default: a large model's weights are not news.
    env = {
        **os.environ,
        "LD_PRELOAD": preload,
        REEXECUTED_ENV: "1",
        "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**50),
    }
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], list(command), env)


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


def _usable(quota: float | None) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, math.floor(quota))) if quota is not None else cpus


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process can keep busy: its affinity, capped by its CPU quota rounded down, at least 1."""
    return _usable(cpu_quota(root))


def configure(environ: MutableMapping[str, str], workers: int = 1, root: Path = CGROUP_ROOT) -> str:
    """Set the thread defaults in `environ` for `workers` processes sharing this one's CPUs; says what it chose."""
    quota = cpu_quota(root)  # the cgroup is read once
    cpus = _usable(quota)
    environ.setdefault("OMP_NUM_THREADS", str(max(1, cpus // workers)))
    for name, value in DEFAULTS.items():
        environ.setdefault(name, value)
    limit = f", CPU limit {quota:g}" if quota is not None else ""
    return (
        f"CPU threads per worker: {environ['OMP_NUM_THREADS']} ({cpus} usable CPUs{limit}; "
        f"OMP_WAIT_POLICY={environ['OMP_WAIT_POLICY']})"
    )
