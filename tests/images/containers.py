"""Docker for the image tests: is a daemon there, the images built by build.sh, and a pod's container as `docker run`.

`docker_run_args` turns the pod template the Job builder writes into the `docker run` options a kubelet would
amount to (command, env, securityContext, volumes, termination message file), so the image is tested against
what the operator really asks of it, not a hand-made copy.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.availability import require

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tests" / "images" / "build.sh"
REGISTRY = "ghcr.io/kubetune"
BUILD_TIMEOUT_SECONDS = 3600  # a cold trainer build downloads torch's CUDA wheels (several GB)


def project_version() -> str:
    match = re.search(r'^version = "([^"]+)"$', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, "pyproject.toml has no version"
    return match[1]


def image_name(name: str) -> str:
    """The tag build.sh gives an image, and the chart's default: ghcr.io/kubetune/<name>:<version>."""
    return f"{REGISTRY}/{name}:{project_version()}"


def docker_problem() -> str | None:
    """Why docker cannot be used here, or None when a daemon answers."""
    if shutil.which("docker") is None:
        return "the docker client is not installed"
    result = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        return f"no docker daemon answers: {result.stderr.strip()[-300:]}"
    return None


def require_docker() -> None:
    """Skip when docker is unavailable, except in CI (CI=true), where a missing docker is a failure."""
    require(
        docker_problem(),
        "the image tests",
        ".ci/setup --with-cluster, or bash tests/images/build.sh --install --start-dockerd, sets it up",
    )


def build_images() -> None:
    """Run build.sh: seconds when the images match their inputs, a full build otherwise."""
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_SECONDS, check=False
    )
    assert result.returncode == 0, f"build.sh failed:\n{result.stderr[-4000:]}"


@dataclass(frozen=True)
class Volumes:
    """Host folders standing in for a pod's volumes, made under `root`."""

    root: Path

    def config_map(self, name: str, data: dict[str, str]) -> Path:
        """A ConfigMap's data as files, read-only to the container as the kubelet mounts it."""
        folder = self.root / "configmaps" / name
        folder.mkdir(parents=True)
        for key, value in data.items():
            (folder / key).write_text(value)
            (folder / key).chmod(0o644)
        folder.chmod(0o755)
        return folder

    def empty_dir(self, name: str) -> Path:
        """An emptyDir: the kubelet makes it world-writable (0777)."""
        folder = self.root / "emptydirs" / name
        folder.mkdir(parents=True)
        folder.chmod(0o777)
        return folder

    def termination_log(self) -> Path:
        """The file the kubelet mounts at terminationMessagePath, writable by any user (0666)."""
        path = self.root / "termination-log"
        path.touch()
        path.chmod(0o666)
        return path


