"""The FineTuneJob API (`kubetune.dev/v1alpha1`): spec and status models, and parsing at the edge.

The spec embeds the trainer's config models (what a run is) and adds how it runs on Kubernetes: resources,
scheduling, the run policy, and the Secret references (model.tokenSecretRef, storage.credentialsSecretRef),
which the trainer never reads and so never receives in config.json. These models are the one source of
truth: `kubetune_operator.crd` generates the CRD schema from them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from kubetune_operator import API_GROUP, API_VERSION, KIND
from kubetune_operator.pod_api import PodSpec
from kubetune_operator.spelling import meant_field, model_in, quantity_problem
from kubetune_trainer.config import (
    DNS_SUBDOMAIN,
    INTEGER_MAX,
    QUANTITY,
    ApiModel,
    MlflowSpec,
    ModelSpec,
    Rule,
    StorageSpec,
    TrackingSpec,
    TrainerConfig,
    WandbSpec,
    describe_errors,
)
from kubetune_trainer.contract import Artifacts, CheckpointRef, Progress, Result, TrackingRun

MAX_NAME_LENGTH = 63  # the Job is named after the FineTuneJob, and Job names end up in pod labels
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # RFC 1123 label: names and namespaces
QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
# The trainer-facing sections are immutable: a running trainer resumes only into the same run.
IMMUTABLE_SECTIONS = (
    "model",
    "dataset",
    "method",
    "objective",
    "training",
    "evaluation",
    "output",
    "storage",
    "resources",
    "image",
    "pod",
    "tracking",  # read by the trainer at its start: an edit would reach only a restarted attempt
    "serviceAccountName",  # in the Job's pod template, which Kubernetes does not let change
)


def _is_quantity(text: str) -> str:
    if not re.search(QUANTITY, text):
        raise ValueError(quantity_problem(text))
    return text


# A resource quantity: the CRD's pattern for the API server, and words for `kubetune validate` and the operator.
Quantity = Annotated[str, Field(max_length=64, json_schema_extra={"pattern": QUANTITY}), AfterValidator(_is_quantity)]


class SecretRef(ApiModel):
    """A Secret in the FineTuneJob's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the Secret.")


class SecretKeyRef(SecretRef):
    """A key in a Secret in the FineTuneJob's namespace."""

    key: str = Field(
        default="token", min_length=1, max_length=253, description="Key in the Secret that holds the value."
    )


class S3CredentialsRef(SecretRef):
    """A Secret holding S3 credentials; they reach the trainer as environment variables, never in config."""

    access_key_id_key: str = Field(
        default="AWS_ACCESS_KEY_ID",
        min_length=1,
        max_length=253,
        description="Key holding the access key id.",
    )
    secret_access_key_key: str = Field(
        default="AWS_SECRET_ACCESS_KEY",
        min_length=1,
        max_length=253,
        description="Key holding the secret access key.",
    )
    session_token_key: str | None = Field(
        default=None, min_length=1, max_length=253, description="Optional key holding a session token."
    )


class FineTuneModelSpec(ModelSpec):
    """The base model to fine-tune."""

    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a Hugging Face token for gated hf:// models."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        *ModelSpec.rules,
        Rule(
            "!has(self.tokenSecretRef) || self.source.startsWith('hf://')",
            "model.tokenSecretRef is only valid with an hf:// source",
            lambda m: m.token_secret_ref is None or m.source.startswith("hf://"),
            ".tokenSecretRef",
        ),
    )


class FineTuneStorageSpec(StorageSpec):
    """How s3:// URIs are reached."""

    credentials_secret_ref: S3CredentialsRef | None = Field(
        default=None,
        description="Secret with the S3 credentials. Absent: the pod's own identity (IRSA, instance role).",
    )


class FineTuneMlflowSpec(MlflowSpec):
    """An MLflow tracking server the run reports to (transformers' MLflowCallback)."""

    credentials_secret_ref: SecretRef | None = Field(
        default=None,
        description="Secret whose keys MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth) or "
        "MLFLOW_TRACKING_TOKEN (bearer token) reach the trainer as those environment variables; each key is "
        "optional. Absent: no credentials.",
    )


class FineTuneWandbSpec(WandbSpec):
    """A Weights & Biases project the run reports to (transformers' WandbCallback)."""

    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the W&B API key (WANDB_API_KEY). Needed with mode online."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.mode == 'offline' || has(self.apiKeySecretRef)",
            "tracking.wandb.apiKeySecretRef is required with mode online (or set mode offline)",
            lambda w: w.mode == "offline" or w.api_key_secret_ref is not None,
            ".apiKeySecretRef",
        ),
    )


