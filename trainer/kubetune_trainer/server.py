"""What a running trainer tells the outside: Prometheus `/metrics` and contract.Progress at `/progress`.

One `Telemetry` per run owns a private registry (no process-global collectors, so in-process test runs
don't collide) and the current Progress; the training callbacks update it, a daemon HTTP thread reads it.
Labels identify the run only (namespace, finetunejob): never a step or other unbounded value.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from kubetune_trainer.contract import (
    MAX_EVALUATIONS,
    METRICS_PATH,
    METRICS_PORT,
    METRICS_PORT_ENV,
    PROGRESS_PATH,
    RUN_NAME_ENV,
    RUN_NAMESPACE_ENV,
    STAGES,
    Progress,
    format_seconds,
)

log = logging.getLogger(__name__)
PREFIX = "kubetune_trainer_"
_SAVE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class Pace:
    """Where the loop started and where it last finished a step (monotonic seconds, optimizer steps)."""

    start_time: float
    start_step: int
    last_time: float
    last_step: int
    total_steps: int

    def eta_seconds(self, now: float) -> float | None:
        """Seconds left, counting the step in progress: the mean step time so far, or the current step's
        time once it runs longer than that. It moves every second, so a 100 s step never looks frozen."""
        done = self.last_step - self.start_step
        left = self.total_steps - self.last_step
        if left <= 0:
            return 0.0
        if done <= 0:
            return None
        mean = (self.last_time - self.start_time) / done
        running = max(now - self.last_time, 0.0)
        if running <= mean:
            return left * mean - running
        return (left - 1) * running  # this step is slow: assume the rest are as slow


@dataclass(frozen=True)
class Metric:
    """A series family of a run: `kubetune_trainer_<name>` (a Telemetry attribute, `telemetry.step`), its
    help text, and labels beyond the run's."""

    name: str
    kind: type
    doc: str
    labels: tuple[str, ...] = ()


