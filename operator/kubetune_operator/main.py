"""Kopf registrations, and nothing else: each handler hands over to the Reconciler (kept in `memo`).

Handlers return nothing (Kopf would write a return value into status; the Reconciler patches status
itself, and only when it changed).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import kopf

from kubetune_operator import API_GROUP
from kubetune_operator.builders import LABEL_MANAGED_BY, MANAGED_BY
from kubetune_operator.kube import FINETUNEJOBS, FINETUNESWEEPS, JOBS, KUEUE_GROUP, PODS, Kube
from kubetune_operator.metrics import Metrics
from kubetune_operator.progress import ProgressPoller
from kubetune_operator.reconcile import Reconciler
from kubetune_operator.settings import Settings
from kubetune_operator.sweep_controller import SweepController

MANAGED = {LABEL_MANAGED_BY: MANAGED_BY}


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    config = Settings.from_env()
    logging.getLogger("kubetune_operator").setLevel(config.log_level)
    if config.log_level != "DEBUG":
        # Kopf logs a line per handler call ("Handler 'pod_changed' succeeded."), so one per watch event: 15 %
        # of the operator's time in a burst of 1,000 runs. Kopf's warnings and errors still show.
        logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, logging.getLevelName(config.log_level)))
    # No on.create/on.update handlers and no daemons: every FineTuneJob event reconciles from state (status
    # observedGeneration says which spec was last acted on), so Kopf writes neither its
    # last-handled-configuration annotation nor a finalizer, and deletion never waits for the operator (the
    # children go by ownerReferences). Kopf still builds a diff base for every event of every watched kind
    # (a deep copy of the body): ours is empty. The finalizer name stays ours, so Kopf removes the finalizer
    # an earlier version added (it removes a finalizer no handler requires).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.peering.standalone = True  # one replica (the chart's Deployment uses Recreate)
    if config.namespaces:
        # Watching listed namespaces: Kopf would list all namespaces (and watch CRDs) to follow them, which a
        # namespaced install is not granted. It takes the listed namespaces and the kinds served at start-up.
        settings.scanning.disabled = True
    settings.networking.error_backoffs = EndlessBackoffs()
    settings.posting.enabled = False  # Events are the operator's own (Kube.event), none of Kopf's log lines
    kube = Kube.connect(config.api_concurrency)
    metrics = Metrics()
    memo.metrics_server = await metrics.serve(config.metrics_port, config.listen_address)
    poller = ProgressPoller(config.progress_concurrency, config.progress_timeout_seconds)
    memo.reconciler = Reconciler(kube, config, metrics, poller)
    memo.sweeps = SweepController(kube, config, metrics)
    logger.info(
        "kubetune operator started: trainer image %s, metrics on :%d", config.trainer_image, config.metrics_port
    )


class EndlessBackoffs:
    """Delays between Kopf's retries of a failed API request, never running out.

    Kopf's default (1, 1, 2, 3, 5, 8, 13, 21 s) gives up after about 54 s, and a watch that gives up is not
    started again: an API server away for a minute (a control-plane upgrade, an etcd hiccup) would leave the
    operator deaf to that kind for good. These start the same, then retry every 10 s for as long as it takes,
    so a watch resumes within 10 s of the API server's return. Iterable afresh for every request (not a one-shot
    iterator), and not Sized: Kopf then counts no last attempt.
    """

    def __iter__(self) -> Iterator[float]:
        return itertools.chain((1.0, 1.0, 2.0, 3.0, 5.0, 8.0), itertools.repeat(10.0))


class NoDiffBase(kopf.DiffBaseStorage):
    """A diff base that is never stored or built: only change-detecting handlers (none here) would read it."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    sweeps: SweepController | None = memo.get("sweeps")
    if sweeps is not None:
        await sweeps.close()
    reconciler: Reconciler | None = memo.get("reconciler")
    if reconciler is not None:
        await reconciler.close()
    if memo.get("metrics_server") is not None:
        await memo.metrics_server.cleanup()


@kopf.on.event(*FINETUNEJOBS.gvr)
async def finetunejob_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Any FineTuneJob event (creation, spec change, the list after a restart): reconcile it from state."""
    memo.reconciler.observe_finetunejob(_raw(body), deleted=type == "DELETED")
    memo.sweeps.observe_finetunejob(_raw(body), deleted=type == "DELETED")


@kopf.on.event(*FINETUNESWEEPS.gvr)
async def finetunesweep_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Any FineTuneSweep event: sync it from state (its trials, rebuilt into the study)."""
    memo.sweeps.observe_sweep(_raw(body), deleted=type == "DELETED")


@kopf.on.event(*JOBS.gvr, labels=MANAGED)
async def job_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A Job changed (or went away): its FineTuneJob's status follows, and the Job is recreated if needed."""
    memo.reconciler.observe_job(_raw(body), deleted=type == "DELETED")


@kopf.on.event(*PODS.gvr, labels=MANAGED)
async def pod_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.observe_pod(_raw(body), deleted=type == "DELETED")


@kopf.on.event(KUEUE_GROUP, "workloads")
async def workload_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Kueue's Workload of a queued run changed: its status says why it waits, and a user's suspend must
    deactivate it. Served only where Kueue is installed (Kopf watches the resource once its CRD exists)."""
    memo.reconciler.observe_workload(_raw(body), deleted=type == "DELETED")


@kopf.index(*JOBS.gvr, labels=MANAGED)
async def jobs_listed(**_: Any) -> None:
    """No index of its own (the reconciler's cache holds the Jobs): registered because Kopf holds every handler
    until each indexed kind has been listed, so after a restart no run is synced before its Job is known."""


@kopf.index(*PODS.gvr, labels=MANAGED)
async def pods_listed(**_: Any) -> None:
    """Likewise for pods: a restarted operator's first syncs see every run's pods."""


def _raw(body: kopf.Body) -> dict[str, Any]:
    """The event's object as parsed from the watch stream (Kopf's Body is a read-only view of it)."""
    return dict(body)