def docker_run_args(
    pod: dict[str, Any],
    *,
    config_maps: dict[str, dict[str, str]],
    secrets: dict[str, dict[str, str]],
    volumes: Volumes,
) -> tuple[list[str], Path]:
    """`docker run` options for the pod's only container, and the host file its termination message lands in.

    What a kubelet would do, as far as docker can say it: the pod's and container's securityContext (user, group,
    fsGroup, read-only root, no new privileges, dropped capabilities), env with secretKeyRef resolved from
    `secrets`, volumeMounts from `config_maps` and emptyDirs (Memory ones as tmpfs), the termination message file,
    and the command as the entrypoint, its `$(VAR)` references expanded from env. Anything else in the pod fails.
    """
    (container,) = pod["containers"]
    pod_security, security = pod.get("securityContext", {}), container.get("securityContext", {})
    args: list[str] = []
    if security.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    user = security.get("runAsUser", pod_security.get("runAsUser"))
    group = security.get("runAsGroup", pod_security.get("runAsGroup"))
    assert user is not None, "the pod names no user: the kubelet would take the image's"
    args += ["--user", f"{user}:{group}" if group is not None else str(user)]
    if "fsGroup" in pod_security:
        args += ["--group-add", str(pod_security["fsGroup"])]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for capability in security.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", capability]

    env: dict[str, str] = {}
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        reference = variable["valueFrom"]["secretKeyRef"]
        value = secrets.get(reference["name"], {}).get(reference["key"])
        if value is None:
            assert reference.get("optional"), f"secret {reference['name']}/{reference['key']} is not given"
            continue
        env[variable["name"]] = value
    for name, value in env.items():
        args += ["--env", f"{name}={value}"]

    pod_volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = pod_volumes[mount["name"]]
        target = mount["mountPath"]
        if "configMap" in volume:
            source = volumes.config_map(mount["name"], config_maps[volume["configMap"]["name"]])
            args += ["--mount", f"type=bind,source={source},target={target},readonly"]
        elif volume.get("emptyDir", {}).get("medium") == "Memory":
            args += ["--mount", f"type=tmpfs,target={target},tmpfs-mode=1777"]
        elif "emptyDir" in volume:
            source = volumes.empty_dir(mount["name"])
            args += ["--mount", f"type=bind,source={source},target={target}"]
        else:
            raise AssertionError(f"volume {mount['name']}: only configMap and emptyDir are turned into docker mounts")
    termination_log = volumes.termination_log()
    args += ["--mount", f"type=bind,source={termination_log},target={container['terminationMessagePath']}"]

    def expand(word: str) -> str:  # the kubelet's $(VAR) expansion; an unknown name stays as written
        return re.sub(r"\$\((\w+)\)", lambda match: env.get(match[1], match[0]), word)

    command = [expand(word) for word in container["command"]]
    args += ["--entrypoint", command[0], container["image"], *command[1:], *map(expand, container.get("args", []))]
    return args, termination_log


@dataclass(frozen=True)
class PrivateNetwork:
    """A network namespace of its own, as a pod's sandbox has: `docker run --network container:<sandbox>` joins it.
    Its only link is a veth pair to this machine, `host_address` on this side: what listens in it (the trainer's
    0.0.0.0:9400) is reachable from nowhere else, and it reaches only what listens on `host_address`."""

    sandbox: str
    host_address: str

    @property
    def docker_option(self) -> str:
        return f"--network=container:{self.sandbox}"


@contextmanager
def private_network(image: str) -> Iterator[PrivateNetwork]:
    """A sandbox container (`image` sleeping, with no network) whose namespace gets one veth pair to this machine, on
    a /24 no interface here uses; removed, with the pair, on exit. Docker's own bridge is off on these machines
    (`dockerd --bridge=none`), and a private namespace must not be routed beyond this machine."""
    from tests.cluster.node import free_subnet

    sandbox, suffix = f"kubetune-net-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex[:6]
    outer, inner = f"ktn{suffix}", f"ktp{suffix}"
    subnet = free_subnet()
    host, guest = f"{subnet[1]}/{subnet.prefixlen}", f"{subnet[2]}/{subnet.prefixlen}"
    try:
        _checked(["docker", "run", "--detach", "--rm", "--name", sandbox, "--network", "none", "--read-only",
                  "--user", "65532:65532", "--entrypoint", "sleep", image, "infinity"])  # fmt: skip
        pid = _checked(["docker", "inspect", "--format", "{{.State.Pid}}", sandbox]).strip()
        _checked(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner])
        _checked(["ip", "link", "set", inner, "netns", pid])
        for command in (
            ["addr", "add", guest, "dev", inner],
            ["link", "set", inner, "up"],
            ["link", "set", "lo", "up"],
        ):
            _checked(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", *command])
        _checked(["ip", "addr", "add", host, "dev", outer])
        _checked(["ip", "link", "set", outer, "up"])
        yield PrivateNetwork(sandbox, str(ipaddress.ip_interface(host).ip))
    finally:
        subprocess.run(["docker", "rm", "--force", sandbox], capture_output=True, timeout=120, check=False)
        with suppress(subprocess.SubprocessError):  # gone with the sandbox's namespace, unless that never came
            subprocess.run(["ip", "link", "del", outer], capture_output=True, timeout=30, check=False)


def _checked(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(argv)} failed: {result.stderr.strip()}"
    return result.stdout
