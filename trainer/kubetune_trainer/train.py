"""One training run, in stages: setup -> train -> save -> cleanup.

The loop is transformers' `Trainer` (TRL's SFTTrainer is a subclass of it; we tokenize, mask and pack
ourselves in `data` so that bad rows fail with file:line and truncation is counted, which leaves
SFTTrainer nothing to add). The callbacks in `callbacks` connect it to the run: progress/metrics and one
log line per interval, checkpoint upload after each save, stopping on SIGTERM, early stopping on eval loss.
`run` is the recipe: `hold_destination` (one trainer at a time), `claim_destination` (this run's, or
nobody's?), `finished_outcome` (nothing to do?), `setup`, `train`, `save`, `cleanup`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer import artifacts as art
from kubetune_trainer import checkpoints as ckpt
from kubetune_trainer import data as data_mod
from kubetune_trainer import destination as destination_mod
from kubetune_trainer import model as model_mod
from kubetune_trainer import speedups
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.contract import (
    COMPLETE_MARKER,
    DISK_BYTES_ENV,
    EXIT_FAILED,
    RUN_NAME_ENV,
    RUN_NAMESPACE_ENV,
    Artifacts,
    CheckpointRef,
    Result,
)
from kubetune_trainer.objectives import LoopParts, Objective, objective_for
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


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# -- factories -------------------------------------------------------------------------------------


def optimizer_name(cfg: TrainerConfig, *, cuda: bool | None = None) -> str:
    import torch

    if cfg.training.optimizer != "auto":
        return cfg.training.optimizer
    if torch.cuda.is_available() if cuda is None else cuda:
        # QLoRA paper: paged optimizers absorb memory spikes on long sequences.
        return "paged_adamw_8bit" if cfg.method.type == "qlora" else "adamw_torch_fused"
    return "adamw_torch"


def training_arguments(cfg: TrainerConfig, output_dir: Path, precision: str, has_eval: bool) -> Any:
    """The loop's TrainingArguments (the objective's class, e.g. TRL's DPOConfig, with its settings on top)."""
    import torch

    args_class, objective_settings = objective_for(cfg).arguments()
    return args_class(
        **_checkpointing_arguments(args_class, model_mod.gradient_checkpointing(cfg.training)),
        **objective_settings,
        **_optimization_arguments(cfg),
        **_loop_arguments(cfg, has_eval),
        output_dir=str(output_dir),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
    )


def _checkpointing_arguments(args_class: type, recompute: bool) -> dict[str, Any]:
    # transformers 5 renamed gradient checkpointing to activation checkpointing (old names warn).
    fields = getattr(args_class, "__dataclass_fields__", {})
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: recompute, f"{name}_kwargs": {"use_reentrant": False}}


def _optimization_arguments(cfg: TrainerConfig) -> dict[str, Any]:
    """Batches, the optimizer and its schedule, the length of the run."""
    t = cfg.training
    return {
        "per_device_train_batch_size": cfg.micro_batch_size(),
        "per_device_eval_batch_size": cfg.micro_batch_size(),
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "num_train_epochs": t.effective_epochs() if t.max_steps is None else 1,
        "max_steps": t.max_steps or -1,
        "optim": optimizer_name(cfg),
        "seed": t.seed,
        "data_seed": t.seed,
    }


def _loop_arguments(cfg: TrainerConfig, has_eval: bool) -> dict[str, Any]:
    """When the loop logs, evaluates and saves, and what it leaves to kubetune (reports, columns, workers)."""
    t = cfg.training
    return {
        "logging_strategy": "steps",
        "logging_steps": t.log_every_steps,
        "logging_first_step": True,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": t.eval_every_steps,
        "save_strategy": "steps",
        "save_steps": t.checkpoint_every_steps,
        "save_total_limit": 2,  # local copies only; the destination keeps checkpointsToKeep
        "report_to": "none",
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "include_num_input_tokens_seen": "non_padding",
        "ddp_find_unused_parameters": False,
        "dataloader_num_workers": 0,
    }


# -- the stages ------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every stage reads: the config and the run's surroundings."""

    cfg: TrainerConfig
    workdir: Path
    storage: Storage
    telemetry: Telemetry
    stop: ckpt.StopRequest
    dist: Distributed


