"""The operator's Prometheus metrics: a private registry, served on the metrics port at /metrics.

The per-run series (progress ratio, train loss) are removed when their FineTuneJob is deleted, so the
number of series follows the number of FineTuneJobs that exist, not of all that ever existed.
"""

from __future__ import annotations

import contextlib
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

import prometheus_client
from aiohttp import web
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune_operator.api import Phase, TrialState
from kubetune_operator.status import parse_timestamp

PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]
RUN_LABELS = ("namespace", "finetunejob")
SWEEP_LABELS = ("namespace", "finetunesweep")
TRIAL_STATES: tuple[str, ...] = TrialState.__args__  # type: ignore[attr-defined]
RETRY_REASONS = ("CreateRefused", "Unreachable", "ApiError", "Waiting", "Error")
# Queue waits and runs span seconds to days.
LONG_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200, float("inf"))


class _PhaseCollector(Collector):
    """kubetune_finetunejobs{phase}: counted at scrape time from what the operator last saw of each object."""

    def __init__(self, phases: dict[tuple[str, str], str]) -> None:
        self._phases = phases

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("kubetune_finetunejobs", "FineTuneJobs by phase.", labels=["phase"])
        counts = Tally(self._phases.values())
        for phase in PHASES:
            family.add_metric([phase], counts.get(phase, 0))
        yield family


class Metrics:
    """Every metric the operator exports, in one private registry."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.phases: dict[tuple[str, str], str] = {}
        self.registry.register(_PhaseCollector(self.phases))
        r = self.registry
        self.reconcile_total = prometheus_client.Counter(
            "kubetune_reconcile", "Reconciliations of a FineTuneJob, by result.", ["result"], registry=r
        )
        self.reconcile_errors = prometheus_client.Counter(
            "kubetune_reconcile_errors", "Reconciliations that failed with an error (retried).", registry=r
        )
        self.sync_retries = prometheus_client.Counter(
            "kubetune_sync_retries",
            "Failed syncs of a FineTuneJob put back on the queue with backoff, by reason (CreateRefused: the API "
            "server refused a child, e.g. a quota or an admission webhook; Unreachable; ApiError; Waiting; Error).",
            ["reason"],
            registry=r,
        )
        self.reconcile_duration = prometheus_client.Histogram(
            "kubetune_reconcile_duration_seconds", "Time to reconcile one FineTuneJob.", registry=r
        )
        self.queue_wait = prometheus_client.Histogram(
            "kubetune_queue_wait_seconds",
            "From FineTuneJob creation until its trainer runs.",
            buckets=LONG_BUCKETS,
            registry=r,
        )
        self.run_duration = prometheus_client.Histogram(
            "kubetune_run_duration_seconds",
            "From the trainer's start until the run finished, by outcome.",
            ["outcome"],
            buckets=LONG_BUCKETS,
            registry=r,
        )
        self.progress_polls = prometheus_client.Counter(
            "kubetune_progress_polls", "Polls of a trainer's /progress, by result.", ["result"], registry=r
        )
        self.progress_ratio = prometheus_client.Gauge(
            "kubetune_run_progress_ratio", "Training progress, 0 to 1.", RUN_LABELS, registry=r
        )
        self.train_loss = prometheus_client.Gauge(
            "kubetune_run_train_loss", "Latest training loss reported by the trainer.", RUN_LABELS, registry=r
        )
        self.sweep_trials = prometheus_client.Gauge(
            "kubetune_sweep_trials",
            "Trials of each FineTuneSweep, by state (Running, Succeeded, Pruned, Failed).",
            [*SWEEP_LABELS, "state"],
            registry=r,
        )
        self.sweep_best_value = prometheus_client.Gauge(
            "kubetune_sweep_best_value", "The best objective of each FineTuneSweep so far.", SWEEP_LABELS, registry=r
        )
        for result in ("ok", "error"):  # series exist from the start, so rate() sees the first increment
            self.progress_polls.labels(result)
        for result in ("ok", "failed", "error"):
            self.reconcile_total.labels(result)
        for reason in RETRY_REASONS:
            self.sync_retries.labels(reason)
        for outcome in ("succeeded", "failed"):  # likewise: increase() must count the first finished run
            self.run_duration.labels(outcome)

    def observe_phase(
        self, namespace: str, name: str, previous: dict[str, Any], status: dict[str, Any], created: str | None
    ) -> None:
        """Record the phase, and on a transition the queue wait or the run's duration."""
        self.phases[namespace, name] = status.get("phase") or "Pending"  # the FineTuneJob watch confirms it
        before, now = previous.get("phase"), status.get("phase")
        if before == now:
            return
        if now == "Running" and before not in ("Running", "Succeeded", "Failed"):
            wait = _seconds_between(created, status.get("startTime"))
            if wait is not None:
                self.queue_wait.observe(wait)
        if now in ("Succeeded", "Failed") and before not in ("Succeeded", "Failed"):
            took = _seconds_between(status.get("startTime") or created, status.get("completionTime"))
            if took is not None:
                self.run_duration.labels(now.lower()).observe(took)

    def observe_progress(self, namespace: str, name: str, progress: dict[str, Any]) -> None:
        if progress.get("percent") is not None:
            self.progress_ratio.labels(namespace, name).set(float(progress["percent"]) / 100)
        if progress.get("trainLoss") is not None:
            self.train_loss.labels(namespace, name).set(float(progress["trainLoss"]))

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted FineTuneJob's series."""
        self.phases.pop((namespace, name), None)
        for gauge in (self.progress_ratio, self.train_loss):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)

    def observe_sweep(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """A sweep's trials by state and its best value, as its status says."""
        for state in TRIAL_STATES:
            self.sweep_trials.labels(namespace, name, state).set(status.get(state.lower()) or 0)
        if status.get("bestValue") is not None:
            self.sweep_best_value.labels(namespace, name).set(float(status["bestValue"]))

    def forget_sweep(self, namespace: str, name: str) -> None:
        """Drop a deleted FineTuneSweep's series."""
        for state in TRIAL_STATES:
            with contextlib.suppress(KeyError):
                self.sweep_trials.remove(namespace, name, state)
        with contextlib.suppress(KeyError):
            self.sweep_best_value.remove(namespace, name)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    async def serve(self, port: int, host: str = "0.0.0.0") -> web.AppRunner:
        """Serve /metrics until the returned runner is cleaned up."""

        async def handle(_: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        begin, finish = parse_timestamp(start), parse_timestamp(end)
    except ValueError:
        return None
    return max(0.0, (finish - begin).total_seconds())
