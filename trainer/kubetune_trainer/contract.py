"""The operator-trainer contract (DESIGN.md, "Contracts"): how the trainer is launched, how long it has to
stop, exit codes, paths, the port, and the JSON the trainer reports.

Both sides import this one module: the operator's Job builder and `kubetune run` launch the trainer with
`launch_command` and `launch_env`, the trainer reads the same names. Pure pydantic (no torch): the operator
imports these models to read `/progress` and the termination message, and embeds Progress, Result and
Artifacts in the FineTuneJob status (so every field has help text, which becomes the CRD description).
Field names are camelCase on the wire. Unknown fields are ignored when reading, so an older operator can
read a newer trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# Exit codes. The Job's podFailurePolicy fails at once on EXIT_INVALID_INPUT and ignores EXIT_PREEMPTED.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID_INPUT = 2  # bad config, dataset, model or bucket: retrying cannot help
EXIT_PREEMPTED = 3  # stopped on SIGTERM after a checkpoint was saved: retried without counting a failure

CONFIG_PATH = "/etc/kubetune/config.json"
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_ENV = "KUBETUNE_TERMINATION_LOG"
TERMINATION_MESSAGE_MAX_BYTES = 4096  # Kubernetes truncates termination messages beyond this
WORKDIR_ENV = "KUBETUNE_WORKDIR"
DEFAULT_WORKDIR = "/tmp/kubetune"  # local scratch before upload; an emptyDir in the pod
METRICS_PORT = 9400
METRICS_PORT_NAME = "metrics"  # the container port's name, which the chart's PodMonitor selects
METRICS_PORT_ENV = "KUBETUNE_METRICS_PORT"
RUN_NAMESPACE_ENV = "KUBETUNE_RUN_NAMESPACE"
RUN_NAME_ENV = "KUBETUNE_RUN_NAME"
PROGRESS_PATH = "/progress"
METRICS_PATH = "/metrics"

# Multi-node (resources.nodes > 1): torchrun's c10d rendezvous, its TCP store hosted by the launcher of node 0.
RENDEZVOUS_PORT = 29400  # torchrun's default c10d port
RENDEZVOUS_PORT_NAME = "rendezvous"
# How long a node waits for every peer (a Pending pod, a slow image pull) before it fails with a clear message.
RENDEZVOUS_TIMEOUT_SECONDS = 900
NODE_RANK_ENV = "JOB_COMPLETION_INDEX"  # set by the Job controller in each pod of an Indexed Job

# Stopping. One value, the pod's terminationGracePeriodSeconds, from which the rest is derived: the trainer's
# watchdog (STOP_GRACE_ENV) gives up STOP_GRACE_MARGIN_SECONDS before the kubelet's SIGKILL, so it still
# writes its termination message, and `kubetune run` waits the pod's grace before it kills.
TERMINATION_GRACE_SECONDS = 300  # room to finish a checkpoint upload on SIGTERM (suspend, preemption)
KUBERNETES_DEFAULT_GRACE_SECONDS = 30  # a pod that does not say: the trainer image run by hand
STOP_GRACE_MARGIN_SECONDS = 10  # exit, flush logs, write the termination message
STOP_GRACE_ENV = "KUBETUNE_STOP_GRACE_SECONDS"
# The pod's local disk (spec.resources.disk) in bytes: a model that cannot fit is refused before its download
# (exit 2) rather than evicted by the kubelet mid-download, which the Job would retry without end (an eviction
# is a disruption, which the podFailurePolicy ignores). Unset (kubetune run): no check.
DISK_BYTES_ENV = "KUBETUNE_DISK_BYTES"

# Objects under output.destination.
CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"  # written last, in a checkpoint and in the destination

Stage = Literal[
    "starting", "downloading", "setup", "train", "evaluating", "checkpointing", "save", "uploading", "cleanup",
    "done", "failed",
]  # fmt: skip
STAGES: tuple[str, ...] = Stage.__args__  # type: ignore[attr-defined]


def stop_grace_seconds(termination_grace_seconds: int = KUBERNETES_DEFAULT_GRACE_SECONDS) -> int:
    """How long the trainer's watchdog lets a stop take, for a pod allowed `termination_grace_seconds`."""
    return max(1, termination_grace_seconds - STOP_GRACE_MARGIN_SECONDS)


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of a multi-node run meet: node 0's launcher hosts torchrun's c10d store at `host:port`.

    In a pod, `node_rank` and `node_address` hold `$(JOB_COMPLETION_INDEX)`, which the kubelet expands from
    the environment the Job controller gives each pod of an Indexed Job.
    """

    nodes: int
    host: str  # node 0's stable name, <job>-0.<service> in a cluster
    node_rank: str  # this node's index: "$(JOB_COMPLETION_INDEX)" in a pod
    node_address: str  # this node's own name, which its peers can reach
    run_id: str
    port: int = RENDEZVOUS_PORT
    timeout_seconds: int = RENDEZVOUS_TIMEOUT_SECONDS

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


def pod_rendezvous(job: str, service: str, nodes: int) -> Rendezvous:
    """The rendezvous of an Indexed Job `job` whose pods are `<job>-<index>.<service>` (the pod's hostname is
    `<job>-<index>`, its subdomain the headless Service)."""
    index = f"$({NODE_RANK_ENV})"
    return Rendezvous(nodes, f"{job}-0.{service}", index, f"{job}-{index}.{service}", run_id=job)


def launch_command(
    gpus: int,
    config: str = CONFIG_PATH,
    termination_log: str = TERMINATION_LOG,
    *,
    python: str = "python",
    rendezvous: Rendezvous | None = None,
) -> list[str]:
    """The trainer's command line for a pod (or a local run) with `gpus` GPUs, on `rendezvous.nodes` nodes.

    Several GPUs or nodes go through the trainer's own launcher (`--nproc-per-node`), not torchrun directly:
    torchrun turns every worker failure into exit code 1, and the launcher exits with the code its node's
    first worker recorded, so 2 (invalid input) and 3 (preempted) reach the Job's podFailurePolicy.
    """
    command = [python, "-m", "kubetune_trainer", "--config", config, "--termination-log", termination_log]
    if rendezvous is not None and rendezvous.nodes > 1:
        command += [
            "--nproc-per-node", str(max(gpus, 1)),
            "--nnodes", str(rendezvous.nodes),
            "--node-rank", rendezvous.node_rank,
            "--node-address", rendezvous.node_address,
            "--rdzv-endpoint", rendezvous.endpoint,
            "--rdzv-id", rendezvous.run_id,
            "--rdzv-timeout", str(rendezvous.timeout_seconds),
        ]  # fmt: skip
    elif gpus > 1:
        command += ["--nproc-per-node", str(gpus)]
    return command


def torchrun_args(
    nproc: int,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    node_address: str | None = None,
    endpoint: str | None = None,
    run_id: str = "kubetune",
    timeout_seconds: int = RENDEZVOUS_TIMEOUT_SECONDS,
) -> list[str]:
    """torchrun's options for what the launcher was given: standalone on one node, c10d across several.

    c10d numbers nodes by their sorted address, and `<job>-0.<service>` sorts first, so global rank 0 (the
    one that writes checkpoints, artifacts and the termination message, and serves /progress) runs in the pod
    of index 0, the one the operator polls. Node 0 hosts the store (`is_host`) rather than torchrun guessing
    from its hostname. `join_timeout` bounds the wait for peers; `read_timeout` is how long a node keeps
    trying to reach node 0's store, so a node started before node 0 waits instead of failing at once.
    Workers are not restarted in place (`--max-restarts 0`): a failed node fails its pod, and the Job's
    podFailurePolicy and backoffLimit decide.
    """
    if nnodes <= 1:
        return ["--standalone", f"--nproc-per-node={nproc}"]
    if not endpoint:
        raise ValueError("a multi-node launch needs the rendezvous endpoint (host:port of node 0)")
    conf = (
        f"is_host={'true' if node_rank == 0 else 'false'},join_timeout={timeout_seconds},read_timeout={timeout_seconds}"
    )
    args = [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
        f"--rdzv-conf={conf}",
        "--max-restarts=0",
    ]
    if node_address:
        args.append(f"--local-addr={node_address}")
    return args


def launch_env(
    run_name: str,
    run_namespace: str,
    *,
    metrics_port: int = METRICS_PORT,
    termination_grace_seconds: int = TERMINATION_GRACE_SECONDS,
) -> dict[str, str]:
    """The environment the trainer is launched with, besides credentials and caches."""
    return {
        RUN_NAME_ENV: run_name,
        RUN_NAMESPACE_ENV: run_namespace,
        METRICS_PORT_ENV: str(metrics_port),
        STOP_GRACE_ENV: str(stop_grace_seconds(termination_grace_seconds)),
    }


class ContractModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class TrackingRun(ContractModel):
    """The run in one experiment tracker (spec.tracking): where to look, or why it is not there."""

    backend: Literal["mlflow", "wandb"] = Field(description="mlflow or wandb.")
    state: Literal["reporting", "finished", "failed"] = Field(
        description="reporting while the run goes; finished once the final result is logged; failed when the "
        "tracker could not be reached (training goes on without it)."
    )
    run_id: str | None = Field(default=None, description="The tracker's run id.")
    url: str | None = Field(default=None, description="The run's page (W&B offline: none).")
    location: str | None = Field(
        default=None, description="W&B offline: where the run directory is uploaded, for `wandb sync`."
    )
    message: str | None = Field(default=None, description="Why reporting failed.")


def format_seconds(seconds: float | None) -> str:
    """Seconds as H:MM:SS, rounded down, hours unbounded (100000 -> 27:46:40): the form of Progress.eta, the
    trainer's log lines and `kubetune plan`. "?" for None or infinity, which only the log lines and the plan
    print: an unknown ETA leaves Progress.eta unset."""
    if seconds is None or math.isinf(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


MAX_EVALUATIONS = 200  # the most recent evaluations /progress keeps (a sweep's pruner reads them)


class Evaluation(ContractModel):
    """The metrics of one evaluation; a metric that was not a finite number (a diverged run) is absent."""

    step: int = Field(ge=0, description="The optimizer step the evaluation ran at.")
    eval_loss: float | None = Field(default=None, description="Evaluation loss; absent if it was not finite.")
    reward_accuracy: float | None = Field(default=None, ge=0, le=1, description="objective dpo: on the eval pairs.")
    reward_margin: float | None = Field(default=None, description="objective dpo: on the eval pairs.")


class Progress(ContractModel):
    """Live progress of a run: what the trainer serves at /progress, mirrored into status.progress."""

    run: str | None = Field(
        default=None,
        description="The FineTuneJob this trainer runs, as namespace/name: the operator ignores a /progress of "
        "another run (an address reused by another pod between two polls).",
    )
    stage: Stage = Field(default="starting", description="What the trainer is doing now.")
    step: int = Field(default=0, ge=0, description="Optimizer steps completed.")
    total_steps: int | None = Field(default=None, ge=0, description="Optimizer steps the run will take.")
    percent: float | None = Field(default=None, ge=0, le=100, description="step / totalSteps, in percent.")
    epoch: float | None = Field(default=None, ge=0, description="Epochs completed (fractional).")
    train_loss: float | None = Field(default=None, description="Training loss over the last logging interval.")
    eval_loss: float | None = Field(default=None, description="Latest evaluation loss.")
    learning_rate: float | None = Field(default=None, ge=0, description="Current learning rate.")
    grad_norm: float | None = Field(default=None, ge=0, description="Gradient norm at the last logged step.")
    tokens_per_second: float | None = Field(default=None, ge=0, description="Training throughput (real tokens).")
    eta_seconds: float | None = Field(default=None, ge=0, description="Estimated seconds until training ends.")
    eta: str | None = Field(default=None, description="etaSeconds for humans, H:MM:SS, e.g. 1:02:00 (the ETA column).")
    reward_accuracy: float | None = Field(
        default=None, ge=0, le=1, description="objective dpo: share of pairs whose chosen reward beats the rejected."
    )
    reward_margin: float | None = Field(
        default=None, description="objective dpo: mean chosen minus rejected reward (beta * log-ratio to reference)."
    )
    reward_chosen: float | None = Field(default=None, description="objective dpo: mean reward of the chosen answers.")
    reward_rejected: float | None = Field(
        default=None, description="objective dpo: mean reward of the rejected answers."
    )
    eval_reward_accuracy: float | None = Field(
        default=None, ge=0, le=1, description="objective dpo: reward accuracy on the eval pairs, latest evaluation."
    )
    eval_reward_margin: float | None = Field(
        default=None, description="objective dpo: reward margin on the eval pairs, latest evaluation."
    )
    evaluations: list[Evaluation] | None = Field(
        default=None,
        max_length=MAX_EVALUATIONS,
        description=f"Every evaluation's metrics by step (the latest {MAX_EVALUATIONS}): what a sweep prunes on.",
    )
    resumed_from_step: int | None = Field(default=None, ge=0, description="Checkpoint step this attempt resumed from.")
    storage_retry: str | None = Field(
        default=None, description="A storage write being retried through an outage, and why; none once it went through."
    )
    tracking: list[TrackingRun] | None = Field(default=None, description="The experiment-tracking runs.")
    updated_at: str | None = Field(default=None, description="When the trainer last updated this (RFC 3339).")


class Result(ContractModel):
    """Final numbers of a finished run."""

    train_loss: float | None = Field(default=None, description="Training loss over the last logging interval.")
    eval_loss: float | None = Field(default=None, description="Final evaluation loss.")
    perplexity: float | None = Field(default=None, ge=0, description="exp(evalLoss).")
    train_seconds: float | None = Field(default=None, ge=0, description="Wall time spent training.")
    trained_tokens: int | None = Field(default=None, ge=0, description="Real (non-padding) tokens trained on.")
    steps: int | None = Field(default=None, ge=0, description="Optimizer steps taken.")
    reward_accuracy: float | None = Field(
        default=None, ge=0, le=1, description="objective dpo: final reward accuracy (eval pairs, else train)."
    )
    reward_margin: float | None = Field(
        default=None, description="objective dpo: final mean reward margin (eval pairs, else train)."
    )


class Artifacts(ContractModel):
    """Where a finished run's outputs are."""

    adapter: str | None = Field(default=None, description="The LoRA adapter (PEFT- and vLLM-loadable).")
    merged: str | None = Field(default=None, description="The merged 16-bit model (output.mergeAdapter).")
    metrics: str | None = Field(default=None, description="metrics.json: losses, perplexity, tokens, times.")
    model_card: str | None = Field(default=None, description="README.md model card.")
    samples: str | None = Field(default=None, description="samples.jsonl: generations for evaluation.prompts.")


