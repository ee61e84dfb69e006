"""Reconciliation of one FineTuneJob: from what the watches saw, create what is missing, publish the status.

`Reconciler.sync` is the one path every trigger takes (creation, operator restart, a spec change, any event
of the FineTuneJob's Job or pods, a progress poll, Kueue's Workload), so the result depends on the state found,
not on which event arrived (STYLE.md habit 6). It reads the watch-fed `Cache`, not the API: a sync calls the
API only to write (children it creates, a status that changed) or on a cache miss.

Triggers do not sync directly: they put the FineTuneJob on the work queue (`workqueue.WorkQueue`, as
controller-runtime's), which holds each FineTuneJob once however many events arrive, never hands one to two
workers at a time, and lets a bounded number of workers (`KUBETUNE_API_CONCURRENCY`, the API client's concurrency) drain
it in arrival order. Runs that still need their children come first, and a new run's first status write waits
while others still need theirs: in a burst of creations, every Job is created before the burst's status
writes, in order, so none waits behind the whole burst's writes. A sync that fails comes back after the
queue's per-key backoff, forever (a quota, a webhook or an apiserver may refuse for longer than any fixed
number of tries); a refused create shows in status meanwhile (reason CreateRefused). Every known FineTuneJob
is also synced every `resync_seconds`, whatever the events.

One writer per status field: the progress poller only records what it polled and queues a sync; the sync
writes it with everything else, so the two can never overwrite each other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NoReturn

import kopf

from kubetune_operator.api import FineTuneJob, SpecError, parse_finetunejob
from kubetune_operator.builders import (
    LABEL_FINETUNEJOB,
    build_nodes_service,
    build_trainer_configmap,
    build_trainer_job,
    job_name,
    run_policy_patch,
    scheduling_patch,
    suspend_patch,
    workload_activation_patch,
)
from kubetune_operator.cache import Body, Cache, Key, key_of
from kubetune_operator.kube import (
    FINETUNEJOBS,
    JOBS,
    NAMESPACE_TERMINATING,
    ApiError,
    ApiUnreachable,
    Kube,
    NameConflict,
    OwnedByPredecessor,
    check_owner,
    owned_by,
    resource_of,
)
from kubetune_operator.metrics import Metrics
from kubetune_operator.progress import ProgressFollower, ProgressPoller, trainer_endpoint, url_of
from kubetune_operator.settings import Settings
from kubetune_operator.status import (
    SCHEDULING_WAITS,
    compute_status,
    failed_status,
    is_finished,
    parse_timestamp,
    phase_event,
    status_patch,
)
from kubetune_operator.workqueue import Backoff, WorkQueue

PREDECESSOR_RETRY_SECONDS = 2.0  # at least this long before a run whose children's names are held is retried
# A starting run's status moves through reasons within Pending (WaitingForPod, ContainerCreating, ...) in quick
# succession: such a change is written only once it has held for this many seconds (a pod that runs sooner
# goes from the first Pending write straight to Running). A change of phase or of spec (observedGeneration)
# is written at once.
COALESCE_SECONDS = 2.0
# How the apiserver refuses a create in a namespace being deleted (the NamespaceLifecycle admission plugin).
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
        self.clock = clock
        self.cache = Cache()
        self._locks: dict[Key, asyncio.Lock] = {}
        self._closed = False
        self.queue: WorkQueue[Key] = WorkQueue(Backoff(settings.retry_base_seconds, settings.retry_max_seconds))
        self._workers_wanted = settings.api_concurrency  # as many syncs as API calls may be in flight
        self._workers: list[asyncio.Task[None]] = []
        self._own_writes: dict[Key, str] = {}  # resourceVersion of our last status write, until its echo arrives
        self._created: set[Key] = set()  # children created by this process (their run no longer goes first)
        self._reschedule: set[Key] = set()  # spec.scheduling changed: apply it on the next sync
        # Background work per FineTuneJob, owned here rather than by Kopf daemons (which hold a finalizer):
        self.progress = ProgressFollower(poller, settings, metrics, self.trainer_url, self.enqueue, clock)
        self._expiries: dict[Key, asyncio.Task[None]] = {}  # ttlSecondsAfterFinished
        self._held_since: dict[Key, float] = {}  # when a held-back Pending change was first seen (monotonic)
        self._deferred: dict[Key, asyncio.Task[None]] = {}  # coalesced status writes, due later

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        self._closed = True
        await self.queue.close()
        tasks = [*self._workers, *self._expiries.values(), *self._deferred.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.progress.close()
        self.kube.close()

    # -- what the watches saw ----------------------------------------------------------------------

    def observe_finetunejob(self, body: Body, deleted: bool) -> None:
        """A FineTuneJob's watch event: keep it, and queue a sync unless the event only echoes our own write."""
        namespace, name = key = key_of(body)
        if deleted:
            self.forget(namespace, name)
            return
        before = self.cache.finetunejob(namespace, name)
        same = before is not None and before["metadata"].get("uid") == body["metadata"].get("uid")
        version = body["metadata"].get("resourceVersion")
        if same and version is not None and self._own_writes.get(key) == version:
            del self._own_writes[key]
            return  # the echo of our own status write, whose answer is kept already (a re-list is not skipped)
        kept = self.cache.store_finetunejob(body)
        status = kept.get("status") or {}
        self.metrics.phases[key] = status.get("phase") or "Pending"
        spec, old_spec = kept.get("spec") or {}, (before or {}).get("spec") or {}
        if same and spec.get("scheduling") != old_spec.get("scheduling"):
            self._reschedule.add(key)
        elif (
            not same and status.get("phase") and status.get("observedGeneration") != kept["metadata"].get("generation")
        ):
            self._reschedule.add(key)  # changed while no operator watched (after a restart): check it once
        self.enqueue(namespace, name)

    def observe_job(self, body: Body, deleted: bool) -> None:
        self.cache.store_job(body, deleted)
        owner = _finetunejob_of(body)
        if owner is not None:
            self.enqueue(key_of(body)[0], owner)

    def observe_pod(self, body: Body, deleted: bool) -> None:
        owner = self.cache.store_pod(body, deleted)
        if owner is not None:
            self.enqueue(key_of(body)[0], owner)

    def observe_workload(self, workload: Body, deleted: bool) -> None:
        """Keep Kueue's Workload of a kubetune Job and sync its FineTuneJob; other Workloads are ignored."""
        metadata = workload.get("metadata", {})
        namespace = metadata.get("namespace", "")
        owners = [(ref["name"], ref.get("uid")) for ref in metadata.get("ownerReferences") or []
                  if ref.get("kind") == "Job" and ref.get("apiVersion") == "batch/v1"]  # fmt: skip
        if not owners or self.cache.finetunejob(namespace, owners[0][0]) is None:
            return  # not the Workload of a FineTuneJob's Job (the Job is named after its FineTuneJob)
        key = (namespace, owners[0][0])
        kept, job = self.cache.workloads.get(key), self.cache.job(*key)
        if deleted:
            if kept is not None and kept["metadata"].get("uid") == metadata.get("uid"):
                del self.cache.workloads[key]
        elif job is None or job["metadata"].get("uid") == owners[0][1]:
            self.cache.workloads[key] = workload  # not the Workload of a Job deleted since (a recreated Job's is)
        self.enqueue(*key)

    def trainer_url(self, namespace: str, name: str) -> str | None:
        """Where a FineTuneJob's rank-0 trainer serves /progress, from the pods the watch saw."""
        for pod in self.cache.pods(namespace, name):
            endpoint = trainer_endpoint(pod)
            if endpoint is not None:
                return url_of(endpoint[1], endpoint[2])
        return None

    # -- the work queue ----------------------------------------------------------------------------

    def enqueue(self, namespace: str, name: str) -> None:
        """Sync this FineTuneJob soon (once, however often it is asked while it waits)."""
        if self._closed:
            return
        key = (namespace, name)
        self.queue.add(key, first=self._needs_children(key))
        if not self._workers:
            self._workers = [asyncio.create_task(self._work(), name=f"kubetune-sync-{i}")
                             for i in range(self._workers_wanted)]  # fmt: skip
            self.queue.resync_every(self.settings.resync_seconds, lambda: list(self.cache.finetunejobs))

    def _needs_children(self, key: Key) -> bool:
        body = self.cache.finetunejob(*key)
        return body is not None and not (body.get("status") or {}).get("phase") and key not in self._created

    async def _work(self) -> None:
        await self.queue.serve(lambda key: self._sync_queued(*key))

    async def _sync_queued(self, namespace: str, name: str) -> None:
        """`sync` for a key the queue handed out: forgotten by the queue's backoff on success, back on the queue
        after its backoff on failure (however many times it failed before)."""
        key = (namespace, name)
        try:
            await self.sync(namespace, name)
        except kopf.PermanentError:
            pass  # reported in status and events already
        except Exception as error:
            at_least = error.delay if isinstance(error, kopf.TemporaryError) and error.delay else 0.0
            delay = self.queue.add_rate_limited(key, at_least)
            self.metrics.sync_retries.labels(retry_reason(error)).inc()
            logger.warning("sync of %s/%s failed (%d in a row): %s; retrying in %.1f s", namespace, name,
                           self.queue.failures(key), error, delay)  # fmt: skip
            return
        self.queue.forget(key)

    # -- the one reconciliation path ---------------------------------------------------------------

    async def sync(self, namespace: str, name: str) -> None:
        """Bring one FineTuneJob's children and status in line with what exists now."""
        key = (namespace, name)
        async with self._locks.setdefault(key, asyncio.Lock()):
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

    async def _sync(self, namespace: str, name: str) -> None:
        body = self.cache.finetunejob(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # deleted: the garbage collector removes the children
        try:
            await self._reconcile(namespace, name, body)
        except ApiError as error:
            current = self.cache.finetunejob(namespace, name)
            if error.status == 404 and (current is None or current["metadata"].get("uid") != body["metadata"].get("uid")
                                        or current["metadata"].get("deletionTimestamp")):  # fmt: skip
                return  # deleted while being reconciled (a new one of the same name is synced on its own events)
            raise

    async def _reconcile(self, namespace: str, name: str, body: Body) -> None:
        """The steps of a sync: parse, find the Job, create the children or bring the Job to the spec, follow
        Kueue's Workload, then compute the status from what exists and publish it."""
        key, previous = (namespace, name), body.get("status") or {}
        job = await self._parse(body)
        observed = await self._find_job(namespace, job, previous)
        if observed is None and not is_finished(previous):  # new, or deleted by someone while unfinished
            observed = await self._create_children(body, job, previous)
            if self.queue.has_first():  # a burst: the others' Jobs first, this status write after (the Job's event)
                self.enqueue(namespace, name)
                return
        elif observed is not None:
            observed = await self._update_job(body, job, observed, previous)
        self._reschedule.discard(key)
        workload = await self._follow_kueue(job, observed, previous)
        waiting = self._scheduling_waits(job, observed, previous)
        pods = self.cache.pods(namespace, name)
        status = compute_status(job, observed, pods, previous, self.clock(), workload, waiting=waiting)
        await self._publish(body, self.progress.with_progress(key, status, status["observedGeneration"]))
        self._follow_phase(key, status, job)

    async def _parse(self, body: Body) -> FineTuneJob:
        """The typed FineTuneJob; a spec that breaks the API's rules fails the run (InvalidSpec), once."""
        try:
            return parse_finetunejob(body)
        except SpecError as error:
            await self._refuse(body, "InvalidSpec", "invalid spec: " + "; ".join(error.problems))

    async def _find_job(self, namespace: str, job: FineTuneJob, previous: Body) -> Body | None:
        """The run's Job as the watch saw it; read from the API only for a run that had one (after a restart its
        Job may not be watched yet)."""
        child = job_name(job)
        observed = self.cache.job(namespace, child)
        if observed is None and previous.get("phase"):
            observed = await self.kube.get(JOBS, namespace, child)
            if observed is not None:
                self.cache.store_job(observed)
        return observed

    async def _update_job(self, body: Body, job: FineTuneJob, observed: Body, previous: Body) -> Body | None:
        """An existing Job of the run's name: None if it is not this run's (a conflict is refused, a predecessor's
        waited out); an unfinished run's Job follows spec.scheduling (when it changed), suspend, backoffLimit and
        activeDeadlineSeconds."""
        if not owned_by(observed, job.metadata.uid or ""):
            if not is_finished(previous):
                await self._check_owner(body, observed)
            return None
        if is_finished(previous):
            return observed
        namespace, child = observed["metadata"]["namespace"], job_name(job)
        edited = (namespace, body["metadata"]["name"]) in self._reschedule
        if edited or previous.get("observedGeneration") != job.metadata.generation:  # a change not yet in effect
            observed = await self._apply_scheduling(body, job, observed, edited)
        for patch in (suspend_patch(job, observed), run_policy_patch(job, observed)):
            if patch is not None:
                observed = await self.kube.patch(JOBS, namespace, child, patch)
                self.cache.store_job(observed)
        return observed

    async def _follow_kueue(self, job: FineTuneJob, observed: Body | None, previous: Body) -> Body | None:
        """Kueue's Workload of the run's Job (None without Kueue), deactivated or reactivated to follow suspend."""
        if observed is None:
            return None
        workload = self.cache.workloads.get((observed["metadata"]["namespace"], job_name(job)))
        if workload is not None and not is_finished(previous):
            await self._follow_suspend(job, workload)
        return workload

    def _check_no_stale_workload(self, namespace: str, child: str) -> None:
        """Raise (to wait) while Kueue's Workload of a deleted Job of this name remains: Kueue does not admit a Job
        recreated under the same name until the old Job's Workload is gone (the garbage collector deletes it; its
        DELETED event queues this run again)."""
        stale = self.cache.workloads.get((namespace, child))
        if stale is not None:
            raise kopf.TemporaryError(f"waiting for Kueue's Workload {stale['metadata'].get('name')} of a deleted "
                                      f"Job {child} to go before creating the Job again",
                                      delay=PREDECESSOR_RETRY_SECONDS)  # fmt: skip

    async def _follow_suspend(self, job: FineTuneJob, workload: Body) -> None:
        """Deactivate (or reactivate) Kueue's Workload so that Kueue keeps a suspended run suspended."""
        patch = workload_activation_patch(job, workload)
        if patch is not None:
            metadata = workload["metadata"]
            updated = await self.kube.patch(resource_of(workload, "workloads"), metadata["namespace"],
                                            metadata["name"], patch)  # fmt: skip
            self.cache.workloads[(metadata["namespace"], job_name(job))] = updated

    async def _create_children(self, body: Body, job: FineTuneJob, previous: Body) -> Body:
        """The ConfigMap, the multi-node Service and the Job, each created unless it exists (and is this run's)."""
        namespace = body["metadata"]["namespace"]
        self._check_no_stale_workload(namespace, job_name(job))
        children = [build_trainer_configmap(job, self.settings)]
        service = build_nodes_service(job, self.settings)
        if service is not None:  # before the pods, which resolve each other through it
            children.append(service)
        children.append(build_trainer_job(job, self.settings))
        try:
            for child in children:
                observed, created = await self._ensure(body, job, child, previous)
        except NameConflict as error:
            await self._refuse(body, "NameConflict", str(error))
        except OwnedByPredecessor as error:
            raise kopf.TemporaryError(str(error), delay=PREDECESSOR_RETRY_SECONDS) from None
        self.cache.store_job(observed)
        self._created.add((namespace, body["metadata"]["name"]))
        if created and previous.get("phase"):  # it had a Job before: someone deleted it mid-run
            self.kube.event(body, "Warning", "JobRecreated", f"Job {job_name(job)} was deleted; recreated it, "
                            "the trainer resumes from its newest checkpoint")  # fmt: skip
        return observed

    async def _ensure(self, body: Body, job: FineTuneJob, child: Body, previous: Body) -> tuple[Body, bool]:
        """`Kube.ensure` of one child; a create the API server refuses (a quota, an admission webhook) is told in
        status (reason CreateRefused, the refusal's own words) and raised as CreateRefused, to be retried."""
        try:
            return await self.kube.ensure(child, body)
        except ApiError as error:
            if not refused(error):
                raise
            what = f"{child['kind']} {child['metadata']['name']}"
            refusal = f"creating {what} was refused (HTTP {error.status}): {error.message}; retrying with backoff"
            pods = self.cache.pods(*key_of(body))
            status = compute_status(job, None, pods, previous, self.clock(), refused=refusal)
            await self._publish(body, status)
            raise CreateRefused(refusal) from error

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
        key = (metadata["namespace"], metadata["name"])
        patch = status_patch(previous, status)
        if patch is None:
            self._held_since.pop(key, None)
            return
        if self._coalesce(key, previous, status, patch):
            return
        self._held_since.pop(key, None)
        logger.debug("status of %s/%s: %s", *key, patch)
        updated = await self.kube.patch_status(*key, patch)
        if updated.get("metadata", {}).get("uid") == metadata.get("uid"):
            self.cache.store_finetunejob(updated)  # the next sync starts from what was written
            if updated["metadata"].get("resourceVersion"):
                self._own_writes[key] = str(updated["metadata"]["resourceVersion"])
        event = phase_event(previous, status)
        if event is not None:
            self.kube.event(body, *event)
        self.metrics.observe_phase(
            metadata["namespace"], metadata["name"], previous, status, metadata.get("creationTimestamp")
        )

    def _coalesce(self, key: Key, previous: Body, status: Body, patch: Body) -> bool:
        """Whether to hold back this write: a Pending run's reason changing within Pending, until the change
        has held for COALESCE_SECONDS; a held-back write is retried when due, with the state by then."""
        if status.get("phase") != "Pending" or previous.get("phase") != "Pending" or "observedGeneration" in patch:
            return False
        since = self._held_since.setdefault(key, time.monotonic())
        wait = COALESCE_SECONDS - (time.monotonic() - since)
        if wait <= 0:
            return False
        if key not in self._deferred:
            self._deferred[key] = asyncio.create_task(self._enqueue_later(key, wait))
        return True

    async def _enqueue_later(self, key: Key, delay: float) -> None:
        await asyncio.sleep(delay)
        self._deferred.pop(key, None)
        self.enqueue(*key)

    async def _apply_scheduling(self, body: Body, job: FineTuneJob, observed: Body, edited: bool) -> Body:
        """Bring the Job's pod template to spec.scheduling where Kubernetes lets it change: while the Job is
        suspended and has not started (suspending a Job clears its startTime). An edit made while it trains waits
        for a suspend (`_scheduling_waits` keeps observedGeneration behind); `edited`: the edit was just seen, so
        it is worth an Event."""
        patch = scheduling_patch(job, self.settings)
        if not _would_change(observed, patch):
            return observed
        if observed["spec"].get("suspend") and not observed.get("status", {}).get("startTime"):
            observed = await self.kube.patch(JOBS, observed["metadata"]["namespace"], job_name(job), patch)
            self.cache.store_job(observed)
            self.kube.event(body, "Normal", "Rescheduled", "applied spec.scheduling to the suspended Job")
        elif edited:
            self.kube.event(body, "Warning", "SchedulingWaits", SCHEDULING_WAITS)
        return observed

    def _scheduling_waits(self, job: FineTuneJob, observed: Body | None, previous: Body) -> bool:
        """True while an unfinished run's Job has not taken spec.scheduling (the run trains)."""
        if observed is None or is_finished(previous) or not owned_by(observed, job.metadata.uid or ""):
            return False
        if previous.get("observedGeneration") == job.metadata.generation:
            return False  # in effect already: nothing to compare
        return _would_change(observed, scheduling_patch(job, self.settings))

    # -- work beside the syncs: progress polls (progress.py) and expiry --------------------------------------------

    def _follow_phase(self, key: Key, status: Body, job: FineTuneJob) -> None:
        """Poll progress while Running; schedule the deletion of a finished run with ttlSecondsAfterFinished."""
        self.progress.follow(key, status.get("phase") == "Running")
        ttl = job.spec.run_policy.ttl_seconds_after_finished
        if is_finished(status) and ttl is not None and key not in self._expiries and not self._closed:
            completed = status.get("completionTime")
            finished = parse_timestamp(completed) if completed else self.clock()
            delay = max(0.0, finished.timestamp() + float(ttl) - self.clock().timestamp())
            self._expiries[key] = asyncio.create_task(self._expire_later(key, delay))

    async def _expire_later(self, key: Key, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.expire(*key)
        except ApiError as error:
            logger.warning("deleting expired %s/%s failed: %s", *key, error)
            self._expiries.pop(key, None)
            self.enqueue(*key)  # the next sync schedules it again

    # -- other triggers --------------------------------------------------------------------------------

    async def expire(self, namespace: str, name: str) -> None:
        """Delete a finished FineTuneJob whose ttlSecondsAfterFinished has passed (its children follow)."""
        await self.kube.delete(FINETUNEJOBS, namespace, name)

    def forget(self, namespace: str, name: str) -> None:
        """A FineTuneJob is gone: drop what is kept of it, stop its background work, drop its metric series."""
        key = (namespace, name)
        self.cache.forget(namespace, name)
        self._locks.pop(key, None)
        self._created.discard(key)
        self._reschedule.discard(key)
        self.progress.forget(key)
        self._held_since.pop(key, None)
        self._own_writes.pop(key, None)
        self.queue.forget(key)
        for tasks in (self._expiries, self._deferred):
            task = tasks.pop(key, None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self.metrics.forget(namespace, name)


class CreateRefused(Exception):
    """The API server refused to create a child of a FineTuneJob; the sync is retried with backoff."""


def refused(error: ApiError) -> bool:
    """Whether the API server refused a create for a reason the user should see: a quota, a policy or an admission
    webhook (which may also fail to answer: a 500 naming the webhook). Not a conflict, a namespace being deleted, or
    the API server's own trouble (a 5xx: etcd unavailable, a timeout), which a retry outlives."""
    if error.status in (404, 409) or NAMESPACE_TERMINATING in error.message:
        return False
    return 400 <= error.status < 500 or "webhook" in error.message


def retry_reason(error: Exception) -> str:
    """Why a sync is retried, as the label of kubetune_sync_retries_total."""
    if isinstance(error, CreateRefused):
        return "CreateRefused"
    if isinstance(error, ApiUnreachable):
        return "Unreachable"
    if isinstance(error, ApiError):
        return "ApiError"
    if isinstance(error, kopf.TemporaryError):
        return "Waiting"
    return "Error"


def _finetunejob_of(obj: Body) -> str | None:
    """The FineTuneJob a Job belongs to, from the label every child carries."""
    return (obj.get("metadata", {}).get("labels") or {}).get(LABEL_FINETUNEJOB)


def _would_change(obj: Body, patch: Body) -> bool:
    """Whether applying the JSON merge patch `patch` to `obj` changes it."""
    for key, value in patch.items():
        current = obj.get(key) if isinstance(obj, dict) else None
        if value is None:
            if current is not None:
                return True
        elif isinstance(value, dict) and isinstance(current, dict):
            if _would_change(current, value):
                return True
        elif isinstance(value, dict):
            if current is not None or _would_change({}, value):
                return True
        elif current != value:
            return True
    return False
