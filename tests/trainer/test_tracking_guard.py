"""The guard around the trackers' callbacks: a tracker that fails in the middle of a run is dropped, marked
failed in /progress, and the training loop never sees the exception."""

from __future__ import annotations

from typing import Any

from kubetune_trainer.server import Telemetry
from kubetune_trainer.tracking import GuardedCallback, Tracker, Trackers, flatten


class Flaky:
    """A library callback whose server goes away after the first log."""

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any], **kw: Any) -> None:
        if self.logged:
            raise ConnectionError("Connection refused\nretries exhausted")
        self.logged.append(logs)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> str:
        return "control"


class Started(Tracker):
    backend = "mlflow"

    finished = False

    def finish(self, result: Any, artifacts: Any, files: Any) -> None:
        self.finished = True


def test_a_failing_tracker_is_dropped_and_reported_failed() -> None:
    telemetry = Telemetry("ns", "job")
    tracker = Started()
    tracker.run = tracker.run.model_copy(update={"run_id": "r1"})
    trackers = Trackers([tracker], telemetry)
    inner = Flaky()
    guarded = GuardedCallback(inner, trackers._failure_of(tracker))
    assert guarded.on_step_end(None, None, None) == "control"  # results pass through
    guarded.on_log(None, None, None, logs={"loss": 1.0})
    assert guarded.on_log(None, None, None, logs={"loss": 0.9}) is None  # raised inside: swallowed
    guarded.on_log(None, None, None, logs={"loss": 0.8})  # not forwarded any more
    assert inner.logged == [{"loss": 1.0}] and guarded.disabled
    (reported,) = telemetry.progress().tracking or []
    assert reported.state == "failed" and reported.run_id == "r1"
    assert reported.message == "cannot log to mlflow: ConnectionError: Connection refused"
    trackers.finish(None, None, [])
    assert not tracker.finished  # a failed tracker is not asked for the result
    assert (telemetry.progress().tracking or [])[0].state == "failed"


def test_flatten_gives_dotted_parameters() -> None:
    assert flatten({"training": {"learningRate": 0.1, "earlyStopping": {}}, "model": {"source": "s3://m/"}}) == {
        "training.learningRate": 0.1,
        "training.earlyStopping": {},
        "model.source": "s3://m/",
    }
