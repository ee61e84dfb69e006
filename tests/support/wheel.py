"""kubetune as a user installs it: a wheel built from this checkout, installed into a fresh virtual environment.

The fresh environment gets the wheel alone (`--no-deps`); its dependencies (torch, transformers, moto...)
come from this test run's environment through a `.pth` line naming that site-packages directory. A path
line in a `.pth` file puts the directory on sys.path but does not run the `.pth` files inside it, so the
checkout's editable install (an import hook installed by such a file) stays inactive: `kubetune_*` can only
be found in the wheel. Installing the dependencies for real would take minutes and prove nothing more.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "operator", "trainer", "cli")  # what the images copy, too
PACKAGES = ("kubetune_cli", "kubetune_operator", "kubetune_trainer")


@dataclass(frozen=True)
class InstalledWheel:
    wheel: Path
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def kubetune(self) -> Path:
        return self.venv / "bin" / "kubetune"

    def env(self) -> dict[str, str]:
        """The environment of a user's shell: nothing points into the checkout."""
        return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}


def build_wheel(out: Path) -> Path:
    """`pip wheel` from a copy of the sources, so the build leaves nothing in the checkout."""
    source = out / "source"
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("kubetune-*.whl")
    return wheel


def install_wheel(out: Path) -> InstalledWheel:
    wheel = build_wheel(out / "dist")
    venv = out / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    installed = InstalledWheel(wheel, venv)
    subprocess.run(
        [str(installed.python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    site = subprocess.run(
        [str(installed.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    (Path(site) / "kubetune-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return installed