class FineTuneTrackingSpec(TrackingSpec):
    """Experiment trackers that receive the run's config, per-step metrics, final result and model card.
    Off when absent. A tracker that cannot be reached never fails the run: status.tracking says so."""

    mlflow: FineTuneMlflowSpec | None = Field(default=None, description="Report to an MLflow tracking server.")
    wandb: FineTuneWandbSpec | None = Field(default=None, description="Report to Weights & Biases.")


# What a pod asks for when the spec leaves it out. Requests only (Burstable): a default that proves low for a
# large model slows the pod or lets it use what the node has, never OOM-kills it. `kubetune plan` sizes a run.
DEFAULT_CPU_PER_GPU = 4
DEFAULT_MEMORY_GI_PER_GPU = 16
DEFAULT_MEMORY_PER_GPU = f"{DEFAULT_MEMORY_GI_PER_GPU}Gi"
DEFAULT_DISK = "50Gi"


class Resources(ApiModel):
    """Compute for the trainer pod."""

    gpus: int = Field(default=1, ge=0, le=64, description="GPUs per node (one pod per node). 0 runs on CPU.")
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        max_length=253,
        pattern=QUALIFIED_NAME,
        description="Extended resource that counts GPUs, e.g. nvidia.com/gpu or amd.com/gpu.",
    )
    nodes: int = Field(
        default=1, ge=1, le=64, description="Nodes (pods) for multi-node training: an Indexed Job with torchrun."
    )
    cpu: Quantity | None = Field(
        default=None,
        description=f'CPU request and limit, e.g. "8". Unset: a request (no limit) of {DEFAULT_CPU_PER_GPU} per GPU; '
        "none on CPU runs.",
    )
    memory: Quantity | None = Field(
        default=None,
        description=f"Memory request and limit, e.g. 64Gi. Unset: a request (no limit) of {DEFAULT_MEMORY_PER_GPU} "
        "per GPU; none on CPU runs.",
    )
    disk: Quantity | None = Field(
        default=None,
        description="Local disk per pod (ephemeral-storage) for the model download, checkpoints and caches: "
        "the size limit of the scratch volumes, so a download cannot fill the node, and requested (except with a "
        f"Kueue queue, whose ClusterQueues seldom cover ephemeral-storage). Unset: {DEFAULT_DISK}. `kubetune plan` "
        "says what a run needs.",
    )
    shared_memory: Quantity = Field(
        default="2Gi",
        description="Size of the in-memory /dev/shm (data loader workers and NCCL need more than the 64Mi default).",
    )


class Toleration(ApiModel):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = Field(default=None, max_length=317, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=-INTEGER_MAX, le=INTEGER_MAX, description="NoExecute only: how long to stay bound."
    )


class Scheduling(ApiModel):
    """Where the trainer pods may run. May change while a run is suspended or queued."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Taints tolerated.")
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="A core/v1 Affinity, passed to the pod as it is.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="PriorityClass of the pods."
    )
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Kueue LocalQueue: the Job is created suspended and Kueue admits it when quota allows.",
    )


class RunPolicy(ApiModel):
    """How the run is retried, bounded and cleaned up."""

    suspend: bool = Field(
        default=False,
        description="Suspend the run: the pod is stopped (it checkpoints first); set false to resume.",
    )
    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Failed attempts before the run fails. Preemptions and evictions do not count.",
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, le=INTEGER_MAX, description="Wall-clock limit for the whole run, retries included."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=2**31 - 1,  # int32 in batch/v1 Job
        description="Delete the FineTuneJob (and its Job) this long after it finishes.",
    )


class FineTuneJobSpec(TrainerConfig):
    """The desired fine-tuning run: the trainer's config plus how it runs on Kubernetes."""

    model: FineTuneModelSpec = Field(description="The base model.")
    storage: FineTuneStorageSpec = Field(
        default_factory=FineTuneStorageSpec, description="S3 endpoint, region and credentials."
    )
    tracking: FineTuneTrackingSpec = Field(
        default_factory=FineTuneTrackingSpec, description="MLflow and W&B; off by default."
    )
    resources: Resources = Field(default_factory=Resources, description="GPUs, CPU, memory and nodes.")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Node selection, tolerations, Kueue.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Suspend, retries, deadlines, clean-up.")
    image: str | None = Field(
        default=None, min_length=1, max_length=512, description="Trainer image; default: the operator's setting."
    )
    pod: PodSpec = Field(
        default_factory=PodSpec,
        description="Additions to the trainer pods: env, volumes and mounts, labels, annotations, image pull Secrets.",
    )
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="ServiceAccount for the trainer pods (e.g. one bound to an IAM role for S3); its token is "
        "never mounted.",
    )

    rules = (
        *TrainerConfig.rules,
        Rule(
            "self.resources.nodes == 1 || self.resources.gpus >= 1",
            "resources.nodes > 1 needs resources.gpus >= 1",
            lambda s: s.resources.nodes == 1 or s.resources.gpus >= 1,
        ),
    )

    def trainer_config(self) -> TrainerConfig:
        """The training part alone, without the Secret references: what goes into config.json."""
        return TrainerConfig.model_validate(self.model_dump(exclude=KUBERNETES_ONLY_FIELDS))


