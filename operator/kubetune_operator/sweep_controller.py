"""The FineTuneSweep controller: from a sweep and its trial FineTuneJobs, prune, start trials, publish status.

Every trigger (the sweep's events, any event of one of its trials) puts the sweep on the operator's work queue
(`workqueue.WorkQueue`: each key once, one worker at a time per key, capped backoff forever on failure), and one
sync does it all from state, in named steps: parse the sweep, rebuild the Optuna study from its trials
(`search.Search`: no database), stop the running trials the pruner gives up on, start trials up to
parallelTrials, compute the status and write it if it changed.

No duplicate trial after a restart: trial n is named `<sweep>-<n>`, so creating one that exists answers 409,
and the sweep waits for the watch to bring that trial before it starts any later one. (It never reads a trial
on its own: the watch is the one source, and the operator needs no `get` on FineTuneJobs.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import kopf

from kubetune_operator.api import FineTuneSweep, SpecError, parse_finetunesweep
from kubetune_operator.cache import Body, Key, key_of
from kubetune_operator.kube import FINETUNEJOBS, FINETUNESWEEPS, ApiError, Kube
from kubetune_operator.metrics import Metrics
from kubetune_operator.search import Search
from kubetune_operator.settings import Settings
from kubetune_operator.status import build_condition, phase_event, status_patch
from kubetune_operator.sweep import (
    LABEL_SWEEP,
    build_trial,
    compute_sweep_status,
    is_trial_of,
    pruned_patch,
    trial_name,
    trial_record,
)
from kubetune_operator.workqueue import Backoff, WorkQueue

logger = logging.getLogger(__name__)
SWEEP_WORKERS = 2  # sweeps are few and their syncs short; trials are reconciled by the FineTuneJob workers


class SweepController:
    """The sweeps the watch saw, their trials, and the queue that syncs them."""

    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        metrics: Metrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.sweeps: dict[Key, Body] = {}
        self.trials: dict[Key, dict[str, Body]] = {}  # (namespace, sweep) -> trial name -> its FineTuneJob
        self.queue: WorkQueue[Key] = WorkQueue(Backoff(settings.retry_base_seconds, settings.retry_max_seconds))
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        await self.queue.close()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    # -- what the watches saw ----------------------------------------------------------------------

    def observe_sweep(self, body: Body, deleted: bool) -> None:
        key = key_of(body)
        if deleted:
            self.sweeps.pop(key, None)
            self.trials.pop(key, None)
            self.queue.forget(key)
            self.metrics.forget_sweep(*key)
            return
        self.sweeps[key] = body
        self.enqueue(*key)

    def observe_finetunejob(self, body: Body, deleted: bool) -> None:
        """A FineTuneJob event: if it is a sweep's trial, keep it and sync its sweep."""
        sweep = (body.get("metadata", {}).get("labels") or {}).get(LABEL_SWEEP)
        if sweep is None:
            return
        namespace, name = key_of(body)
        if deleted:
            self.trials.get((namespace, sweep), {}).pop(name, None)
        else:
            self.trials.setdefault((namespace, sweep), {})[name] = body
        self.enqueue(namespace, sweep)

    # -- the work queue ----------------------------------------------------------------------------

    def enqueue(self, namespace: str, name: str) -> None:
        if self._closed:
            return
        self.queue.add((namespace, name))
        if not self._workers:
            self._workers = [
                asyncio.create_task(self._work(), name=f"kubetune-sweep-{i}") for i in range(SWEEP_WORKERS)
            ]
            self.queue.resync_every(self.settings.resync_seconds, lambda: list(self.sweeps))

    async def _work(self) -> None:
        await self.queue.serve(self._sync_queued)

    async def _sync_queued(self, key: Key) -> None:
        """`sync` for a key the queue handed out: back after its backoff on failure, forgotten on success."""
        try:
            await self.sync(*key)
        except kopf.PermanentError:
            self.queue.forget(key)  # told in the sweep's status and events
        except Exception as error:
            at_least = error.delay if isinstance(error, kopf.TemporaryError) and error.delay else 0.0
            delay = self.queue.add_rate_limited(key, at_least)
            logger.warning("sync of sweep %s/%s failed: %s; retrying in %.1f s", *key, error, delay)
        else:
            self.queue.forget(key)

    # -- the one reconciliation path ---------------------------------------------------------------

    async def sync(self, namespace: str, name: str) -> None:
        """Bring one sweep's trials and status in line with its spec and what its trials report."""
        body = self.sweeps.get((namespace, name))
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # deleted: the garbage collector deletes its trials
        sweep = await self._parse(body)
        search = self._search(sweep)
        search = await self._prune(body, sweep, search)
        search = await self._start_trials(body, sweep, search)
        await self._publish(body, compute_sweep_status(sweep, search, body.get("status") or {}, self.clock()))

    async def _parse(self, body: Body) -> FineTuneSweep:
        """The typed sweep; one the API's rules refuse (a choice the template refuses) fails, once."""
        try:
            return parse_finetunesweep(body)
        except SpecError as error:
            message = "invalid spec: " + "; ".join(error.problems)
            generation = body["metadata"].get("generation")
            condition = build_condition("Failed", True, "InvalidSpec", message, None, generation, self.clock())
            status = {"phase": "Failed", "reason": "InvalidSpec", "message": message, "conditions": [condition]}
            await self._publish(body, status)
            raise kopf.PermanentError(message) from None

    def _search(self, sweep: FineTuneSweep) -> Search:
        """The study, rebuilt from the trials this sweep owns."""
        key = (sweep.metadata.namespace or "", sweep.metadata.name)
        trials = self.trials.get(key, {}).values()
        records = [trial_record(sweep, trial) for trial in trials if is_trial_of(trial, sweep.metadata.uid)]
        return Search(sweep.spec, sweep.metadata.name, records)

    async def _prune(self, body: Body, sweep: FineTuneSweep, search: Search) -> Search:
        """Stop each running trial the pruner gives up on (suspended: it checkpoints and exits), marked Pruned."""
        pruned = [record for record in search.records if search.should_prune(record)]
        for record in pruned:
            name = trial_name(sweep.metadata.name, record.number)
            step = record.last_step or 0
            updated = await self.kube.patch(FINETUNEJOBS, body["metadata"]["namespace"], name, pruned_patch(step))
            self._keep_trial(sweep, updated)
            self.kube.event(body, "Normal", "TrialPruned", f"{name} pruned at step {step} "
                            f"({sweep.spec.objective.metric} {record.reported()})")  # fmt: skip
        return self._search(sweep) if pruned else search

    async def _start_trials(self, body: Body, sweep: FineTuneSweep, search: Search) -> Search:
        """Create trials while fewer than parallelTrials run and the sweep has trials left; each asks the study
        (rebuilt with the trials before it) for its values."""
        while not search.done() and sum(r.state == "Running" for r in search.records) < sweep.spec.parallel_trials:
            number, parameters = search.next_number, search.next_parameters()
            trial = build_trial(sweep, number, parameters)
            name = trial["metadata"]["name"]
            if name in self.trials.get(key_of(body), {}):  # a FineTuneJob of that name that is not this sweep's
                message = f"FineTuneJob {name} exists and is not a trial of this sweep; delete or rename it"
                await self._publish(body, {**(body.get("status") or {}), "reason": "NameConflict", "message": message})
                raise kopf.TemporaryError(message, delay=30)
            try:
                created = await self.kube.create(trial)
            except ApiError as error:
                if error.status != 409:
                    raise
                # It exists (a restart, a watch behind): the watch brings it, then the sweep goes on with it. Still
                # unseen after a few tries, it is no trial (it lacks the sweep's label): the user is told.
                message = f"FineTuneJob {name} exists; waiting for the watch to show it as a trial of this sweep"
                if self.queue.failures(key_of(body)) >= 3:
                    await self._publish(body, {**(body.get("status") or {}), "reason": "NameConflict",
                                               "message": message + "; delete or rename it if it is not"})  # fmt: skip
                raise kopf.TemporaryError(message, delay=1) from None
            self._keep_trial(sweep, created)
            self.kube.event(body, "Normal", "TrialCreated", f"{trial_name(sweep.metadata.name, number)}: {parameters}")
            search = self._search(sweep)
        return search

    def _keep_trial(self, sweep: FineTuneSweep, trial: Body) -> None:
        key = (sweep.metadata.namespace or "", sweep.metadata.name)
        self.trials.setdefault(key, {})[trial["metadata"]["name"]] = trial

    async def _publish(self, body: Body, status: Body) -> None:
        """Patch the status if it changed; tell phase changes and a new best trial as Events; export metrics."""
        metadata, previous = body["metadata"], body.get("status") or {}
        key = (metadata["namespace"], metadata["name"])
        self.metrics.observe_sweep(*key, status)
        patch = status_patch(previous, status)
        if patch is None:
            return
        try:
            updated = await self.kube.patch(FINETUNESWEEPS, *key, {"status": patch}, subresource="status")
        except ApiError as error:
            if error.status == 404:
                return  # deleted meanwhile
            raise
        if updated.get("metadata", {}).get("uid") == metadata.get("uid"):
            self.sweeps[key] = updated
        event = phase_event(previous, status)
        if event is not None:
            self.kube.event(body, *event)
        if status.get("bestTrial") and status.get("bestTrial") != previous.get("bestTrial"):
            self.kube.event(body, "Normal", "NewBestTrial", f"{status['bestTrial']}: {status.get('bestValue')} "
                            f"with {status.get('bestParameters')}")  # fmt: skip
