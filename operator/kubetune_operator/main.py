"""Kopf registrations, and nothing else: each handler hands over to the Reconciler (kept in `memo`).

Handlers return nothing (Kopf would write a return value into status; the Reconciler patches status
itself, and only when it changed).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import kopf

from kubetune_operator import API_GROUP, API_VERSION, PLURAL
from kubetune_operator.builders import LABEL_FINETUNEJOB, LABEL_MANAGED_BY, MANAGED_BY
from kubetune_operator.kube import KUEUE_GROUP, Kube
from kubetune_operator.metrics import Metrics
from kubetune_operator.progress import ProgressPoller, trainer_endpoint, url_of
from kubetune_operator.reconcile import Reconciler
from kubetune_operator.settings import Settings
from kubetune_operator.status import is_finished

FINETUNEJOBS = (API_GROUP, API_VERSION, PLURAL)
MANAGED = {LABEL_MANAGED_BY: MANAGED_BY}
RETRY_SECONDS = 5  # API errors are retried soon: Kopf's default (60 s) would leave status stale


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    config = Settings.from_env()
    logging.getLogger("kubetune_operator").setLevel(config.log_level)
    # Kopf's own bookkeeping lives under our group, so `kubectl get -o yaml` tells whose it is.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.peering.standalone = True  # one replica (the chart's Deployment uses Recreate)
    if config.namespaces:
        # Watching listed namespaces: Kopf would list all namespaces (and watch CRDs) to follow them, which a
        # namespaced install is not granted. It takes the listed namespaces and the kinds served at start-up.
        settings.scanning.disabled = True
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING  # our phase events are posted explicitly; Kopf's chatter is not
    kube = Kube.connect()
    metrics = Metrics()
    memo.metrics_server = await metrics.serve(config.metrics_port)
    memo.reconciler = Reconciler(
        kube, config, metrics, ProgressPoller(config.progress_concurrency, config.progress_timeout_seconds)
    )
    logger.info(
        "kubetune operator started: trainer image %s, metrics on :%d", config.trainer_image, config.metrics_port
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    reconciler: Reconciler | None = memo.get("reconciler")
    if reconciler is not None:
        await reconciler.close()
    if memo.get("metrics_server") is not None:
        await memo.metrics_server.cleanup()


@kopf.on.create(*FINETUNEJOBS, backoff=RETRY_SECONDS)
@kopf.on.resume(*FINETUNEJOBS, backoff=RETRY_SECONDS)
async def reconcile(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await memo.reconciler.sync(namespace, name)


@kopf.on.field(*FINETUNEJOBS, field="spec.runPolicy.suspend", backoff=RETRY_SECONDS)
async def suspend_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Suspend or resume: sync patches the Job's `suspend` (see builders.suspend_patch) and the status."""
    await memo.reconciler.sync(namespace, name)


@kopf.on.update(*FINETUNEJOBS, field="spec.scheduling", backoff=RETRY_SECONDS)
async def scheduling_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await memo.reconciler.reschedule(namespace, name)
    await memo.reconciler.sync(namespace, name)  # observedGeneration follows the new spec


@kopf.on.update(*FINETUNEJOBS, field="spec.runPolicy", backoff=RETRY_SECONDS)
async def run_policy_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Other run policy changes (ttlSecondsAfterFinished...) only move observedGeneration; the Job keeps
    the backoffLimit and deadline it was created with."""
    await memo.reconciler.sync(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def child_changed(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    """A Job or pod changed (or went away): the owning FineTuneJob's status follows, its Job is recreated."""
    owner = labels.get(LABEL_FINETUNEJOB)
    if owner:
        await memo.reconciler.sync_from_event(namespace, owner, RETRY_SECONDS)


@kopf.on.event(KUEUE_GROUP, "workloads")
async def workload_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Kueue's Workload of a queued run changed: its status says why it waits, and a user's suspend must
    deactivate it. Served only where Kueue is installed (Kopf watches the resource once its CRD exists)."""
    owner = memo.reconciler.observe_workload(dict(body), deleted=type == "DELETED")
    if owner is not None:
        await memo.reconciler.sync_from_event(*owner, RETRY_SECONDS)


@kopf.on.event(*FINETUNEJOBS)
def finetunejob_seen(
    type: str | None, namespace: str, name: str, status: kopf.Status, memo: kopf.Memo, **_: Any
) -> None:
    """Keep the phase gauge true to what exists (also after a restart); forget deleted FineTuneJobs."""
    if type == "DELETED":
        memo.reconciler.forget(namespace, name)
    else:
        memo.reconciler.metrics.phases[namespace, name] = status.get("phase") or "Pending"


@kopf.index("", "v1", "pods", labels=MANAGED)
def trainer_urls(body: kopf.Body, **_: Any) -> dict[tuple[str, str], str] | None:
    """Where each Running FineTuneJob's rank-0 trainer serves /progress, kept from the pod watch."""
    endpoint = trainer_endpoint(dict(body))
    if endpoint is None:
        return None
    owner, ip, port = endpoint
    return {(body.metadata.namespace or "", owner): url_of(ip, port)}


def _running(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") == "Running"


def _expiring(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    return is_finished(dict(status)) and spec.get("runPolicy", {}).get("ttlSecondsAfterFinished") is not None


@kopf.daemon(*FINETUNEJOBS, when=_running, cancellation_timeout=5, backoff=RETRY_SECONDS)
async def poll_progress(
    namespace: str, name: str, body: kopf.Body, stopped: kopf.DaemonStopped, memo: kopf.Memo,
    trainer_urls: kopf.Index[tuple[str, str], str], logger: logging.Logger, **_: Any,
) -> None:  # fmt: skip
    """While Running: poll the trainer every PROGRESS_INTERVAL_SECONDS (stops when the phase changes)."""
    reconciler: Reconciler = memo.reconciler
    failures = 0
    while not stopped and not reconciler.closed:  # Kopf may not stop a daemon spawned during shutdown
        url = next(iter(trainer_urls.get((namespace, name), [])), None)
        try:
            failures = await reconciler.poll_progress(dict(body), url, failures)
        except Exception as error:  # e.g. an API error writing status: try again next interval, not in 60 s
            if stopped or reconciler.closed:
                return
            logger.warning("progress of %s/%s not written: %s", namespace, name, error)
        await stopped.wait(reconciler.settings.progress_interval_seconds)


@kopf.daemon(*FINETUNEJOBS, when=_expiring, cancellation_timeout=5, backoff=RETRY_SECONDS)
async def expire_finished(
    namespace: str, name: str, spec: kopf.Spec, status: kopf.Status, stopped: kopf.DaemonStopped,
    memo: kopf.Memo, **_: Any,
) -> None:  # fmt: skip
    """Delete a finished FineTuneJob ttlSecondsAfterFinished after it finished."""
    completed = status.get("completionTime")
    finished = datetime.fromisoformat(completed.replace("Z", "+00:00")) if completed else datetime.now(UTC)
    due = finished.timestamp() + float(spec["runPolicy"]["ttlSecondsAfterFinished"])
    await stopped.wait(max(0.0, due - datetime.now(UTC).timestamp()))
    if not stopped:
        await memo.reconciler.expire(namespace, name)
