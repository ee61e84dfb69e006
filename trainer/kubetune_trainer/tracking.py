"""Experiment tracking (spec.tracking): the run in MLflow and Weights & Biases, through transformers' own
integrations (`MLflowCallback`, `WandbCallback`).

Per-step metrics and the loop's parameters are the library callbacks' work. This module adds what they do
not: it starts each tracker's run itself before the loop (so the run id and URL are known at once and the
run stays open for the final result), logs the whole effective config, and, after training, the final
result, metrics.json and the model card, with the S3 location of the adapter.

A tracker must never cost the run: each one is started, called and finished behind a guard. The first
failure (a server that is down, a refused key) is logged, marks that tracker `failed` in /progress and the
termination message (so in status.tracking), and the tracker is left alone for the rest of the run.
Only rank 0 reports. Credentials come from the standard environment variables (MLFLOW_TRACKING_USERNAME /
_PASSWORD / _TOKEN, WANDB_API_KEY), which the operator fills from Secret references.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.contract import RUN_NAME_ENV, Artifacts, Result, TrackingRun
from kubetune_trainer.server import Telemetry
from kubetune_trainer.storage import join

log = logging.getLogger(__name__)

# MLflow's client retries a refused connection 7 times with a doubling backoff (about two minutes) and waits
# 120 s for an answer; a tracker that is down would stall every logging step that long. A few seconds, then
# the tracker is given up on (the environment can still say otherwise).
MLFLOW_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def flatten(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config as dotted keys (`training.learningRate`), the shape MLflow parameters take."""
    flat: dict[str, Any] = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def final_metrics(result: Result) -> dict[str, float]:
    values = {
        "final/train_loss": result.train_loss,
        "final/eval_loss": result.eval_loss,
        "final/perplexity": result.perplexity,
        "final/train_seconds": result.train_seconds,
        "final/trained_tokens": result.trained_tokens,
        "final/steps": result.steps,
    }
    return {key: float(value) for key, value in values.items() if value is not None}


class Tracker:
    """One tracker's run: started before the loop, its library callback during it, the result after."""

    backend: str = ""

    def __init__(self) -> None:
        self.run = TrackingRun(backend=self.backend, state="reporting")  # type: ignore[arg-type]

    @property
    def failed(self) -> bool:
        return self.run.state == "failed"

    def start(self, cfg: TrainerConfig, run_name: str) -> None:
        raise NotImplementedError

    def callback(self) -> Any:
        raise NotImplementedError

    def finish(self, result: Result | None, artifacts: Artifacts | None, files: list[Path]) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """The run ended without a result (failed, preempted): close the tracker's run as such."""


def _mlflow_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI (the UI's own route); none for a non-HTTP tracking URI."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class MlflowTracker(Tracker):
    backend = "mlflow"

    def start(self, cfg: TrainerConfig, run_name: str) -> None:
        for name, value in MLFLOW_CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
        import mlflow

        spec = cfg.tracking.mlflow
        assert spec is not None
        mlflow.set_tracking_uri(spec.tracking_uri)
        experiment = mlflow.set_experiment(spec.experiment)
        run_id = mlflow.start_run(run_name=spec.run_name or run_name).info.run_id
        self.run = self.run.model_copy(
            update={"run_id": run_id, "url": _mlflow_url(spec.tracking_uri, experiment.experiment_id, run_id)}
        )
        mlflow.log_params({f"kubetune.{k}": _param(v) for k, v in flatten(cfg.trainer_json()).items()})
        mlflow.log_dict(cfg.trainer_json(), "config.json")

    def callback(self) -> Any:
        from transformers.integrations import MLflowCallback

        return MLflowCallback()  # it finds the run started above and logs into it (it does not end it)

    def finish(self, result: Result | None, artifacts: Artifacts | None, files: list[Path]) -> None:
        import mlflow

        if result is not None:
            mlflow.log_metrics(final_metrics(result), step=result.steps or 0)
        if artifacts is not None:
            mlflow.set_tags({f"kubetune.artifacts.{k}": v for k, v in artifacts.wire().items()})
        for path in files:
            mlflow.log_artifact(str(path))
        mlflow.end_run("FINISHED")

    def abort(self) -> None:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run("KILLED")


class WandbTracker(Tracker):
    backend = "wandb"

    def __init__(self, directory: Path, destination: str) -> None:
        super().__init__()
        self.directory = directory
        self.destination = destination
        self._wandb_run: Any = None

    def start(self, cfg: TrainerConfig, run_name: str) -> None:
        import wandb

        spec = cfg.tracking.wandb
        assert spec is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=spec.project,
            entity=spec.entity,
            name=spec.run_name or run_name,
            mode=spec.mode,
            dir=str(self.directory),
            config={"kubetune": cfg.trainer_json()},
        )
        self._wandb_run = run
        run_dir = Path(run.dir).parent  # <directory>/wandb/<offline-run-...>/files
        location = (
            join(self.destination, str(run_dir.relative_to(self.directory))) + "/" if spec.mode == "offline" else None
        )
        self.run = self.run.model_copy(update={"run_id": run.id, "url": run.url or None, "location": location})

    def callback(self) -> Any:
        from transformers.integrations import WandbCallback

        return WandbCallback()  # it finds the run started above (wandb.run) and logs into it

    def finish(self, result: Result | None, artifacts: Artifacts | None, files: list[Path]) -> None:
        run = self._wandb_run
        if result is not None:
            run.summary.update(final_metrics(result))
        if artifacts is not None:
            run.summary.update({f"artifacts/{k}": v for k, v in artifacts.wire().items()})
        for path in files:
            run.save(str(path), base_path=str(path.parent), policy="now")
        run.finish()

    def abort(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=1)


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's limit on a parameter value