# A plain gauge named like a Progress field follows it (`Telemetry.update`); the others are set by callbacks.
METRICS = (
    Metric("step", Gauge, "Optimizer steps done."),
    Metric("total_steps", Gauge, "Optimizer steps planned."),
    Metric("epoch", Gauge, "Epochs done (fractional)."),
    Metric("train_loss", Gauge, "Training loss over the last logging interval."),
    Metric("eval_loss", Gauge, "Latest evaluation loss."),
    Metric("learning_rate", Gauge, "Current learning rate."),
    Metric("grad_norm", Gauge, "Gradient norm before clipping, last logging interval."),
    Metric("tokens_per_second", Gauge, "Training throughput, non-padding tokens per second."),
    Metric("eta_seconds", Gauge, "Estimated seconds until training ends."),
    # Preference optimization (objective dpo); absent from SFT runs.
    Metric("reward_accuracy", Gauge, "DPO: share of pairs whose chosen reward beats the rejected."),
    Metric("reward_margin", Gauge, "DPO: mean chosen minus rejected reward, last logging interval."),
    Metric("reward_chosen", Gauge, "DPO: mean reward of the chosen answers, last logging interval."),
    Metric("reward_rejected", Gauge, "DPO: mean reward of the rejected answers, last interval."),
    Metric("eval_reward_accuracy", Gauge, "DPO: reward accuracy on the eval pairs."),
    Metric("eval_reward_margin", Gauge, "DPO: mean reward margin on the eval pairs."),
    Metric("checkpoint_bytes", Gauge, "Size of the latest checkpoint."),
    Metric("stage", Gauge, "1 for the current stage of the run, 0 for the others.", ("stage",)),
    Metric("tokens", Counter, "Non-padding tokens trained on."),
    Metric("examples", Counter, "Training sequences consumed."),
    Metric("checkpoint_save_seconds", Histogram, "Time to write a checkpoint locally."),
    Metric("checkpoint_upload_seconds", Histogram, "Time to upload a checkpoint."),
)
# Created at 0 with the run's labels, so dashboards see them from the first scrape.
AT_START = ("tokens", "examples", "checkpoint_save_seconds", "checkpoint_upload_seconds", "checkpoint_bytes", "step")
FOLLOW_PROGRESS = frozenset(
    m.name for m in METRICS if m.kind is Gauge and not m.labels and m.name in Progress.model_fields
)
# With CUDA: memory per device (`record_gpu_memory`).
GPU_METRICS = tuple(
    Metric(f"gpu_memory_{kind}_bytes", Gauge, f"GPU memory {kind}.", ("device",))
    for kind in ("allocated", "reserved", "peak")
)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class Telemetry:
    """Metrics and progress of one run: the series of `METRICS` by name (`telemetry.metrics["tokens"]`, or
    as an attribute where no method has the name: `telemetry.step`)."""

    def __init__(
        self, namespace: str | None = None, name: str | None = None, clock: Callable[[], float] = time.monotonic
    ):
        self.clock = clock
        self._pace: Pace | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {
            "namespace": namespace if namespace is not None else os.environ.get(RUN_NAMESPACE_ENV, ""),
            "finetunejob": name if name is not None else os.environ.get(RUN_NAME_ENV, ""),
        }
        self.metrics = {metric.name: self._register(metric) for metric in METRICS}
        for name in AT_START:
            self.child(self.metrics[name])
        self._gpu = {metric.name: self._register(metric) for metric in GPU_METRICS} if _cuda() else {}
        self._lock = threading.Lock()
        run = self.labels["namespace"], self.labels["finetunejob"]
        self._progress = Progress(run="/".join(run) if all(run) else None)
        self.set_stage("starting")

    def _register(self, metric: Metric) -> Any:
        extra: dict[str, Any] = {"buckets": _SAVE_BUCKETS} if metric.kind is Histogram else {}
        names = [*self.labels, *metric.labels]
        return metric.kind(PREFIX + metric.name, metric.doc, names, registry=self.registry, **extra)

    def __getattr__(self, attribute: str) -> Any:
        metrics = self.__dict__.get("metrics", {})
        if attribute in metrics:
            return metrics[attribute]
        raise AttributeError(f"{type(self).__name__} has no attribute {attribute!r}")

    def child(self, metric: Any) -> Any:
        return metric.labels(**self.labels)

    def set_stage(self, stage: str) -> None:
        for name in STAGES:
            self.stage.labels(**self.labels, stage=name).set(1 if name == stage else 0)
        self.update(stage=stage)
        log.info("stage %s", stage)

    def update(self, **fields: Any) -> None:
        """Change Progress fields (snake_case) and the matching gauges.

        Telemetry must never stop training: a value Progress would refuse is logged and clamped (negative
        to 0, NaN/inf to None) or, if it still does not fit, left out.
        """
        fields = _clamped(fields)
        with self._lock:
            data = self._progress.model_dump()
            data.update(fields)
            total, step = data.get("total_steps"), data.get("step")
            if total:
                data["percent"] = round(100.0 * min(max(step or 0, 0), total) / total, 2)
            data["updated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
            try:
                self._progress = Progress(**data)
            except ValidationError as exc:
                refused = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
                log.warning("progress: ignoring invalid %s", {k: fields.get(k) for k in sorted(refused)})
                fields = {k: v for k, v in fields.items() if k not in refused}
                kept = {k: v for k, v in data.items() if k not in refused}
                self._progress = Progress(**{**self._progress.model_dump(), **kept})
        for key, value in fields.items():
            if key in FOLLOW_PROGRESS and value is not None:
                self.child(self.metrics[key]).set(value)

    def evaluated(self, step: int, **metrics: float) -> None:
        """Record an evaluation's metrics at `step` in progress.evaluations (merged into the entry of that step:
        the eval loss and DPO's reward metrics arrive in separate callbacks). A value that is not finite (a
        diverging run) is left out: JSON has no NaN, and an absent value reads as diverged."""
        finite = {key: value for key, value in metrics.items() if math.isfinite(value)}
        with self._lock:
            evaluations = [entry.model_dump() for entry in self._progress.evaluations or []]
            if evaluations and evaluations[-1]["step"] == step:
                evaluations[-1].update(finite)
            else:
                evaluations.append({"step": step, **finite})
            evaluations = evaluations[-MAX_EVALUATIONS:]
        self.update(evaluations=evaluations)

    def step_done(self, step: int, total_steps: int, *, start: bool = False) -> None:
        """The loop finished optimizer step `step` (or, `start`, begins at it): the live ETA's reference."""
        now = self.clock()
        with self._lock:
            if start or self._pace is None:
                self._pace = Pace(now, step, now, step, total_steps)
            else:
                self._pace = Pace(self._pace.start_time, self._pace.start_step, now, step, total_steps)

    def eta_seconds(self) -> float | None:
        with self._lock:
            pace = self._pace
        return pace.eta_seconds(self.clock()) if pace is not None else None

    def progress(self) -> Progress:
        """The current Progress, as fresh as the moment it is read: while training, the ETA counts the step in
        progress and `updatedAt` is now, so /progress, the status and the CLI move even between slow steps."""
        eta = self.eta_seconds()
        with self._lock:
            current = self._progress
        if current.total_steps and current.step >= current.total_steps:
            return current.model_copy(update={"eta_seconds": 0.0, "eta": format_seconds(0)})
        if current.stage != "train" or eta is None:
            return current.model_copy()
        return current.model_copy(
            update={
                "eta_seconds": round(eta, 1),
                "eta": format_seconds(eta),
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )

    def record_gpu_memory(self) -> None:
        if not self._gpu:
            return
        import torch

        for index in range(torch.cuda.device_count()):
            device = str(index)
            self._gpu["gpu_memory_allocated_bytes"].labels(**self.labels, device=device).set(
                torch.cuda.memory_allocated(index)
            )
            self._gpu["gpu_memory_reserved_bytes"].labels(**self.labels, device=device).set(
                torch.cuda.memory_reserved(index)
            )
            self._gpu["gpu_memory_peak_bytes"].labels(**self.labels, device=device).set(
                torch.cuda.max_memory_allocated(index)
            )

    def exposition(self) -> bytes:
        self.record_gpu_memory()
        eta = self.eta_seconds()
        if eta is not None and self.progress().stage == "train":  # as live as /progress
            self.child(self.metrics["eta_seconds"]).set(round(eta, 1))
        return generate_latest(self.registry)


# Progress fields declared `ge=0`: a negative value (an ETA past the end) is reported as 0.
_NON_NEGATIVE = frozenset(
    name
    for name, info in Progress.model_fields.items()
    if any(getattr(rule, "ge", None) == 0 for rule in info.metadata)
)


def _clamped(fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    for key, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            log.warning("progress: %s=%r is not a number; reporting none", key, value)
            out[key] = None
        elif value < 0 and key in _NON_NEGATIVE:
            log.warning("progress: %s=%r is negative; reporting 0", key, value)
            out[key] = type(value)(0)
    return out


def _handler(telemetry: Telemetry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == METRICS_PATH:
                self._send(200, CONTENT_TYPE_LATEST, telemetry.exposition())
            elif path == PROGRESS_PATH:
                self._send(200, "application/json", json.dumps(telemetry.progress().wire()).encode())
            elif path in ("/healthz", "/"):
                self._send(200, "text/plain", b"ok\n")
            else:
                self._send(404, "text/plain", b"not found\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the poller gave up waiting
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line each
            pass

    return Handler


def serve(telemetry: Telemetry, port: int | None = None, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics and /progress from a daemon thread; port from KUBETUNE_METRICS_PORT (0: any free)."""
    if port is None:
        port = int(os.environ.get(METRICS_PORT_ENV, METRICS_PORT))
    server = ThreadingHTTPServer((host, port), _handler(telemetry))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="kubetune-metrics", daemon=True).start()
    log.info("serving %s and %s on port %d", METRICS_PATH, PROGRESS_PATH, server.server_address[1])
    return server
