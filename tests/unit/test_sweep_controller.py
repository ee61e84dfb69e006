"""The sweep controller against a recorded API: at most parallelTrials trials run, a finished or pruned trial's
slot goes to the next, the pruner's verdict suspends and marks the trial, and the status follows."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from kubetune_operator.metrics import Metrics
from kubetune_operator.settings import Settings
from kubetune_operator.sweep import ANNOTATION_PRUNED
from kubetune_operator.sweep_controller import SweepController
from tests.unit.test_sweep import SWEEP


class RecordedApi:
    """Creates and patches as the API server would answer them, each recorded."""

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.objects: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[str, str]] = []
        self.sweep_status: dict[str, Any] = {}

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        assert name not in self.objects, f"{name} created twice"
        stored = copy.deepcopy(obj)
        stored["metadata"]["uid"] = f"uid-{name}"
        self.objects[name] = stored
        self.created.append(stored)
        return copy.deepcopy(stored)

    async def patch(
        self, resource: Any, namespace: str, name: str, patch: dict[str, Any], subresource: Any = None
    ) -> Any:
        self.patches.append((resource.plural, name, patch))
        if resource.plural == "finetunesweeps":  # a JSON merge patch of the status subresource
            merged = {**self.sweep_status, **patch["status"]}
            self.sweep_status = {key: value for key, value in merged.items() if value is not None}
            return {**SWEEP, "status": copy.deepcopy(self.sweep_status)}
        stored = self.objects[name]
        stored["metadata"]["annotations"].update(patch["metadata"]["annotations"])
        stored["spec"]["runPolicy"] = {**stored["spec"].get("runPolicy", {}), **patch["spec"]["runPolicy"]}
        return copy.deepcopy(stored)

    def event(self, obj: Any, type: str, reason: str, message: str) -> None:
        self.events.append((reason, message))


def with_status(api: RecordedApi, name: str, status: dict[str, Any]) -> dict[str, Any]:
    return {**copy.deepcopy(api.objects[name]), "status": status}


async def settle(controller: SweepController) -> None:
    for _ in range(200):
        await asyncio.sleep(0.005)
        if controller.queue.idle():
            return
    raise AssertionError("the sweep queue did not settle")


async def a_sweep_runs_parallel_trials_and_prunes() -> None:
    api = RecordedApi()
    controller = SweepController(api, Settings(), Metrics())  # type: ignore[arg-type]
    sweep = copy.deepcopy(SWEEP)  # 4 trials, 2 at a time, median pruner after 1 finished trial
    controller.observe_sweep(sweep, deleted=False)
    await settle(controller)
    assert [t["metadata"]["name"] for t in api.created] == ["lr-0", "lr-1"], "parallelTrials 2"

    def report(name: str, status: dict[str, Any]) -> None:
        controller.observe_finetunejob(with_status(api, name, status), deleted=False)

    report("lr-0", {"phase": "Running", "progress": {"evaluations": [{"step": 10, "evalLoss": 2.0}]}})
    await settle(controller)
    assert len(api.created) == 2, "still two running"
    report("lr-0", {"phase": "Succeeded", "progress": {"evaluations": [{"step": 10, "evalLoss": 2.0}]},
                    "result": {"evalLoss": 1.0, "steps": 20}})  # fmt: skip
    await settle(controller)
    assert [t["metadata"]["name"] for t in api.created] == ["lr-0", "lr-1", "lr-2"], "lr-0's slot went to lr-2"

    report("lr-1", {"phase": "Running", "progress": {"evaluations": [{"step": 10, "evalLoss": 9.0}]}})
    await settle(controller)
    pruned = [patch for plural, name, patch in api.patches if plural == "finetunejobs" and name == "lr-1"]
    assert pruned == [
        {"metadata": {"annotations": {ANNOTATION_PRUNED: "10"}}, "spec": {"runPolicy": {"suspend": True}}}
    ]
    assert [t["metadata"]["name"] for t in api.created][-1] == "lr-3", "lr-1's slot went to lr-3"
    assert ("TrialPruned", "lr-1 pruned at step 10 (evalLoss 9.0)") in api.events

    report("lr-2", {"phase": "Succeeded", "result": {"evalLoss": 0.5, "steps": 20}})
    report("lr-3", {"phase": "Failed"})
    await settle(controller)
    final = api.sweep_status
    assert final["phase"] == "Succeeded" and final["progress"] == "4/4"
    assert (final["bestTrial"], final["bestValue"]) == ("lr-2", 0.5)
    assert len(api.created) == 4, "no trial beyond spec.trials"
    await controller.close()


def test_a_sweep_runs_parallel_trials_and_gives_a_pruned_trials_slot_to_the_next() -> None:
    loop = asyncio.new_event_loop()  # a loop of its own, closed here (as test_reconciler_retry)
    try:
        loop.run_until_complete(a_sweep_runs_parallel_trials_and_prunes())
    finally:
        loop.close()