@dataclass
class Prepared:
    """What setup builds, for train and save."""

    objective: Objective
    precision: str
    model_dir: Path
    tokenizer: Any
    train_data: Any  # data.TokenizedData (sft) or preference.PreferenceData (dpo)
    eval_data: Any
    has_eval: bool
    resume: ckpt.Checkpoint | None
    resume_dir: Path | None
    trainer: Any
    callbacks: Any  # callbacks.RunCallbacks (that module imports transformers)
    trackers: Any = None  # tracking.Trackers: MLflow and W&B runs (spec.tracking)


@dataclass(frozen=True)
class Data:
    """The data stage's result: tokenized rows and the loop's features built from them."""

    train: Any
    eval: Any
    train_features: Any
    eval_features: Any


@dataclass
class Trained:
    """What the train stage leaves: the loop's state and the final eval loss (and the base model's)."""

    state: Any
    train_seconds: float
    eval_loss: float | None
    base_eval_loss: float | None = None


def _local_model(ctx: Context, args: Any, source: str | None = None, name: str = "model") -> Path:
    """The model at `source` (default: model.source) as a local directory, downloaded into workdir/`name`."""
    dist, telemetry = ctx.dist, ctx.telemetry
    source = source or ctx.cfg.model.source
    loc = parse_uri(source)
    target = ctx.workdir / name
    with args.main_process_first(local=True, desc="model download"):
        if loc.scheme == "file":
            path = Path(loc.path)
            if not path.exists():
                from kubetune_trainer.errors import InvalidInput

                raise InvalidInput("ModelNotFound", f"model.source {source} does not exist", field="model.source")
        elif dist.local_rank == 0:
            prefix = source if source.endswith("/") or loc.scheme == "hf" else source + "/"
            version = ctx.storage.version(prefix)
            if _cached_model_version(target) == version:
                path = target
            else:
                _refuse_a_model_the_disk_cannot_hold(ctx.storage, source)
                log.info("downloading model %s", source)
                telemetry.set_stage("downloading")
                path = _download_model(ctx.storage, prefix, target, version)
        else:
            path = target
    telemetry.set_stage("setup")
    model_mod.check_model_dir(path, source)
    return path


def _refuse_a_model_the_disk_cannot_hold(storage: Storage, source: str) -> None:
    budget = os.environ.get(DISK_BYTES_ENV)
    size = storage.size(source if source.endswith("/") else source + "/") if budget else None
    if budget and size is not None and size > int(budget):
        from kubetune_trainer.errors import InvalidInput

        gib = 1024**3
        raise InvalidInput(
            "DiskTooSmall",
            f"model.source {source} is {size / gib:.1f} GiB, more than the pod's local disk "
            f"(spec.resources.disk, {int(budget) / gib:.1f} GiB) holds: raise spec.resources.disk "
            "(`kubetune plan` says how much the run needs)",
            field="model.source",
        )


