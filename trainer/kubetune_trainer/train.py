"""One training run, in stages: setup -> train -> save -> cleanup.

The loop is transformers' `Trainer` (TRL's SFTTrainer is a subclass of it; we tokenize, mask and pack
ourselves in `data` so that bad rows fail with file:line and truncation is counted, which leaves
SFTTrainer nothing to add). Callbacks connect it to the run: progress/metrics and one log line per
interval, checkpoint upload after each save, stopping on SIGTERM, early stopping on eval loss.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer import artifacts as art
from kubetune_trainer import checkpoints as ckpt
from kubetune_trainer import data as data_mod
from kubetune_trainer import model as model_mod
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.contract import COMPLETE_MARKER, Artifacts, CheckpointRef, Result
from kubetune_trainer.server import Telemetry
from kubetune_trainer.storage import Storage, join, parse_uri

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How a run ended: succeeded (possibly earlier: already_done) or preempted after a checkpoint."""

    status: str  # succeeded | preempted
    result: Result | None = None
    artifacts: Artifacts | None = None
    checkpoint: CheckpointRef | None = None
    already_done: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None or math.isinf(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# -- factories -------------------------------------------------------------------------------------


def optimizer_name(cfg: TrainerConfig) -> str:
    import torch

    if cfg.training.optimizer != "auto":
        return cfg.training.optimizer
    if torch.cuda.is_available():
        # QLoRA paper: paged optimizers absorb memory spikes on long sequences.
        return "paged_adamw_8bit" if cfg.method.type == "qlora" else "adamw_torch_fused"
    return "adamw_torch"


def training_arguments(cfg: TrainerConfig, output_dir: Path, precision: str, has_eval: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    t = cfg.training
    recompute = model_mod.gradient_checkpointing(t)
    # transformers 5 renamed gradient checkpointing to activation checkpointing (old names warn).
    checkpointing = (
        {
            "activation_checkpointing": recompute,
            "activation_checkpointing_kwargs": {"use_reentrant": False},
        }
        if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        else {
            "gradient_checkpointing": recompute,
            "gradient_checkpointing_kwargs": {"use_reentrant": False},
        }
    )
    return TrainingArguments(
        **checkpointing,
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.effective_epochs() if t.max_steps is None else 1,
        max_steps=t.max_steps or -1,
        optim=optimizer_name(cfg),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=t.seed,
        data_seed=t.seed,
        logging_strategy="steps",
        logging_steps=t.log_every_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_every_steps,
        save_strategy="steps",
        save_steps=t.checkpoint_every_steps,
        save_total_limit=2,  # local copies only; the destination keeps checkpointsToKeep
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )


# -- callbacks -------------------------------------------------------------------------------------


def _make_callback(
    cfg: TrainerConfig, telemetry: Telemetry, stop: ckpt.StopRequest, storage: Storage, dist: Distributed
) -> Any:
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        """Progress, log lines, checkpoint uploads, SIGTERM and early stopping."""

        def __init__(self) -> None:
            self.preempted = False
            self.last_checkpoint: ckpt.Checkpoint | None = None
            self.start_time = time.monotonic()
            self.start_step = 0
            self.last_log = (time.monotonic(), 0)
            self.save_started: float | None = None
            self.best_eval: float | None = None
            self.bad_evals = 0
            self.early_stopped = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.start_time = time.monotonic()
            self.start_step = state.global_step
            self.last_log = (self.start_time, state.num_input_tokens_seen)
            telemetry.update(step=state.global_step, total_steps=state.max_steps)

        def _stop_requested(self) -> bool:
            wanted = stop.requested
            if dist.world_size > 1:
                # Every rank must stop at the same step, or the next collective hangs.
                import torch
                import torch.distributed as torch_dist

                flag = torch.tensor([1.0 if wanted else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
                torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
                wanted = bool(flag.item())
            return wanted

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            telemetry.update(step=state.global_step, epoch=state.epoch)
            if dist.is_main:  # sequences consumed by all ranks in this optimizer step
                per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * dist.world_size
                telemetry.child(telemetry.examples_total).inc(per_step)
            if self._stop_requested():
                self.preempted = True
                control.should_save = True
                control.should_training_stop = True
                control.should_evaluate = False  # the grace period is for the checkpoint
                log.warning("stopping after step %d: saving a checkpoint", state.global_step)
            if control.should_save:
                self.save_started = time.monotonic()
            if control.should_evaluate:
                telemetry.set_stage("evaluating")
            elif control.should_save:
                telemetry.set_stage("checkpointing")

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            logs = logs or {}
            if "loss" not in logs:
                return
            now = time.monotonic()
            tokens = state.num_input_tokens_seen
            tok_rate = (tokens - self.last_log[1]) / max(now - self.last_log[0], 1e-9)
            if dist.is_main:
                telemetry.child(telemetry.tokens_total).inc(max(tokens - self.last_log[1], 0))
            self.last_log = (now, tokens)
            done = state.global_step - self.start_step
            eta = (state.max_steps - state.global_step) * (now - self.start_time) / done if done > 0 else None
            telemetry.update(
                train_loss=logs["loss"],
                learning_rate=logs.get("learning_rate"),
                grad_norm=float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
                eta=_fmt_seconds(eta) if eta is not None else None,
                tokens_per_second=round(tok_rate, 1),
                eta_seconds=round(eta, 1) if eta is not None else None,
            )
            if logs.get("grad_norm") is not None:
                telemetry.child(telemetry.grad_norm).set(float(logs["grad_norm"]))
            if dist.is_main:
                log.info(
                    "train step %d/%d loss %.4f lr %.3g grad_norm %s tok/s %.0f eta %s epoch %.2f",
                    state.global_step,
                    state.max_steps,
                    logs["loss"],
                    logs.get("learning_rate", 0.0),
                    f"{logs['grad_norm']:.3f}" if logs.get("grad_norm") is not None else "-",
                    tok_rate,
                    _fmt_seconds(eta),
                    state.epoch or 0.0,
                )

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kw: Any):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            telemetry.update(eval_loss=loss)
            if self.save_started is not None:  # a save at this step comes after the evaluation
                self.save_started = time.monotonic()
            telemetry.set_stage("checkpointing" if control.should_save else "train")
            if dist.is_main:
                log.info(
                    "eval step %d/%d eval_loss %.4f perplexity %.2f",
                    state.global_step,
                    state.max_steps,
                    loss,
                    math.exp(min(loss, 50)),
                )
            rule = cfg.training.early_stopping
            if rule is None:
                return
            if self.best_eval is None or loss < self.best_eval - rule.threshold:
                self.best_eval, self.bad_evals = loss, 0
            else:
                self.bad_evals += 1
                if self.bad_evals >= rule.patience:
                    log.info("early stopping: eval loss has not improved in %d evaluations", self.bad_evals)
                    self.early_stopped = True
                    control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.save_started is not None:
                telemetry.child(telemetry.checkpoint_save_seconds).observe(time.monotonic() - self.save_started)
            dist.barrier()  # every rank has written its files (rng states are per rank)
            if not dist.is_main:
                telemetry.set_stage("train")
                return
            local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            started = time.monotonic()
            checkpoint, size = ckpt.upload_checkpoint(storage, local, cfg.output.destination, state.global_step)
            seconds = time.monotonic() - started
            telemetry.child(telemetry.checkpoint_upload_seconds).observe(seconds)
            telemetry.child(telemetry.checkpoint_bytes).set(size)
            self.last_checkpoint = checkpoint
            deleted = ckpt.prune_checkpoints(storage, cfg.output.destination, cfg.training.checkpoints_to_keep)
            log.info(
                "checkpoint step %d: %.1f MB uploaded to %s in %.1f s%s",
                state.global_step,
                size / 1e6,
                checkpoint.uri,
                seconds,
                f"; deleted steps {deleted}" if deleted else "",
            )
            telemetry.set_stage("train")

    return RunCallback()


# -- the run ---------------------------------------------------------------------------------------


def _local_model(
    storage: Storage, cfg: TrainerConfig, workdir: Path, dist: Distributed, args: Any, telemetry: Telemetry
) -> Path:
    source = cfg.model.source
    loc = parse_uri(source)
    target = workdir / "model"
    with args.main_process_first(local=True, desc="model download"):
        if loc.scheme == "file":
            path = Path(loc.path)
            if not path.exists():
                from kubetune_trainer.errors import InvalidInput

                raise InvalidInput("ModelNotFound", f"model.source {source} does not exist", field="model.source")
        elif dist.local_rank == 0 and not (target / "config.json").exists():
            log.info("downloading model %s", source)
            telemetry.set_stage("downloading")
            path = storage.download(source if source.endswith("/") or loc.scheme == "hf" else source + "/", target)
        else:
            path = target
    telemetry.set_stage("setup")
    model_mod.check_model_dir(path, source)
    return path


def _rows(storage: Storage, cfg: TrainerConfig, workdir: Path) -> tuple[list[data_mod.Row], list[data_mod.Row]]:
    spec = cfg.dataset
    train_rows = data_mod.load_rows(storage, spec.train, workdir)
    if spec.eval:
        return train_rows, data_mod.load_rows(storage, spec.eval, workdir)
    if not train_rows:
        return train_rows, []
    return data_mod.split_eval(train_rows, spec.eval_split, cfg.training.seed)


def run(
    cfg: TrainerConfig,
    workdir: Path,
    *,
    telemetry: Telemetry | None = None,
    stop: ckpt.StopRequest | None = None,
) -> Outcome:
    """Train as configured, resuming from the newest complete checkpoint at the destination."""
    telemetry = telemetry or Telemetry()
    stop = stop or ckpt.StopRequest()
    dist = Distributed.from_env()
    storage = Storage(cfg.storage)
    destination = cfg.output.destination
    workdir.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars are noise in a pod log

    # setup: cheapest checks first, so a bad input fails before any download.
    telemetry.set_stage("setup")
    storage.check_bucket(destination)
    finished = art.finished_run(storage, destination)
    if finished is not None:
        log.info("%s already holds a finished run (%s); nothing to do", destination, COMPLETE_MARKER)
        return Outcome("succeeded", finished[0], finished[1], already_done=True)
    precision = model_mod.precision(cfg.training)
    if cfg.method.type == "qlora" and (problem := model_mod.bitsandbytes_problem()):
        from kubetune_trainer.errors import InvalidInput

        raise InvalidInput(
            "QuantizationUnavailable",
            f"method.type qlora needs bitsandbytes: {problem}; use method.type lora instead",
            field="method.type",
        )
    # The tokenizer comes with the model, and the data needs the tokenizer.
    rows_train, rows_eval = _rows(storage, cfg, workdir)
    args = training_arguments(cfg, workdir / "trainer", precision, has_eval=bool(rows_eval))
    model_dir = _local_model(storage, cfg, workdir, dist, args, telemetry)
    tokenizer = model_mod.load_tokenizer(model_dir, cfg.model.trust_remote_code)
    train_data = data_mod.tokenize(rows_train, cfg.dataset, tokenizer, name="train")
    eval_data = data_mod.tokenize(rows_eval, cfg.dataset, tokenizer, name="eval") if rows_eval else None
    train_features = data_mod.as_features(train_data.examples, cfg.dataset.max_length, cfg.dataset.packing)
    eval_features = (
        data_mod.as_features(eval_data.examples, cfg.dataset.max_length, cfg.dataset.packing) if eval_data else None
    )
    log.info(
        "data: %d train examples (%d tokens) in %d sequences%s; %d eval examples; precision %s; "
        "gradient checkpointing %s",
        len(train_data.examples),
        train_data.tokens,
        len(train_features),
        " (packed)" if cfg.dataset.packing else "",
        len(eval_data.examples) if eval_data else 0,
        precision,
        "on" if model_mod.gradient_checkpointing(cfg.training) else "off",
    )
    resume = ckpt.latest_checkpoint(storage, destination)
    resume_dir: Path | None = None
    if resume is not None:
        resume_dir = workdir / "resume" / f"checkpoint-{resume.step}"
        with args.main_process_first(local=True, desc="checkpoint download"):
            if dist.local_rank == 0:
                ckpt.download_checkpoint(storage, resume, resume_dir)
        log.info("resuming from step %d (%s)", resume.step, resume.uri)
        telemetry.update(resumed_from_step=resume.step)
    model = model_mod.load_model(model_dir, cfg, precision, device_index=dist.local_rank)
    trainable, total = model_mod.trainable_parameters(model)
    log.info("model: %s, %d of %d parameters trainable", cfg.method.type, trainable, total)
    if stop.requested:
        raise ckpt.Preempted("SIGTERM before training started")
    if cfg.training.early_stopping and not eval_features:
        log.warning("training.earlyStopping needs eval data (dataset.eval or evalSplit > 0); it is off")

    from transformers import PrinterCallback, Trainer

    callback = _make_callback(cfg, telemetry, stop, storage, dist)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_features,
        eval_dataset=eval_features,
        data_collator=data_mod.Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # our callback writes one readable line per interval

    # train
    telemetry.set_stage("train")
    stop.interruptible = False  # from here a SIGTERM means: finish the step, checkpoint, exit 3
    if stop.requested:
        raise ckpt.Preempted("SIGTERM before training started")
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    train_seconds = time.monotonic() - started
    state = trainer.state
    if callback.preempted:
        checkpoint = callback.last_checkpoint
        return Outcome(
            "preempted",
            checkpoint=CheckpointRef(step=checkpoint.step, uri=checkpoint.uri) if checkpoint else None,
        )
    eval_loss = None
    if eval_features:
        evals = [h for h in state.log_history if "eval_loss" in h]
        if evals and evals[-1].get("step") == state.global_step:
            eval_loss = evals[-1]["eval_loss"]
        else:
            eval_loss = trainer.evaluate()["eval_loss"]

    # save
    telemetry.set_stage("save")
    metrics = _metrics(cfg, state, train_data, eval_data, eval_loss, train_seconds, precision, dist, resume, callback)
    outcome = Outcome(
        "succeeded",
        result=Result(
            train_loss=metrics["train_loss"],
            eval_loss=eval_loss,
            perplexity=metrics["perplexity"],
            train_seconds=round(train_seconds, 2),
            trained_tokens=metrics["trained_tokens"],
            steps=state.global_step,
        ),
        metrics=metrics,
    )
    if dist.is_main:
        outcome.artifacts = _save(
            cfg, storage, trainer.model, tokenizer, model_dir, workdir, metrics, outcome, precision, telemetry
        )
    dist.barrier()

    # cleanup
    telemetry.set_stage("cleanup")
    return outcome


def _metrics(
    cfg: TrainerConfig,
    state: Any,
    train_data: data_mod.TokenizedData,
    eval_data: data_mod.TokenizedData | None,
    eval_loss: float | None,
    train_seconds: float,
    precision: str,
    dist: Distributed,
    resume: ckpt.Checkpoint | None,
    callback: Any,
) -> dict[str, Any]:
    import torch

    losses = [
        {"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate")}
        for h in state.log_history
        if "loss" in h
    ]
    evals = [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in state.log_history if "eval_loss" in h]
    if eval_loss is not None and (not evals or evals[-1]["step"] != state.global_step):
        evals.append({"step": state.global_step, "eval_loss": eval_loss})
    steps_here = state.global_step - (resume.step if resume else 0)
    peak_gpu = (
        {str(i): torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}
        if torch.cuda.is_available()
        else {}
    )
    return {
        "method": cfg.method.type,
        "precision": precision,
        "world_size": dist.world_size,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": state.epoch,
        "resumed_from_step": resume.step if resume else None,
        "early_stopped": callback.early_stopped,
        "train_loss": losses[-1]["loss"] if losses else None,
        "first_train_loss": losses[0]["loss"] if losses else None,
        "eval_loss": eval_loss,
        "perplexity": math.exp(min(eval_loss, 50)) if eval_loss is not None else None,
        "loss_history": losses,
        "eval_history": evals,
        "trained_tokens": int(state.num_input_tokens_seen),
        "train_examples": len(train_data.examples),
        "eval_examples": len(eval_data.examples) if eval_data else 0,
        "truncated_examples": train_data.truncated,
        "dropped_examples": train_data.dropped,
        "train_seconds": round(train_seconds, 3),
        "steps_per_second": round(steps_here / train_seconds, 4) if train_seconds > 0 else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_memory_bytes": peak_gpu,
    }


def _save(
    cfg: TrainerConfig,
    storage: Storage,
    model: Any,
    tokenizer: Any,
    model_dir: Path,
    workdir: Path,
    metrics: dict[str, Any],
    outcome: Outcome,
    precision: str,
    telemetry: Telemetry,
) -> Artifacts:
    """Write every artifact locally, upload them, then the final marker (last)."""
    destination = cfg.output.destination
    out = workdir / "output"
    full = cfg.method.type == "full"
    weights_dir = out / ("model" if full else "adapter")
    art.save_weights(model, tokenizer, weights_dir, full=full)
    artifacts = Artifacts(
        adapter=None if full else join(destination, "adapter") + "/",
        # Full fine-tuning: the trained model is the deployable full-weight model, which the contract
        # calls `merged` (there is no adapter to merge).
        merged=join(destination, "model") + "/" if full else None,
        metrics=join(destination, "metrics.json"),
        model_card=join(destination, "README.md"),
    )
    if cfg.evaluation.prompts:
        samples = art.generate_samples(model, tokenizer, cfg)
        (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        artifacts.samples = join(destination, "samples.jsonl")
    if cfg.output.merge_adapter and not full:
        dtype = model_mod.DTYPES["fp32" if precision == "fp32" else precision]
        art.merge_adapter(model_dir, weights_dir, out / "merged", cfg, dtype)
        tokenizer.save_pretrained(out / "merged")
        artifacts.merged = join(destination, "merged") + "/"
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "README.md").write_text(art.model_card(cfg, metrics))
    telemetry.set_stage("uploading")
    storage.upload_dir(out, destination)
    outcome.artifacts = artifacts
    marker = {"result": outcome.result.wire() if outcome.result else None, "artifacts": artifacts.wire()}
    storage.write_bytes(join(destination, COMPLETE_MARKER), json.dumps(marker).encode())
    log.info("artifacts written to %s", destination)
    return artifacts
