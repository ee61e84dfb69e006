"""The operator's settings, read once from the environment (prefix KUBETUNE_), as the Helm chart sets them.

A frozen value passed to builders and handlers as an argument: nothing below `main` reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "KUBETUNE_"
DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Kubernetes API calls in flight at once (threads of the client), and syncs running at once; the others wait.
API_CONCURRENCY = 16


class SettingsError(ValueError):
    """An environment variable with a value the operator cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    """Operator-wide configuration. Field `x` is read from env `KUBETUNE_X`."""

    namespaces: tuple[str, ...] = ()  # empty: every namespace
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    trainer_image_pull_policy: str = "IfNotPresent"
    default_gpu_resource: str = "nvidia.com/gpu"
    # Where /metrics and /healthz listen: every interface in a pod (the kubelet probes, Prometheus scrapes the
    # pod IP); a process on a shared host (`kubetune operator` from a laptop, the tests) may keep to loopback.
    listen_address: str = "0.0.0.0"
    metrics_port: int = 8080
    health_port: int = 8081
    progress_interval_seconds: float = 10.0
    progress_timeout_seconds: float = 3.0
    progress_concurrency: int = 16
    api_concurrency: int = API_CONCURRENCY
    progress_failure_threshold: int = 3  # consecutive failed polls before ProgressAvailable=False
    # A failed sync is retried after retry_base_seconds, doubling per failure up to retry_max_seconds, forever.
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 180.0
    resync_seconds: float = 600.0  # every known FineTuneJob is synced this often, whatever the events
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from `env` (default: os.environ); unset or empty variables keep their defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in fields(cls):
            name = ENV_PREFIX + field.name.upper()
            raw = env.get(name, "").strip()
            if not raw:
                continue
            try:
                values[field.name] = _PARSERS[field.name](raw)
            except ValueError as error:
                raise SettingsError(f"{name}={raw!r}: {error}") from None
        settings = cls(**values)
        if settings.retry_max_seconds < settings.retry_base_seconds:
            raise SettingsError(
                f"{ENV_PREFIX}RETRY_MAX_SECONDS={settings.retry_max_seconds:g} is below "
                f"{ENV_PREFIX}RETRY_BASE_SECONDS={settings.retry_base_seconds:g}: the cap must be at least the "
                "first delay"
            )
        return settings


def _namespaces(raw: str) -> tuple[str, ...]:
    return tuple(sorted({part.strip() for part in raw.split(",") if part.strip()}))


def _port(raw: str) -> int:
    port = int(raw)
    if not 1 <= port <= 65535:
        raise ValueError("must be a port number, 1-65535")
    return port


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a number of seconds greater than 0")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be an integer of at least 1")
    return value


def _address(raw: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise ValueError("must be an IP address, e.g. 0.0.0.0 or 127.0.0.1") from None


def _one_of(choices: tuple[str, ...], normalize: Callable[[str], str] = str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = normalize(raw)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return parse


_PARSERS: dict[str, Callable[[str], Any]] = {
    "namespaces": _namespaces,
    "trainer_image": str,
    "trainer_image_pull_policy": _one_of(PULL_POLICIES),
    "default_gpu_resource": str,
    "listen_address": _address,
    "metrics_port": _port,
    "health_port": _port,
    "progress_interval_seconds": _positive_float,
    "progress_timeout_seconds": _positive_float,
    "progress_concurrency": _positive_int,
    "api_concurrency": _positive_int,
    "progress_failure_threshold": _positive_int,
    "retry_base_seconds": _positive_float,
    "retry_max_seconds": _positive_float,
    "resync_seconds": _positive_float,
    "log_level": _one_of(LOG_LEVELS, str.upper),
}