class CheckpointRef(ContractModel):
    """The newest complete checkpoint."""

    step: int = Field(ge=0, description="Optimizer step the checkpoint was taken at.")
    uri: str = Field(description="Where it is.")


class TrainerError(ContractModel):
    """Why a run failed, pointing at what to fix."""

    reason: str = Field(description="InvalidConfig, InvalidDataset, ModelNotFound, StorageError, ...")
    message: str = Field(description="What is wrong and what would be valid.")
    field: str | None = Field(default=None, description="The spec field at fault, e.g. dataset.fields.prompt.")
    file: str | None = Field(default=None, description="The file or URI at fault.")
    line: int | None = Field(default=None, ge=1, description="Line or row number in that file (1-based).")


class TerminationMessage(ContractModel):
    """The one JSON object written to the termination log on every exit path (< 4 KiB)."""

    outcome: Literal["succeeded", "failed", "invalid", "preempted"]
    exit_code: int
    result: Result | None = None
    artifacts: Artifacts | None = None
    checkpoint: CheckpointRef | None = None
    error: TrainerError | None = None
    tracking: list[TrackingRun] | None = None

    def encode(self) -> str:
        """JSON under TERMINATION_MESSAGE_MAX_BYTES: the error message is shortened if needed."""
        text = self.model_dump_json(by_alias=True, exclude_none=True)
        if len(text.encode()) <= TERMINATION_MESSAGE_MAX_BYTES or self.error is None:
            return text
        excess = len(text.encode()) - TERMINATION_MESSAGE_MAX_BYTES + 16
        message = self.error.message.encode()[: max(0, len(self.error.message.encode()) - excess)]
        short = self.model_copy(
            update={"error": self.error.model_copy(update={"message": message.decode(errors="ignore") + "..."})}
        )
        return short.model_dump_json(by_alias=True, exclude_none=True)
