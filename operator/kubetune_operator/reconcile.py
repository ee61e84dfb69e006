"""Reconciliation of one FineTuneJob: read what exists, create what is missing, publish the status.

`Reconciler.sync` is the one path every trigger takes (creation, operator restart, a change of the
suspend flag, any event of the FineTuneJob's Job or pods), so the result depends on the state found, not on
which event arrived (STYLE.md habit 6). Syncs of one FineTuneJob are serialized, and a burst of events
collapses into one more sync, which reads the latest state anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

import kopf

from kubetune_operator.api import FineTuneJob, SpecError, parse_finetunejob
from kubetune_operator.builders import (
    LABEL_FINETUNEJOB,
    build_nodes_service,
    build_trainer_configmap,
    build_trainer_job,
    job_name,
    scheduling_patch,
    suspend_patch,
    workload_activation_patch,
)
from kubetune_operator.kube import (
    FINETUNEJOBS,
    JOBS,
    PODS,
    ApiError,
    Kube,
    NameConflict,
    OwnedByPredecessor,
    check_owner,
    owned_by,
    resource_of,
)
from kubetune_operator.metrics import Metrics
from kubetune_operator.progress import ProgressError, ProgressPoller, progress_condition
from kubetune_operator.settings import Settings
from kubetune_operator.status import compute_status, failed_status, is_finished, phase_event, status_patch

Body = dict[str, Any]
PREDECESSOR_RETRY_SECONDS = 2.0
# How the apiserver refuses a create in a namespace being deleted (the NamespaceLifecycle admission plugin).
NAMESPACE_TERMINATING = "because it is being terminated"
logger = logging.getLogger(__name__)


class Reconciler:
    """Everything a handler needs, made once at startup and kept in Kopf's memo."""

    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        metrics: Metrics,
        poller: ProgressPoller,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self.poller = poller
        self.clock = clock
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._queued: set[tuple[str, str]] = set()
        # Kueue's Workload of each queued run's Job, kept from the Workload watch: (namespace, Job name) -> body.
        self.workloads: dict[tuple[str, str], Body] = {}
        self._closed = False
        self._retries: set[asyncio.Task[None]] = set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        self._closed = True
        for task in list(self._retries):
            task.cancel()
        await self.poller.close()
        self.kube.close()

    # -- the one reconciliation path ---------------------------------------------------------------

    async def sync(self, namespace: str, name: str) -> None:
        """Bring one FineTuneJob's children and status in line with what exists now."""
        key = (namespace, name)
        if key in self._queued:  # a sync is already waiting: it will read everything afresh
            return
        self._queued.add(key)
        async with self._locks.setdefault(key, asyncio.Lock()):
            self._queued.discard(key)
            started = time.monotonic()
            try:
                await self._sync(namespace, name)
            except ApiError as error:
                if error.status == 403 and NAMESPACE_TERMINATING in error.message:
                    return  # its namespace is being deleted, and everything in it with the namespace
                self.metrics.reconcile_total.labels("error").inc()
                self.metrics.reconcile_errors.inc()
                raise
            except kopf.PermanentError:
                self.metrics.reconcile_total.labels("failed").inc()
                raise
            except Exception:
                self.metrics.reconcile_total.labels("error").inc()
                self.metrics.reconcile_errors.inc()
                raise
            else:
                self.metrics.reconcile_total.labels("ok").inc()
            finally:
                self.metrics.reconcile_duration.observe(time.monotonic() - started)

    async def sync_from_event(self, namespace: str, name: str, retry_seconds: float) -> None:
        """`sync` for a watch event. Kopf does not retry event handlers, so a failed sync (an API error) is
        retried here in the background: a Job deleted during an API hiccup is still recreated."""
        try:
            await self.sync(namespace, name)
        except kopf.PermanentError:
            pass  # reported in status and events already
        except Exception as error:
            logger.warning("sync of %s/%s failed (%s); retrying in %s s", namespace, name, error, retry_seconds)
            task = asyncio.create_task(self._retry(namespace, name, retry_seconds))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)

    async def _retry(self, namespace: str, name: str, delay: float, attempts: int = 5) -> None:
        for attempt in range(attempts):
            await asyncio.sleep(delay * (attempt + 1))
            if self._closed:
                return
            try:
                await self.sync(namespace, name)
                return
            except kopf.PermanentError:
                return
            except Exception as error:
                logger.warning("sync of %s/%s failed again: %s", namespace, name, error)

    async def _sync(self, namespace: str, name: str) -> None:
        body = await self.kube.get(FINETUNEJOBS, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # deleted: the garbage collector removes the children
        try:
            await self._reconcile(namespace, name, body)
        except ApiError as error:
            current = await self.kube.get(FINETUNEJOBS, namespace, name) if error.status == 404 else body
            if current is None or current["metadata"].get("uid") != body["metadata"].get("uid"):
                return  # deleted while being reconciled (a new one of the same name is synced on its own events)
            raise

    async def _reconcile(self, namespace: str, name: str, body: Body) -> None:
        previous = body.get("status") or {}
        try:
            job = parse_finetunejob(body)
        except SpecError as error:
            await self._refuse(body, "InvalidSpec", "invalid spec: " + "; ".join(error.problems))
        observed = await self.kube.get(JOBS, namespace, job_name(job))
        if observed is None and not is_finished(previous):  # new, or deleted by someone while unfinished
            observed = await self._create_children(body, job, previous)
        elif observed is not None and not owned_by(observed, job.metadata.uid or ""):
            if not is_finished(previous):
                await self._check_owner(body, observed)
            observed = None
        elif observed is not None and not is_finished(previous):
            patch = suspend_patch(job, observed)
            if patch is not None:
                observed = await self.kube.patch(JOBS, namespace, job_name(job), patch)
        workload = self.workloads.get((namespace, job_name(job))) if observed is not None else None
        if workload is not None and not is_finished(previous):
            await self._follow_suspend(job, workload)
        pods = await self.kube.list(PODS, namespace, f"{LABEL_FINETUNEJOB}={name}")
        await self._publish(body, compute_status(job, observed, pods, previous, self.clock(), workload))

    async def _follow_suspend(self, job: FineTuneJob, workload: Body) -> None:
        """Deactivate (or reactivate) Kueue's Workload so that Kueue keeps a suspended run suspended."""
        patch = workload_activation_patch(job, workload)
        if patch is not None:
            metadata = workload["metadata"]
            updated = await self.kube.patch(resource_of(workload, "workloads"), metadata["namespace"],
                                            metadata["name"], patch)  # fmt: skip
            self.workloads[(metadata["namespace"], job_name(job))] = updated

    def observe_workload(self, workload: Body, deleted: bool) -> tuple[str, str] | None:
        """Keep Kueue's Workload of a kubetune Job; returns the FineTuneJob to sync, if it is one of ours."""
        metadata = workload.get("metadata", {})
        namespace = metadata.get("namespace", "")
        owners = [ref["name"] for ref in metadata.get("ownerReferences") or []
                  if ref.get("kind") == "Job" and ref.get("apiVersion") == "batch/v1"]  # fmt: skip
        if not owners or (namespace, owners[0]) not in self.metrics.phases:
            return None  # not the Workload of a FineTuneJob's Job (the Job is named after its FineTuneJob)
        key = (namespace, owners[0])
        if deleted:
            self.workloads.pop(key, None)
        else:
            self.workloads[key] = workload
        return key

    async def _create_children(self, body: Body, job: FineTuneJob, previous: Body) -> Body:
        trainer_job = build_trainer_job(job, self.settings)
        service = build_nodes_service(job, self.settings)
        try:
            await self.kube.ensure(build_trainer_configmap(job, self.settings), body)
            if service is not None:  # before the pods, which resolve each other through it
                await self.kube.ensure(service, body)
            observed, created = await self.kube.ensure(trainer_job, body)
        except NameConflict as error:
            await self._refuse(body, "NameConflict", str(error))
        except OwnedByPredecessor as error:
            raise kopf.TemporaryError(str(error), delay=PREDECESSOR_RETRY_SECONDS) from None
        if created and previous.get("phase"):  # it had a Job before: someone deleted it mid-run
            self.kube.event(body, "Warning", "JobRecreated", f"Job {job_name(job)} was deleted; recreated it, "
                            "the trainer resumes from its newest checkpoint")  # fmt: skip
        return observed

    async def _check_owner(self, body: Body, observed: Body) -> None:
        try:
            check_owner(observed, body)
        except NameConflict as error:
            await self._refuse(body, "NameConflict", str(error))
        except OwnedByPredecessor as error:
            raise kopf.TemporaryError(str(error), delay=PREDECESSOR_RETRY_SECONDS) from None

    async def _refuse(self, body: Body, reason: str, message: str) -> NoReturn:
        """Mark a FineTuneJob the operator will not run as Failed, once, and stop retrying."""
        metadata = body["metadata"]
        previous = body.get("status") or {}
        status = failed_status(metadata["name"], metadata.get("generation"), reason, message, previous, self.clock())
        await self._publish(body, status)
        raise kopf.PermanentError(f"{reason}: {message}")

    async def _publish(self, body: Body, status: Body) -> None:
        """Patch the status if it changed; tell phase transitions as Events and metrics."""
        metadata = body["metadata"]
        previous = body.get("status") or {}
        patch = status_patch(previous, status)
        if patch is None:
            return
        await self.kube.patch_status(metadata["namespace"], metadata["name"], patch)
        event = phase_event(previous, status)
        if event is not None:
            self.kube.event(body, *event)
        self.metrics.observe_phase(
            metadata["namespace"], metadata["name"], previous, status, metadata.get("creationTimestamp")
        )

    # -- other triggers --------------------------------------------------------------------------------

    async def reschedule(self, namespace: str, name: str) -> None:
        """Apply changed spec.scheduling to a Job that has not started (suspended or queued)."""
        body = await self.kube.get(FINETUNEJOBS, namespace, name)
        if body is None or is_finished(body.get("status")):
            return
        try:
            job = parse_finetunejob(body)
        except SpecError:
            return  # sync reports it
        observed = await self.kube.get(JOBS, namespace, job_name(job))
        if observed is None or not owned_by(observed, job.metadata.uid or ""):
            return
        template = observed["spec"]["template"]["spec"]
        if template.get("priorityClassName") != job.spec.scheduling.priority_class_name:
            self.kube.event(body, "Warning", "SchedulingNotApplied", "scheduling.priorityClassName cannot change "
                            "on an existing Job; delete and recreate the FineTuneJob to change it")  # fmt: skip
        if observed["spec"].get("suspend") and not observed.get("status", {}).get("startTime"):
            await self.kube.patch(JOBS, namespace, job_name(job), scheduling_patch(job, self.settings))
            self.kube.event(body, "Normal", "Rescheduled", "applied spec.scheduling to the suspended Job")
        else:
            self.kube.event(body, "Warning", "SchedulingNotApplied", "spec.scheduling changes reach the Job only "
                            "while it is suspended or queued; suspend the run to apply them")  # fmt: skip

    async def expire(self, namespace: str, name: str) -> None:
        """Delete a finished FineTuneJob whose ttlSecondsAfterFinished has passed (its children follow)."""
        await self.kube.delete(FINETUNEJOBS, namespace, name)

    def forget(self, namespace: str, name: str) -> None:
        """A FineTuneJob is gone: drop its lock, its Workload and metric series."""
        self.workloads.pop((namespace, name), None)
        self._locks.pop((namespace, name), None)
        self.metrics.forget(namespace, name)

    async def poll_progress(self, body: Body, url: str | None, failures: int) -> int:
        """One progress poll of a Running FineTuneJob; returns the consecutive failures so far."""
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        status = body.get("status") or {}
        conditions = list(status.get("conditions") or [])
        patch: Body = {}
        if url is None:
            failures, error = failures + 1, "no running trainer pod with a pod IP yet"
        else:
            try:
                progress = await self.poller.poll(url)
            except ProgressError as problem:
                self.metrics.progress_polls.labels("error").inc()
                failures, error = failures + 1, str(problem)
            else:
                self.metrics.progress_polls.labels("ok").inc()
                self.metrics.observe_progress(namespace, name, progress)
                failures, error = 0, ""
                if progress != status.get("progress"):
                    patch["progress"] = progress
                updated = progress_condition(conditions, True, "Polled", "", metadata.get("generation"), self.clock())
                if updated is not None and any(c.get("type") == "ProgressAvailable" for c in conditions):
                    patch["conditions"] = updated  # only a recovery is worth a condition write
        if error and failures >= self.settings.progress_failure_threshold:
            updated = progress_condition(
                conditions, False, "PollFailed", error, metadata.get("generation"), self.clock()
            )
            if updated is not None:
                patch["conditions"] = updated
        if patch:
            await self.kube.patch_status(namespace, name, patch)
        return failures