class GuardedCallback(TrainerCallback):  # type: ignore[misc]
    """A library callback whose first exception disables it (and marks its tracker failed) instead of
    stopping the training loop."""

    def __init__(self, inner: Any, on_failure: Callable[[BaseException], None]) -> None:
        self.inner = inner
        self.on_failure = on_failure
        self.disabled = False

    def _call(self, event: str, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            return None
        try:
            return getattr(self.inner, event)(*args, **kwargs)
        except Exception as exc:
            self.disabled = True
            self.on_failure(exc)
            return None


def _delegate(event: str) -> Callable[..., Any]:
    def method(self: GuardedCallback, *args: Any, **kwargs: Any) -> Any:
        return self._call(event, *args, **kwargs)

    method.__name__ = event
    return method


for _event in [name for name in vars(TrainerCallback) if name.startswith("on_")]:
    setattr(GuardedCallback, _event, _delegate(_event))


class Trackers:
    """Every tracker of a run (none when spec.tracking is empty or this is not rank 0)."""

    def __init__(self, trackers: list[Tracker], telemetry: Telemetry) -> None:
        self.trackers = trackers
        self.telemetry = telemetry
        self.callbacks: list[GuardedCallback] = []

    @classmethod
    def start(cls, cfg: TrainerConfig, telemetry: Telemetry, workdir: Path, *, is_main: bool) -> Trackers:
        trackers: list[Tracker] = []
        if is_main and cfg.tracking.mlflow is not None:
            trackers.append(MlflowTracker())
        if is_main and cfg.tracking.wandb is not None:
            # Offline, the run directory goes up with the artifacts (output/ is uploaded to the destination).
            where = workdir / ("output" if cfg.tracking.wandb.mode == "offline" else "wandb")
            trackers.append(WandbTracker(where, cfg.output.destination))
        self = cls(trackers, telemetry)
        run_name = os.environ.get(RUN_NAME_ENV) or "kubetune"
        for tracker in trackers:
            if self._guard(tracker, "start a run in", lambda t=tracker: t.start(cfg, run_name)):
                log.info("tracking: %s run %s %s", tracker.backend, tracker.run.run_id, tracker.run.url or "")
                self.callbacks.append(GuardedCallback(tracker.callback(), self._failure_of(tracker)))
        self.report()
        return self

    def _failure_of(self, tracker: Tracker) -> Callable[[BaseException], None]:
        def failed(exc: BaseException) -> None:
            self._fail(tracker, "log to", exc)

        return failed

    def _fail(self, tracker: Tracker, action: str, exc: BaseException) -> None:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = f"cannot {action} {tracker.backend}: {type(exc).__name__}" + (f": {detail}" if detail else "")
        log.warning("tracking: %s; training goes on without it", message)
        tracker.run = tracker.run.model_copy(update={"state": "failed", "message": message[:500]})
        self.report()

    def _guard(self, tracker: Tracker, action: str, call: Callable[[], Any]) -> bool:
        if tracker.failed:
            return False
        try:
            call()
        except Exception as exc:
            self._fail(tracker, action, exc)
            return False
        return True

    def report(self) -> None:
        if self.trackers:
            self.telemetry.update(tracking=[t.run.model_dump() for t in self.trackers])

    def finish(self, result: Result | None, artifacts: Artifacts | None, files: list[Path]) -> None:
        """The final result, artifacts and files; each tracker's run ends as finished."""
        for tracker in self.trackers:
            if self._guard(tracker, "log the result to", lambda t=tracker: t.finish(result, artifacts, files)):
                tracker.run = tracker.run.model_copy(update={"state": "finished"})
        self.report()

    def abort(self) -> None:
        for tracker in self.trackers:
            if not tracker.failed:
                self._guard(tracker, "close the run in", tracker.abort)