def added_fields(model: type[BaseModel], base: type[BaseModel]) -> dict[str, Any]:
    """The fields `model` adds to `base`, at any depth (a section of `model` may extend a section of `base`),
    in the form pydantic's `model_dump(exclude=...)` takes."""
    added: dict[str, Any] = {name: True for name in model.model_fields if name not in base.model_fields}
    for name, field in base.model_fields.items():
        ours, theirs = model_in(model.model_fields[name].annotation), model_in(field.annotation)
        if ours is not None and theirs is not None and ours is not theirs and (inner := added_fields(ours, theirs)):
            added[name] = inner
    return added


# What the FineTuneJob adds to the trainer's config (resources, scheduling, the Secret references inside the
# trainer's own sections...): Kubernetes-only, never in config.json.
KUBERNETES_ONLY_FIELDS = added_fields(FineTuneJobSpec, TrainerConfig)


Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]


class Condition(ApiModel):
    """A status condition (Kubernetes API conventions)."""

    type: str = Field(description="Ready, Running, Succeeded, Failed, Suspended...")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase cause of the last transition.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="The generation this was computed for.")


class FineTuneJobStatus(ApiModel):
    """What is running, computed by the operator from the Job, its pods and the trainer."""

    phase: Phase | None = Field(default=None, description="Pending, Queued, Running, Succeeded, Failed, Suspended.")
    conditions: list[Condition] = Field(default_factory=list, description="Detailed state, one entry per type.")
    observed_generation: int | None = Field(default=None, description="The spec generation this status is for.")
    job_name: str | None = Field(default=None, description="The batch/v1 Job running the trainer.")
    start_time: str | None = Field(default=None, description="When the first attempt started.")
    completion_time: str | None = Field(default=None, description="When the run finished.")
    attempts: int | None = Field(default=None, ge=0, description="Pods started so far, including retries.")
    running_nodes: int | None = Field(
        default=None, ge=0, description="Nodes whose trainer pod is running (multi-node runs, while Running)."
    )
    progress: Progress | None = Field(default=None, description="Live progress, read from the trainer.")
    checkpoint: CheckpointRef | None = Field(default=None, description="The newest complete checkpoint.")
    result: Result | None = Field(default=None, description="Final numbers of a succeeded run.")
    artifacts: Artifacts | None = Field(default=None, description="Where the outputs are.")
    tracking: list[TrackingRun] | None = Field(
        default=None, description="The run in each experiment tracker (spec.tracking): id and URL, or why it failed."
    )
    reason: str | None = Field(default=None, description="Cause of the current phase, e.g. InvalidInput.")
    message: str | None = Field(default=None, description="Human-readable explanation of the phase.")


class ObjectMeta(BaseModel):
    """The part of metadata the operator reads; everything else passes through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=DNS_LABEL)
    namespace: str | None = Field(default=None, min_length=1, max_length=63, pattern=DNS_LABEL)
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(BaseModel):
    """A fine-tuning run of a language model (kubetune.dev/v1alpha1 FineTuneJob)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["kubetune.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


assert f"{API_GROUP}/{API_VERSION}" == "kubetune.dev/v1alpha1" and KIND == "FineTuneJob"


class SpecError(ValueError):
    """A FineTuneJob that breaks the API's rules; `problems` are `path: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_finetunejob(body: dict[str, Any]) -> FineTuneJob:
    """Typed FineTuneJob from a raw object (a handler's body or a YAML document); SpecError if invalid.

    The status is not parsed: it is computed from what runs, never read back as input. Fields are read by
    their wire (camelCase) names only, as the API server reads them: `learning_rate` is an unknown field.
    """
    try:
        return FineTuneJob.model_validate(
            {key: value for key, value in body.items() if key != "status"}, by_alias=True, by_name=False
        )
    except ValidationError as error:
        raise SpecError(describe_errors(error, meant=lambda location: meant_field(FineTuneJob, location))) from None
