"""The trainer process's runtime (`kubetune_trainer.runtime`), fixed before torch loads: the CPUs the process may
use, its cgroup's CPU quota (a pod's CPU limit) included, decide OMP_NUM_THREADS, and what the environment sets
wins; the entry point re-executes itself with tcmalloc where it is installed (.ci/setup and the image install it).

The cgroup trees here are files written as the kernel lays them out; the real one is read on a real node
(tests/cluster/test_real_node.py: a pod limited to 1 CPU on a 2-core node trains with 1 thread, on tcmalloc)."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_trainer import runtime

CPUS = len(os.sched_getaffinity(0))


def v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def v1(root: Path, quota_us: int, period_us: int = 100_000) -> Path:
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period_us}\n")
    return root


@pytest.mark.parametrize(
    ("make", "quota"),
    [
        (lambda root: v2(root, "150000 100000"), 1.5),
        (lambda root: v2(root, "max 100000"), None),
        (lambda root: v1(root, 50_000), 0.5),
        (lambda root: v1(root, -1), None),
        (lambda root: root, None),  # no cgroup files at all (not Linux's layout)
    ],
    ids=["v2-limit", "v2-unlimited", "v1-limit", "v1-unlimited", "none"],
)
def test_the_cpu_quota_is_read_from_cgroup_v1_and_v2(tmp_path: Path, make, quota: float | None) -> None:
    root = make(tmp_path / "cgroup")
    assert runtime.cpu_quota(root) == quota
    expected = CPUS if quota is None else max(1, min(CPUS, int(quota)))
    assert runtime.usable_cpus(root) == expected


def test_a_limit_caps_the_threads_and_a_multi_gpu_launch_shares_them(tmp_path: Path) -> None:
    unlimited = v2(tmp_path / "unlimited", "max 100000")
    environ: dict[str, str] = {}
    said = runtime.configure(environ, workers=1, root=v2(tmp_path / "limited", "100000 100000"))
    assert environ == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert said == "CPU threads per worker: 1 (1 usable CPUs, CPU limit 1; OMP_WAIT_POLICY=PASSIVE)"

    shared: dict[str, str] = {}
    runtime.configure(shared, workers=CPUS + 1, root=unlimited)  # more workers than CPUs: still one thread each
    assert shared["OMP_NUM_THREADS"] == "1"
    whole: dict[str, str] = {}
    runtime.configure(whole, workers=1, root=unlimited)
    assert whole["OMP_NUM_THREADS"] == str(CPUS)


def test_what_the_environment_sets_wins(tmp_path: Path) -> None:
    environ = {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}
    said = runtime.configure(environ, root=v2(tmp_path, "100000 100000"))
    assert environ == {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}
    assert said.startswith("CPU threads per worker: 7 (1 usable CPUs, CPU limit 1;")


def test_torch_in_the_trainer_process_uses_the_threads_chosen(tmp_path: Path) -> None:
    """The entry point sets them before torch loads: torch, imported after, runs that many threads."""
    code = (
        f"import os; from kubetune_trainer import runtime; runtime.configure(os.environ, workers={CPUS}); "
        "import torch; print(torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1"]


def entry_point(tmp_path: Path, **env: str) -> str:
    """The trainer's first log line, from `python -m kubetune_trainer` with a config that does not exist."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "LD_PRELOAD", "KUBETUNE_"))}
    done = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(tmp_path / "missing.json")],
        env={**environ, "KUBETUNE_TERMINATION_LOG": str(tmp_path / "t"), **env},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr  # invalid input, after the runtime was chosen
    return done.stderr.splitlines()[0]


def test_the_entry_point_chooses_threads_and_tcmalloc_before_anything_else(tmp_path: Path) -> None:
    assert ctypes.util.find_library(runtime.TCMALLOC), "install libtcmalloc-minimal4 (.ci/setup does)"
    usable = runtime.usable_cpus()  # this machine's own cgroup
    first = entry_point(tmp_path)
    assert f"CPU threads per worker: {usable} ({usable} usable CPUs" in first, first
    assert first.endswith("; allocator tcmalloc"), first  # re-executed with it preloaded

    assert entry_point(tmp_path, KUBETUNE_SPEEDUPS_OFF="tcmalloc").endswith("; allocator glibc")
