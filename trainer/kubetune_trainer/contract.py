"""The trainer's side of the operator-trainer contract (DESIGN.md, "Contracts"), as typed models.

Pure pydantic like `config`: the operator imports these to read `/progress` and the termination message,
and embeds Progress, Result and Artifacts in the FineTuneJob status.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetune_trainer.config import ApiModel

# Exit codes the Job's podFailurePolicy acts on.
EXIT_OK = 0
EXIT_INVALID_INPUT = 2  # bad config, dataset, model or bucket: fail the Job at once, no retries
EXIT_PREEMPTED = 3  # stopped on SIGTERM after saving a checkpoint: retried without counting against backoffLimit

CONFIG_PATH = "/etc/kubetune/config.json"
TERMINATION_LOG = "/dev/termination-log"
METRICS_PORT = 9400

Stage = Literal["setup", "downloading", "training", "evaluating", "checkpointing", "uploading", "done", "failed"]


class Progress(ApiModel):
    """Live progress of a run, served by the trainer at /progress and mirrored into status.progress."""

    stage: Stage | None = Field(default=None, description="What the trainer is doing now.")
    step: int | None = Field(default=None, ge=0, description="Optimizer steps completed.")
    total_steps: int | None = Field(default=None, ge=0, description="Optimizer steps the run will take.")
    percent: float | None = Field(default=None, ge=0, le=100, description="step / totalSteps, in percent.")
    epoch: float | None = Field(default=None, ge=0, description="Epochs completed (fractional).")
    train_loss: float | None = Field(default=None, description="Training loss over the last logging interval.")
    eval_loss: float | None = Field(default=None, description="Latest evaluation loss.")
    learning_rate: float | None = Field(default=None, ge=0, description="Current learning rate.")
    grad_norm: float | None = Field(default=None, ge=0, description="Gradient norm at the last logged step.")
    tokens_per_second: float | None = Field(default=None, ge=0, description="Training throughput (real tokens).")
    eta_seconds: int | None = Field(default=None, ge=0, description="Estimated seconds until training ends.")
    eta: str | None = Field(default=None, description="etaSeconds for humans, e.g. 1h02m (the ETA column).")
    updated_at: str | None = Field(default=None, description="When the trainer last updated this (RFC 3339).")


class Checkpoint(ApiModel):
    """The newest complete checkpoint."""

    step: int = Field(ge=0, description="Optimizer step the checkpoint was taken at.")
    uri: str = Field(description="Where it is.")


class Result(ApiModel):
    """Final numbers of a finished run."""

    train_loss: float | None = Field(default=None, description="Mean training loss over the last logging interval.")
    eval_loss: float | None = Field(default=None, description="Final evaluation loss.")
    perplexity: float | None = Field(default=None, ge=0, description="exp(evalLoss).")
    train_seconds: float | None = Field(default=None, ge=0, description="Wall time spent training.")
    trained_tokens: int | None = Field(default=None, ge=0, description="Real (non-padding) tokens trained on.")
    steps: int | None = Field(default=None, ge=0, description="Optimizer steps taken.")
    stopped_early: bool | None = Field(default=None, description="Early stopping ended the run.")


class Artifacts(ApiModel):
    """Where a finished run's outputs are."""

    adapter: str | None = Field(default=None, description="The LoRA adapter (PEFT and vLLM loadable).")
    merged: str | None = Field(default=None, description="The merged 16-bit model (output.mergeAdapter).")
    metrics: str | None = Field(default=None, description="metrics.json: losses, perplexity, tokens, times.")
    model_card: str | None = Field(default=None, description="README.md model card.")
    samples: str | None = Field(default=None, description="samples.jsonl: generations for evaluation.prompts.")


class TrainerError(ApiModel):
    """Why a run failed, precise enough to fix the input."""

    reason: str = Field(description="CamelCase cause, e.g. InvalidInput, DatasetError, StorageError.")
    message: str = Field(description="What is wrong and what would be valid.")
    field: str | None = Field(default=None, description="The spec field at fault, e.g. dataset.fields.prompt.")
    file: str | None = Field(default=None, description="The file or URI at fault.")
    line: int | None = Field(default=None, ge=1, description="Line or row number in that file (1-based).")


class TerminationMessage(ApiModel):
    """The one JSON object a trainer writes to its termination log before it exits (under 4 KiB)."""

    outcome: Literal["succeeded", "failed", "preempted"] = Field(description="How the run ended.")
    result: Result | None = None
    artifacts: Artifacts | None = None
    checkpoint: Checkpoint | None = None
    error: TrainerError | None = None