def _cached_model_version(target: Path) -> str | None:
    """The version (`Storage.version`) of the model cached in `target`, None without a complete one. The cache
    follows the spec: a changed model.source, or changed files at the same S3 prefix, is downloaded again (a
    cache of another model trained an adapter that did not load on this one)."""
    try:
        recorded = json.loads((target / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None  # no marker, or an empty one from before the cache was keyed: download again
    return recorded.get("version") if isinstance(recorded, dict) else None


def _download_model(storage: Storage, source: str, target: Path, version: str) -> Path:
    """The model in `target`, complete or not at all: it is fetched into a fresh directory beside it, which
    gets the marker (naming the version fetched) and is then renamed into place (a kill mid-download leaves
    only the partial directory, which the next attempt starts again)."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    fetched = storage.download(source, partial)
    if fetched.resolve() != partial.resolve():  # the Hub client may hand back a directory of its own
        shutil.copytree(fetched, partial, dirs_exist_ok=True)
    (partial / COMPLETE_MARKER).write_text(json.dumps({"source": source, "version": version}))
    shutil.rmtree(target, ignore_errors=True)  # a cache from before the marker, maybe partial
    partial.rename(target)
    return target


def claim_destination(ctx: Context) -> None:
    """The destination holds this run or none (`destination.claim`), before any download. Rank 0 speaks for
    the run."""
    if ctx.dist.is_main:
        destination_mod.claim(ctx.storage, ctx.cfg)


def finished_outcome(ctx: Context) -> Outcome | None:
    """The outcome of this run if it already finished at this destination, or None."""
    destination = ctx.cfg.output.destination
    finished = art.finished_run(ctx.storage, destination)
    if finished is None:
        return None
    log.info("%s already holds a finished run (%s); nothing to do", destination, COMPLETE_MARKER)
    return Outcome("succeeded", finished[0], finished[1], already_done=True)


def setup(ctx: Context) -> Prepared:
    """Everything the loop needs, in the order it depends: data rows (fail fast on bad input), the model
    directory and its tokenizer (the data needs the tokenizer), the data's tokens, the checkpoint to resume,
    the model, the callbacks and trackers, the loop."""
    cfg, objective = ctx.cfg, objective_for(ctx.cfg)
    precision = model_mod.precision(cfg.training)
    model_mod.require_bitsandbytes(cfg.method)  # before any download
    rows_train, rows_eval = data_mod.train_eval_rows(ctx.storage, cfg.dataset, cfg.training.seed, ctx.workdir)
    args = training_arguments(cfg, ctx.workdir / "trainer", precision, has_eval=bool(rows_eval))
    model_dir = _local_model(ctx, args)
    tokenizer = model_mod.load_tokenizer(model_dir, cfg.model.trust_remote_code)
    data = _setup_data(ctx, objective, tokenizer, (rows_train, rows_eval), precision)
    resume, resume_dir = _setup_resume(ctx, args)
    model = _setup_model(ctx, objective, model_dir, precision, has_eval=bool(data.eval_features))
    callbacks, trackers = _setup_callbacks(ctx)
    parts = LoopParts(
        args=args,
        model=model,
        tokenizer=tokenizer,
        train_features=data.train_features,
        eval_features=data.eval_features,
        run_callbacks=callbacks.in_order(),
        trackers=trackers.callbacks,
        precision=precision,
        telemetry=ctx.telemetry,
        dist=ctx.dist,
        fetch_model=lambda source, name: _local_model(ctx, args, source, name),
    )
    return Prepared(
        objective=objective,
        precision=precision,
        model_dir=model_dir,
        tokenizer=tokenizer,
        train_data=data.train,
        eval_data=data.eval,
        has_eval=bool(data.eval_features),
        resume=resume,
        resume_dir=resume_dir,
        trainer=_setup_trainer(ctx, objective, parts),
        callbacks=callbacks,
        trackers=trackers,
    )


def _setup_data(
    ctx: Context,
    objective: Objective,
    tokenizer: Any,
    rows: tuple[list[data_mod.Row], list[data_mod.Row]],
    precision: str,
) -> Data:
    """The rows as tokens (bad rows fail with file:line) and as the loop's features."""
    rows_train, rows_eval = rows
    train_data = objective.tokenize(rows_train, tokenizer, "train")
    eval_data = objective.tokenize(rows_eval, tokenizer, "eval") if rows_eval else None
    data = Data(
        train_data,
        eval_data,
        objective.features(train_data),
        objective.features(eval_data) if eval_data else None,
    )
    log.info(
        "data: %d train %s (%d tokens) in %d sequences%s; %d eval; precision %s; gradient checkpointing %s",
        len(train_data.examples),
        objective.unit,
        train_data.tokens,
        len(data.train_features),
        objective.layout(),
        len(eval_data.examples) if eval_data else 0,
        precision,
        "on" if model_mod.gradient_checkpointing(ctx.cfg.training) else "off",
    )
    return data


def _setup_resume(ctx: Context, args: Any) -> tuple[ckpt.Checkpoint | None, Path | None]:
    """The newest complete checkpoint at the destination, downloaded (None, None: a fresh start)."""
    resume = ckpt.latest_checkpoint(ctx.storage, ctx.cfg.output.destination)
    if resume is None:
        return None, None
    resume_dir = ctx.workdir / "resume" / f"checkpoint-{resume.step}"
    with args.main_process_first(local=True, desc="checkpoint download"):
        if ctx.dist.local_rank == 0:
            ckpt.download_checkpoint(ctx.storage, resume, resume_dir)
    log.info("resuming from step %d (%s)", resume.step, resume.uri)
    # /progress (and so status.progress) shows where the run stands from now, not step 0 until the loop.
    planned = _planned_steps(args, resume_dir)
    ctx.telemetry.update(resumed_from_step=resume.step, step=resume.step, total_steps=planned)
    return resume, resume_dir


def _setup_model(ctx: Context, objective: Objective, model_dir: Path, precision: str, *, has_eval: bool) -> Any:
    """The model to train (with its adapter unless the objective's trainer adds it)."""
    cfg = ctx.cfg
    model = model_mod.load_model(
        model_dir, cfg, precision, device_index=ctx.dist.local_rank, with_adapter=objective.adapter_in_model
    )
    if ctx.stop.requested:
        raise ckpt.Preempted("SIGTERM before training started")
    if cfg.training.early_stopping and not has_eval:
        log.warning("training.earlyStopping needs eval data (dataset.eval or evalSplit > 0); it is off")
    return model


def _setup_callbacks(ctx: Context) -> tuple[Any, Any]:
    """The run's callbacks (progress, checkpoints, SIGTERM, early stopping) and its trackers (MLflow, W&B)."""
    from kubetune_trainer.callbacks import run_callbacks
    from kubetune_trainer.tracking import Trackers

    callbacks = run_callbacks(ctx.cfg, ctx.telemetry, ctx.stop, ctx.storage, ctx.dist)
    trackers = Trackers.start(ctx.cfg, ctx.telemetry, ctx.workdir, is_main=ctx.dist.is_main)
    return callbacks, trackers


def _setup_trainer(ctx: Context, objective: Objective, parts: LoopParts) -> Any:
    """The objective's loop, with one readable log line per interval instead of transformers' printer."""
    from transformers import PrinterCallback

    trainer = objective.trainer(parts)
    trainer.remove_callback(PrinterCallback)  # ProgressReport writes one readable line per interval
    trainable, total = model_mod.trainable_parameters(trainer.model)
    log.info(
        "model: %s, objective %s, %d of %d parameters trainable",
        ctx.cfg.method.type,
        ctx.cfg.objective.type,
        trainable,
        total,
    )
    return trainer


def train(ctx: Context, prepared: Prepared) -> Trained:
    """The loop, from the resumed step to the end (or to the checkpoint a SIGTERM asks for)."""
    ctx.telemetry.set_stage("train")
    ctx.stop.interruptible = False  # from here a SIGTERM means: finish the step, checkpoint, exit 3
    if ctx.stop.requested:
        raise ckpt.Preempted("SIGTERM before training started")
    trainer = prepared.trainer
    started = time.monotonic()
    if prepared.resume_dir is not None and _training_done(trainer.args, prepared.resume_dir):
        # A run cut short in its final save: the loop would take one step past the end (transformers
        # always runs one), so the checkpoint's weights and state are loaded and the run goes on to save.
        log.info("checkpoint step %d is the last step: going straight to saving", prepared.resume.step)
        _load_finished_checkpoint(trainer, prepared.resume_dir)
    else:
        trainer.train(resume_from_checkpoint=str(prepared.resume_dir) if prepared.resume_dir else None)
    train_seconds = time.monotonic() - started
    state = trainer.state
    eval_loss = None
    if prepared.has_eval and not prepared.callbacks.stop.preempted:
        evals = [h for h in state.log_history if "eval_loss" in h]
        if evals and evals[-1].get("step") == state.global_step:
            eval_loss = evals[-1]["eval_loss"]
        else:
            eval_loss = trainer.evaluate()["eval_loss"]
    # DPO's base is its reference policy, against which its eval loss is already measured.
    measure_base = eval_loss is not None and prepared.objective.language_model_loss
    base_loss = art.base_eval_loss(trainer) if measure_base else None
    return Trained(state, train_seconds, eval_loss, base_loss)


def _checkpoint_state(checkpoint_dir: Path) -> dict[str, Any]:
    from transformers.trainer import TRAINER_STATE_NAME

    path = checkpoint_dir / TRAINER_STATE_NAME
    state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return state


def _planned_steps(args: Any, checkpoint_dir: Path) -> int | None:
    """The steps the run takes: training.maxSteps, else what the loop computed from epochs (in the state)."""
    if args.max_steps > 0:
        return int(args.max_steps)
    planned = _checkpoint_state(checkpoint_dir).get("max_steps")
    return int(planned) if planned else None


def _training_done(args: Any, checkpoint_dir: Path) -> bool:
    planned = _planned_steps(args, checkpoint_dir)
    return planned is not None and int(_checkpoint_state(checkpoint_dir).get("global_step", 0)) >= planned


def _load_finished_checkpoint(trainer: Any, checkpoint_dir: Path) -> None:
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_callback import TrainerState

    trainer._load_from_checkpoint(str(checkpoint_dir))
    trainer.state = TrainerState.load_from_json(str(checkpoint_dir / TRAINER_STATE_NAME))


def save(ctx: Context, prepared: Prepared, trained: Trained) -> Outcome:
    """The numbers, and (rank 0) the artifacts at the destination with the final marker last."""
    ctx.telemetry.set_stage("save")
    speedups.for_generation(prepared.trainer.model)  # samples are generated outside autocast, with no gradients
    state, eval_loss = trained.state, trained.eval_loss
    metrics = _metrics(ctx, prepared, trained)
    outcome = Outcome(
        "succeeded",
        result=Result(
            train_loss=metrics["train_loss"],
            eval_loss=eval_loss,
            perplexity=metrics["perplexity"],
            train_seconds=round(trained.train_seconds, 2),
            trained_tokens=metrics["trained_tokens"],
            steps=state.global_step,
            reward_accuracy=metrics.get("reward_accuracy"),
            reward_margin=metrics.get("reward_margin"),
        ),
        metrics=metrics,
    )
    if ctx.dist.is_main:
        outcome.artifacts = _write_artifacts(ctx, prepared, metrics, outcome)
    ctx.dist.barrier()
    return outcome


def cleanup(ctx: Context) -> None:
    """Nothing is left to release: the loop, the model and the servers' state go with the process."""
    ctx.telemetry.set_stage("cleanup")


def run(
    cfg: TrainerConfig,
    workdir: Path,
    *,
    telemetry: Telemetry | None = None,
    stop: ckpt.StopRequest | None = None,
) -> Outcome:
    """Train as configured, resuming from the newest complete checkpoint at the destination."""
    workdir.mkdir(parents=True, exist_ok=True)
    speedups.return_freed_memory()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars are noise in a pod log
    ctx = Context(
        cfg, workdir, Storage(cfg.storage), telemetry or Telemetry(), stop or ckpt.StopRequest(), Distributed.from_env()
    )
    ctx.storage.on_retry = lambda problem: ctx.telemetry.update(storage_retry=problem)
    ctx.storage.cancel_downloads = ctx.stop.event
    ctx.telemetry.set_stage("setup")
    ctx.storage.check_bucket(cfg.output.destination)  # cheapest first: a bad destination fails before anything
    lease = hold_destination(ctx)
    try:
        return _run_holding(ctx)
    finally:
        if lease is not None:
            lease.release()


def hold_destination(ctx: Context) -> destination_mod.Lease | None:
    """Rank 0 holds the destination's lease (`destination.Lease`) for the whole run, before it reads or writes
    anything there; the other ranks follow rank 0."""
    if not ctx.dist.is_main:
        return None
    job = f"{os.environ.get(RUN_NAMESPACE_ENV, 'local')}/{os.environ.get(RUN_NAME_ENV, 'run')}"
    lease = destination_mod.Lease(ctx.storage, ctx.cfg.output.destination, f"{job} in {ctx.workdir}")

    def lost(taker: destination_mod.Holder | None) -> None:
        # Another trainer writes the destination now: anything this one writes could be taken for its work.
        log.error("stopping at once: the destination's lease went to %s", taker.name if taker else "nobody")
        logging.shutdown()
        os._exit(EXIT_FAILED)

    lease.on_lost = lost
    lease.acquire(on_wait=lambda message: log.warning("%s", message))
    return lease


def _run_holding(ctx: Context) -> Outcome:
    claim_destination(ctx)
    finished = finished_outcome(ctx)
    if finished is not None:
        return finished
    prepared = setup(ctx)
    try:
        trained = train(ctx, prepared)
    except BaseException:
        prepared.trackers.abort()
        raise
    if prepared.callbacks.stop.preempted:
        prepared.trackers.abort()
        checkpoint = prepared.callbacks.checkpoints.last_checkpoint
        return Outcome(
            "preempted",
            checkpoint=CheckpointRef(step=checkpoint.step, uri=checkpoint.uri) if checkpoint else None,
        )
    outcome = save(ctx, prepared, trained)
    cleanup(ctx)
    return outcome


def _metrics(ctx: Context, prepared: Prepared, trained: Trained) -> dict[str, Any]:
    """metrics.json: the run's settings, its losses and their history, its data and what it cost."""
    cfg, dist, state, eval_loss = ctx.cfg, ctx.dist, trained.state, trained.eval_loss
    resumed_from = prepared.resume.step if prepared.resume else None
    losses, evals = _loss_histories(state, eval_loss)
    return {
        "method": cfg.method.type,
        "objective": cfg.objective.type,
        **prepared.objective.metrics(state.log_history),
        "precision": prepared.precision,
        "world_size": dist.world_size,
        # Sequences (packed rows with packing) per optimizer step across every process of every node.
        "global_batch_size": cfg.micro_batch_size() * cfg.training.gradient_accumulation_steps * dist.world_size,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": state.epoch,
        "resumed_from_step": resumed_from,
        "early_stopped": prepared.callbacks.early_stopped,
        "train_loss": losses[-1]["loss"] if losses else None,
        "first_train_loss": losses[0]["loss"] if losses else None,
        "eval_loss": eval_loss,
        "base_eval_loss": trained.base_eval_loss,  # the same eval data through the base model (adapter off)
        # The DPO loss is no language-model loss: exp() of it is no perplexity.
        "perplexity": (
            math.exp(min(eval_loss, 50)) if eval_loss is not None and prepared.objective.language_model_loss else None
        ),
        "loss_history": losses,
        "eval_history": evals,
        "trained_tokens": int(state.num_input_tokens_seen),
        "train_examples": len(prepared.train_data.examples),
        "eval_examples": len(prepared.eval_data.examples) if prepared.eval_data else 0,
        "truncated_examples": prepared.train_data.truncated,
        "dropped_examples": prepared.train_data.dropped,
        **_cost(trained, state.global_step - (resumed_from or 0)),
    }


def _loss_histories(state: Any, eval_loss: float | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The logged train losses (with the learning rate) and eval losses, the final eval's included."""
    losses = [
        {"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate")}
        for h in state.log_history
        if "loss" in h
    ]
    evals = [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in state.log_history if "eval_loss" in h]
    if eval_loss is not None and (not evals or evals[-1]["step"] != state.global_step):
        evals.append({"step": state.global_step, "eval_loss": eval_loss})
    return losses, evals


def _cost(trained: Trained, steps_here: int) -> dict[str, Any]:
    """Time, speed and peak memory of this process's part of the run (`steps_here`: the steps it took)."""
    import torch

    seconds = trained.train_seconds
    return {
        "train_seconds": round(seconds, 3),
        "steps_per_second": round(steps_here / seconds, 4) if seconds > 0 and steps_here > 0 else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_memory_bytes": (
            {str(i): torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}
            if torch.cuda.is_available()
            else {}
        ),
    }


def _write_artifacts(ctx: Context, prepared: Prepared, metrics: dict[str, Any], outcome: Outcome) -> Artifacts:
    """Write every artifact locally, upload them, then the final marker (last)."""
    cfg, storage, telemetry = ctx.cfg, ctx.storage, ctx.telemetry
    model, tokenizer, precision = prepared.trainer.model, prepared.tokenizer, prepared.precision
    destination = cfg.output.destination
    out = ctx.workdir / "output"
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
        chat = bool(getattr(prepared.train_data, "conversational", False))  # preference rows as message lists
        samples = art.generate_samples(model, tokenizer, cfg, chat=chat)
        (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        artifacts.samples = join(destination, "samples.jsonl")
    if cfg.output.merge_adapter and not full:
        dtype = model_mod.DTYPES["fp32" if precision == "fp32" else precision]
        art.merge_adapter(prepared.model_dir, weights_dir, out / "merged", cfg, dtype)
        tokenizer.save_pretrained(out / "merged")
        artifacts.merged = join(destination, "merged") + "/"
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "README.md").write_text(art.model_card(cfg, metrics))
    # Before the upload: a W&B offline run directory (under out/wandb/) goes up with the artifacts.
    prepared.trackers.finish(outcome.result, artifacts, [out / "metrics.json", out / "README.md"])
    telemetry.set_stage("uploading")
    storage.upload_dir(out, destination)
    outcome.artifacts = artifacts
    marker = {"result": outcome.result.wire() if outcome.result else None, "artifacts": artifacts.wire()}
    storage.write_bytes(join(destination, COMPLETE_MARKER), json.dumps(marker).encode())
    log.info("artifacts written to %s", destination)
    return artifacts
