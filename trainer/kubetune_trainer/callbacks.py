"""The callbacks that connect transformers' training loop to the run, one concern each.

`run_callbacks` lists them in the order the loop must call them: a stop request turns the step into a
checkpoint before the checkpoint timer and the progress stage look at `control`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune_trainer import checkpoints as ckpt
from kubetune_trainer.config import EarlyStoppingSpec, TrainerConfig
from kubetune_trainer.contract import format_seconds
from kubetune_trainer.server import Telemetry
from kubetune_trainer.storage import Storage

log = logging.getLogger("kubetune_trainer.train")


class EvalLossCallback(TrainerCallback, ABC):  # type: ignore[misc]
    """A callback that reacts to the eval loss of each evaluation (`on_eval_loss`, which subclasses define)."""

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        loss = (metrics or {}).get("eval_loss")
        if loss is not None:
            self.on_eval_loss(float(loss), state, control)

    @abstractmethod
    def on_eval_loss(self, loss: float, state: Any, control: Any) -> None: ...


class StopOnSignal(TrainerCallback):  # type: ignore[misc]
    """SIGTERM: finish the current step, save a checkpoint, stop (the run then exits 3)."""

    def __init__(self, stop: ckpt.StopRequest, dist: Any) -> None:
        self.stop = stop
        self.dist = dist
        self.preempted = False

    def _requested(self) -> bool:
        wanted = self.stop.requested
        if self.dist.world_size > 1:
            # Every rank must stop at the same step, or the next collective hangs.
            import torch
            import torch.distributed as torch_dist

            flag = torch.tensor([1.0 if wanted else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
            wanted = bool(flag.item())
        return wanted

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._requested():
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # the grace period is for the checkpoint
            log.warning("stopping after step %d: saving a checkpoint", state.global_step)


class CheckpointUpload(EvalLossCallback):
    """Each checkpoint the loop saves goes to the destination (rank 0), then old ones are pruned.

    The upload runs in the background while training goes on, at most one at a time: the next save, and
    the end of training (also a stop's), wait for it, and raise what made it fail. The local copy it reads
    outlives it: transformers keeps the two newest local checkpoints, and the next save waits first.
    """

    def __init__(self, cfg: TrainerConfig, storage: Storage, telemetry: Telemetry, dist: Any) -> None:
        self.cfg = cfg
        self.storage = storage
        self.telemetry = telemetry
        self.dist = dist
        self.last_checkpoint: ckpt.Checkpoint | None = None
        self.save_started: float | None = None
        self._upload: threading.Thread | None = None
        self._failure: BaseException | None = None

    def wait(self) -> None:
        """Until the upload in flight (if any) is done; re-raises its failure."""
        if self._upload is not None:
            started = time.monotonic()
            self._upload.join()
            self._upload = None
            if (stalled := time.monotonic() - started) > 0.1:
                log.info("waited %.1f s for the checkpoint upload", stalled)
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.wait()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if control.should_save:
            self.save_started = time.monotonic()

    def on_eval_loss(self, loss: float, state: Any, control: Any) -> None:
        if self.save_started is not None:  # a save at this step comes after the evaluation
            self.save_started = time.monotonic()

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        telemetry = self.telemetry
        if self.save_started is not None:
            telemetry.child(telemetry.checkpoint_save_seconds).observe(time.monotonic() - self.save_started)
        self.dist.barrier()  # every rank has written its files (rng states are per rank)
        if not self.dist.is_main:
            telemetry.set_stage("train")
            return
        self.wait()
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self._upload = threading.Thread(
            target=self._upload_in_background, args=(local, state.global_step), name="kubetune-checkpoint-upload"
        )
        self._upload.start()
        telemetry.set_stage("train")

    def _upload_in_background(self, local: Path, step: int) -> None:
        try:
            self._upload_now(local, step)
        except BaseException as failure:  # raised in the loop's thread by wait()
            self._failure = failure

    def _upload_now(self, local: Path, step: int) -> None:
        telemetry = self.telemetry
        destination = self.cfg.output.destination
        started = time.monotonic()
        checkpoint, size = ckpt.upload_checkpoint(self.storage, local, destination, step)
        seconds = time.monotonic() - started
        telemetry.child(telemetry.checkpoint_upload_seconds).observe(seconds)
        telemetry.child(telemetry.checkpoint_bytes).set(size)
        self.last_checkpoint = checkpoint
        deleted = ckpt.prune_checkpoints(self.storage, destination, self.cfg.training.checkpoints_to_keep)
        log.info(
            "checkpoint step %d: %.1f MB uploaded to %s in %.1f s%s",
            step,
            size / 1e6,
            checkpoint.uri,
            seconds,
            f"; deleted steps {deleted}" if deleted else "",
        )


class ProgressReport(EvalLossCallback):
    """/progress, the metrics, and one log line per logging interval and per evaluation."""

    def __init__(self, telemetry: Telemetry, dist: Any) -> None:
        self.telemetry = telemetry
        self.dist = dist
        self.last_log = (time.monotonic(), 0)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.last_log = (time.monotonic(), state.num_input_tokens_seen)
        self.telemetry.update(step=state.global_step, total_steps=state.max_steps)
        self.telemetry.step_done(state.global_step, state.max_steps, start=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        telemetry = self.telemetry
        telemetry.update(step=state.global_step, epoch=state.epoch)
        telemetry.step_done(state.global_step, state.max_steps)
        if self.dist.is_main:  # sequences consumed by all ranks in this optimizer step
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * self.dist.world_size
            telemetry.child(telemetry.examples).inc(per_step)
        if control.should_evaluate:
            telemetry.set_stage("evaluating")
        elif control.should_save:
            telemetry.set_stage("checkpointing")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        logs = logs or {}
        if "loss" not in logs:
            return
        telemetry = self.telemetry
        now = time.monotonic()
        tokens = state.num_input_tokens_seen
        tok_rate = (tokens - self.last_log[1]) / max(now - self.last_log[0], 1e-9)
        if self.dist.is_main:
            telemetry.child(telemetry.tokens).inc(max(tokens - self.last_log[1], 0))
        self.last_log = (now, tokens)
        eta = telemetry.eta_seconds()
        grad_norm = float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None
        telemetry.update(
            train_loss=logs["loss"],
            learning_rate=logs.get("learning_rate"),
            grad_norm=grad_norm,
            eta=format_seconds(eta) if eta is not None else None,
            tokens_per_second=round(tok_rate, 1),
            eta_seconds=round(eta, 1) if eta is not None else None,
        )
        logs["tokens_per_second"] = round(tok_rate, 1)  # for the trackers' callbacks, which come after this one
        if self.dist.is_main:
            log.info(
                "train step %d/%d loss %.4f lr %.3g grad_norm %s tok/s %.0f eta %s epoch %.2f",
                state.global_step,
                state.max_steps,
                logs["loss"],
                logs.get("learning_rate", 0.0),
                f"{grad_norm:.3f}" if grad_norm is not None else "-",
                tok_rate,
                format_seconds(eta),
                state.epoch or 0.0,
            )

    def on_eval_loss(self, loss: float, state: Any, control: Any) -> None:
        self.telemetry.update(eval_loss=loss)
        self.telemetry.evaluated(state.global_step, eval_loss=loss)
        self.telemetry.set_stage("checkpointing" if control.should_save else "train")
        if self.dist.is_main:
            log.info(
                "eval step %d/%d eval_loss %.4f perplexity %.2f",
                state.global_step,
                state.max_steps,
                loss,
                math.exp(min(loss, 50)),
            )


class EarlyStopping(EvalLossCallback):
    """training.earlyStopping: stop when the eval loss has not improved for `patience` evaluations."""

    def __init__(self, rule: EarlyStoppingSpec) -> None:
        self.rule = rule
        self.best_eval: float | None = None
        self.bad_evals = 0
        self.early_stopped = False

    def on_eval_loss(self, loss: float, state: Any, control: Any) -> None:
        if self.best_eval is None or loss < self.best_eval - self.rule.threshold:
            self.best_eval, self.bad_evals = loss, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.rule.patience:
            log.info("early stopping: eval loss has not improved in %d evaluations", self.bad_evals)
            self.early_stopped = True
            control.should_training_stop = True


@dataclass
class RunCallbacks:
    """The run's callbacks, kept by name so the run can read what they saw."""

    stop: StopOnSignal
    checkpoints: CheckpointUpload
    progress: ProgressReport
    early_stopping: EarlyStopping | None

    def in_order(self) -> list[TrainerCallback]:
        ordered = [self.stop, self.checkpoints, self.progress]
        return [*ordered, self.early_stopping] if self.early_stopping is not None else ordered

    @property
    def early_stopped(self) -> bool:
        return self.early_stopping is not None and self.early_stopping.early_stopped


def run_callbacks(
    cfg: TrainerConfig, telemetry: Telemetry, stop: ckpt.StopRequest, storage: Storage, dist: Any
) -> RunCallbacks:
    rule = cfg.training.early_stopping
    return RunCallbacks(
        stop=StopOnSignal(stop, dist),
        checkpoints=CheckpointUpload(cfg, storage, telemetry, dist),
        progress=ProgressReport(telemetry, dist),
        early_stopping=EarlyStopping(rule) if rule is not None else None,
    )
