"""The FineTuneJob API (`kubetune.dev/v1alpha1`): spec and status models, and parsing at the edge.

The spec embeds the trainer's config models (what a run is) and adds how it runs on Kubernetes: resources,
scheduling, the run policy, and the Secret references (model.tokenSecretRef, storage.credentialsSecretRef),
which the trainer never reads and so never receives in config.json. These models are the one source of
truth: `kubetune_operator.crd` generates the CRD schema from them.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

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
# Of spec.scheduling (whose nodeSelector, tolerations and affinity reach a Job that has not started): the pods'
# priority class cannot change on an existing Job, and a Job's Kueue queue is fixed when its Workload is made.
SCHEDULING_IMMUTABLE = ("priorityClassName", "queueName")


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
        description=f'CPU request and limit, e.g. "8"; the trainer runs as many CPU threads as the limit allows '
        f"(rounded down, at least 1). Unset: a request (no limit) of {DEFAULT_CPU_PER_GPU} per GPU; none on CPU runs.",
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
    """Where the trainer pods may run. nodeSelector, tolerations and affinity may change: they reach the Job while it
    is suspended or queued and has not started; an edit made while the run trains waits until it is suspended
    (status.observedGeneration stays behind until then). priorityClassName and queueName are immutable."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Taints tolerated.")
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="A core/v1 Affinity, passed to the pod as it is.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="PriorityClass of the pods. Immutable."
    )
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Kueue LocalQueue: the Job is created suspended and Kueue admits it when quota allows. Immutable.",
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


# -- FineTuneSweep: a hyperparameter search whose trials are FineTuneJobs ------------------------------------------

# A trial is named `<sweep>-<n>` with n up to MAX_TRIALS: the sweep's name leaves room for the suffix.
MAX_TRIALS = 100
MAX_SWEEP_NAME_LENGTH = MAX_NAME_LENGTH - len(f"-{MAX_TRIALS}")
# The template's sections a parameter may tune: what the trainer reads of a run, not where its data or model is.
TUNABLE_SECTIONS = ("training", "method", "objective", "dataset")
_UNTUNABLE = frozenset({"dataset.train", "dataset.eval", "dataset.template"})
SweepMetric = Literal["evalLoss", "trainLoss", "rewardAccuracy", "rewardMargin"]
# The metrics the trainer reports at each evaluation, so a pruner can compare trials step by step.
EVALUATED_METRICS: tuple[str, ...] = ("evalLoss", "rewardAccuracy", "rewardMargin")
MAXIMIZED_METRICS: tuple[str, ...] = ("rewardAccuracy", "rewardMargin")
DPO_METRICS: tuple[str, ...] = ("rewardAccuracy", "rewardMargin")


def _json_type(annotation: Any) -> str | None:
    """The JSON type of a scalar annotation (`float | None`, a Literal of strings, an Annotated str), else None."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _json_type(arguments[0])
    if origin is Literal:
        kinds = {type(argument) for argument in arguments}
        return {frozenset({str}): "string", frozenset({int}): "integer", frozenset({bool}): "boolean"}.get(
            frozenset(kinds)
        )
    if arguments and origin in (typing.Union, types.UnionType):
        inner = [_json_type(argument) for argument in arguments if argument is not type(None)]
        return inner[0] if len(inner) == 1 else None
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(annotation)


def _scalar_paths(model: type[BaseModel], prefix: str) -> dict[str, str]:
    paths: dict[str, str] = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}.{field.alias or name}"
        kind = _json_type(field.annotation)
        if kind is not None and path not in _UNTUNABLE:
            paths[path] = kind
        inner = model_in(field.annotation)
        if inner is not None and typing.get_origin(field.annotation) is not list:
            paths.update(_scalar_paths(inner, path))
    return paths


def tunable_paths() -> dict[str, str]:
    """Every field a sweep parameter may name (`training.learningRate`...), with its JSON type."""
    paths: dict[str, str] = {}
    for section in TUNABLE_SECTIONS:
        inner = model_in(FineTuneJobSpec.model_fields[section].annotation)
        assert inner is not None, section
        paths.update(_scalar_paths(inner, section))
    return paths


TUNABLE_PATHS = tunable_paths()
_NUMBER_PATHS = sorted(path for path, kind in TUNABLE_PATHS.items() if kind == "number")
_NUMERIC_PATHS = sorted(path for path, kind in TUNABLE_PATHS.items() if kind in ("number", "integer"))


def _cel_list(values: list[str]) -> str:
    return "[" + ", ".join(f"'{value}'" for value in values) + "]"


# A categorical choice: any JSON scalar (a learning rate, a rank, a scheduler's name, a flag).
Choice = Annotated[
    bool | int | float | str,
    WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True, "description": "A value of the parameter."}),
]


class FloatSearch(ApiModel):
    """A real-valued range, sampled uniformly or (log) log-uniformly."""

    min: float = Field(description="Lowest value (inclusive).")
    max: float = Field(description="Highest value (inclusive).")
    log: bool = Field(default=False, description="Sample on a log scale (learning rates): min must be above 0.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule("self.min < self.max", "float.min must be less than float.max", lambda f: f.min < f.max, ".min"),
        Rule("!self.log || self.min > 0.0", "float.log needs float.min above 0", lambda f: not f.log or f.min > 0),
    )


class IntSearch(ApiModel):
    """An integer range, in steps of `step` from min."""

    min: int = Field(ge=-INTEGER_MAX, le=INTEGER_MAX, description="Lowest value (inclusive).")
    max: int = Field(ge=-INTEGER_MAX, le=INTEGER_MAX, description="Highest value (inclusive).")
    step: int = Field(default=1, ge=1, le=INTEGER_MAX, description="Spacing between values, from min.")
    log: bool = Field(default=False, description="Sample on a log scale (LoRA ranks): min at least 1, step 1.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule("self.min <= self.max", "int.min must be at most int.max", lambda i: i.min <= i.max, ".min"),
        Rule(
            "!self.log || (self.min >= 1 && self.step == 1)",
            "int.log needs int.min at least 1 and int.step 1",
            lambda i: not i.log or (i.min >= 1 and i.step == 1),
        ),
    )


class CategoricalSearch(ApiModel):
    """A list of values to choose from."""

    choices: list[Choice] = Field(min_length=1, max_length=100, description="The values, each valid for the field.")


_UNTUNABLE_MESSAGE = (
    "name must be a number, integer, string or boolean field of spec.template.spec's "
    f"{', '.join(TUNABLE_SECTIONS)} sections, e.g. training.learningRate, method.lora.r, training.epochs"
)


class SweepParameter(ApiModel):
    """One hyperparameter: a field of the template's spec and the values to search."""

    name: str = Field(
        max_length=128,
        description="Path of the field in spec.template.spec, e.g. training.learningRate, method.lora.r, "
        f"training.epochs: a number, integer, string or boolean field of its {', '.join(TUNABLE_SECTIONS)} sections.",
    )
    float_: FloatSearch | None = Field(default=None, alias="float", description="A real range (number fields).")
    int_: IntSearch | None = Field(default=None, alias="int", description="An integer range (numeric fields).")
    categorical: CategoricalSearch | None = Field(default=None, description="A list of values (any field).")

    @field_validator("name")
    @classmethod
    def _tunable(cls, name: str) -> str:
        """The API server's rule (below), with the field most likely meant."""
        if name not in TUNABLE_PATHS:
            close = difflib.get_close_matches(name, TUNABLE_PATHS, n=1, cutoff=0.6)
            raise ValueError(_UNTUNABLE_MESSAGE + (f"; did you mean `{close[0]}`?" if close else ""))
        return name

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            f"self.name in {_cel_list(sorted(TUNABLE_PATHS))}",
            _UNTUNABLE_MESSAGE,
            lambda p: p.name in TUNABLE_PATHS,
            ".name",
        ),
        Rule(
            "[has(self.float), has(self.int), has(self.categorical)].filter(x, x).size() == 1",
            "set exactly one of float, int or categorical",
            lambda p: [p.float_, p.int_, p.categorical].count(None) == 2,
        ),
        Rule(
            f"!has(self.float) || !(self.name in {_cel_list(sorted(TUNABLE_PATHS))}) || "
            f"self.name in {_cel_list(_NUMBER_PATHS)}",
            "float ranges only number fields (e.g. training.learningRate); use int or categorical for this field",
            lambda p: p.float_ is None or p.name not in TUNABLE_PATHS or p.name in _NUMBER_PATHS,
            ".float",
        ),
        Rule(
            f"!has(self.int) || !(self.name in {_cel_list(sorted(TUNABLE_PATHS))}) || "
            f"self.name in {_cel_list(_NUMERIC_PATHS)}",
            "int ranges only numeric fields (e.g. method.lora.r); use categorical for this field",
            lambda p: p.int_ is None or p.name not in TUNABLE_PATHS or p.name in _NUMERIC_PATHS,
            ".int",
        ),
    )

    def bounds(self) -> list[Any]:
        """The values a trial may take at the edges (every choice of a categorical): each must fit the field."""
        if self.float_ is not None:
            return [self.float_.min, self.float_.max]
        if self.int_ is not None:
            return [self.int_.min, self.int_.max]
        return list(self.categorical.choices) if self.categorical is not None else []


class SweepObjective(ApiModel):
    """What the sweep optimizes: a metric of each trial's result."""

    metric: SweepMetric = Field(
        default="evalLoss",
        description="evalLoss (final evaluation loss), trainLoss, or for objective dpo rewardAccuracy or "
        "rewardMargin (on the eval pairs). Pruning reads it at every evaluation: trainLoss cannot be pruned on.",
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        default=None, description="minimize or maximize. Default: maximize the reward metrics, minimize the losses."
    )

    def effective_direction(self) -> Literal["minimize", "maximize"]:
        return self.direction or ("maximize" if self.metric in MAXIMIZED_METRICS else "minimize")


class SweepAlgorithm(ApiModel):
    """How the next trial's values are chosen (Optuna's samplers)."""

    type: Literal["tpe", "random", "grid", "cmaes"] = Field(
        default="tpe",
        description="tpe (Tree-structured Parzen Estimator), random, grid (every combination of categorical "
        "parameters, in order) or cmaes (CMA-ES, numeric ranges).",
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed: the same seed and results, the same trials.")


class SweepPruner(ApiModel):
    """Stopping trials early whose intermediate metric is behind (Optuna's pruners)."""

    type: Literal["median", "hyperband", "none"] = Field(
        default="median",
        description="median: stop a trial whose metric at an evaluation is worse than the median of earlier trials "
        "at that step; hyperband: successive halving over steps; none.",
    )
    startup_trials: int = Field(
        default=2, ge=0, le=MAX_TRIALS, description="Trials that finish before any is pruned (median)."
    )
    warmup_steps: int = Field(
        default=0, ge=0, le=INTEGER_MAX, description="Training steps of a trial before it may be pruned."
    )


class TrialMetadata(ApiModel):
    """Labels and annotations every trial FineTuneJob gets."""

    labels: dict[str, str] = Field(default_factory=dict, description="Labels of the trial FineTuneJobs.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations of the trial FineTuneJobs.")


class TrialTemplate(ApiModel):
    """The FineTuneJob every trial runs, before the parameters are set."""

    metadata: TrialMetadata = Field(default_factory=TrialMetadata, description="Labels and annotations of trials.")
    spec: FineTuneJobSpec = Field(description="A FineTuneJob spec (its schema and defaults).")


def _has_eval_cel(spec: str) -> str:
    return f"has({spec}.dataset.eval) || {spec}.dataset.evalSplit > 0.0"


def _has_eval(spec: FineTuneJobSpec) -> bool:
    return spec.dataset.eval is not None or spec.dataset.eval_split > 0


class FineTuneSweepSpec(ApiModel):
    """A hyperparameter search: trials of a FineTuneJob template, chosen and pruned by Optuna."""

    template: TrialTemplate = Field(description="The FineTuneJob each trial runs, with the parameters set.")
    parameters: list[SweepParameter] = Field(
        min_length=1,
        max_length=16,
        description="The hyperparameters to search, each a field of the template's spec.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    objective: SweepObjective = Field(default_factory=SweepObjective, description="The metric and its direction.")
    algorithm: SweepAlgorithm = Field(default_factory=SweepAlgorithm, description="The sampler and its seed.")
    trials: int = Field(default=10, ge=1, le=MAX_TRIALS, description="Trials to run in all.")
    parallel_trials: int = Field(
        default=1, ge=1, le=MAX_TRIALS, description="Trials running at once (at most trials); each a FineTuneJob."
    )
    pruner: SweepPruner = Field(default_factory=SweepPruner, description="Early stopping of bad trials.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.parallelTrials <= self.trials",
            "parallelTrials must be at most trials",
            lambda s: s.parallel_trials <= s.trials,
            ".parallelTrials",
        ),
        Rule(
            "self.algorithm.type != 'grid' || self.parameters.all(p, has(p.categorical))",
            "algorithm grid searches categorical parameters only: give every parameter categorical choices",
            lambda s: s.algorithm.type != "grid" or all(p.categorical is not None for p in s.parameters),
            ".algorithm",
        ),
        Rule(
            "self.algorithm.type != 'cmaes' || self.parameters.all(p, !has(p.categorical))",
            "algorithm cmaes searches numeric ranges only: give every parameter float or int",
            lambda s: s.algorithm.type != "cmaes" or all(p.categorical is None for p in s.parameters),
            ".algorithm",
        ),
        Rule(
            f"!self.objective.metric.startsWith('eval') || {_has_eval_cel('self.template.spec')}",
            "objective evalLoss needs an eval set: set template.spec.dataset.eval or a dataset.evalSplit above 0",
            lambda s: not s.objective.metric.startswith("eval") or _has_eval(s.template.spec),
            ".objective",
        ),
        Rule(
            f"self.pruner.type == 'none' || ({_has_eval_cel('self.template.spec')})",
            "pruning compares trials at each evaluation: set template.spec.dataset.eval or a dataset.evalSplit "
            "above 0, or pruner.type none",
            lambda s: s.pruner.type == "none" or _has_eval(s.template.spec),
            ".pruner",
        ),
        Rule(
            "self.pruner.type == 'none' || self.objective.metric != 'trainLoss'",
            "pruning reads the metric at each evaluation and trainLoss has none: use evalLoss or pruner.type none",
            lambda s: s.pruner.type == "none" or s.objective.metric != "trainLoss",
            ".pruner",
        ),
        Rule(
            f"!(self.objective.metric in {_cel_list(list(DPO_METRICS))}) || self.template.spec.objective.type == 'dpo'",
            "objective rewardAccuracy and rewardMargin need template.spec.objective.type dpo",
            lambda s: s.objective.metric not in DPO_METRICS or s.template.spec.objective.type == "dpo",
            ".objective",
        ),
    )

    @model_validator(mode="after")
    def _values_fit_the_template(self) -> FineTuneSweepSpec:
        """Each parameter's edge values (every choice) set into the template make a valid FineTuneJob spec."""
        problems = []
        for index, parameter in enumerate(self.parameters):
            if parameter.name not in TUNABLE_PATHS:
                continue
            for value in parameter.bounds():
                try:
                    trial_spec(self.template.spec, {parameter.name: value})
                except SpecError as error:
                    problems.append(f"parameters[{index}] value {value!r}: {'; '.join(error.problems)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def trial_spec(template: FineTuneJobSpec, parameters: dict[str, Any]) -> FineTuneJobSpec:
    """The template's spec with each parameter's value set at its path; SpecError naming the field if invalid."""
    body = template.model_dump(by_alias=True, exclude_none=True, mode="json")
    for path, value in parameters.items():
        *parents, last = path.split(".")
        node = body
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        if path == "training.epochs":  # epochs and maxSteps exclude each other: the tuned one wins
            body["training"].pop("maxSteps", None)
        elif path == "training.maxSteps":
            body["training"].pop("epochs", None)
    try:
        return FineTuneJobSpec.model_validate(body, by_alias=True, by_name=False)
    except ValidationError as error:
        raise SpecError(describe_errors(error)) from None


TrialState = Literal["Running", "Succeeded", "Pruned", "Failed"]


class SweepTrialStatus(ApiModel):
    """One trial of a sweep, as its FineTuneJob stands."""

    name: str = Field(description="The trial's FineTuneJob.")
    number: int = Field(ge=0, description="The trial's number, from 0 (the FineTuneJob is <sweep>-<number>).")
    parameters: dict[str, Choice] = Field(
        default_factory=dict,
        description="The values this trial runs with, by parameter name.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    state: TrialState = Field(description="Running, Succeeded, Pruned or Failed.")
    value: float | None = Field(default=None, description="The objective: the final value, or the last reported.")
    step: int | None = Field(default=None, ge=0, description="The training step of the last value reported.")


class FineTuneSweepStatus(ApiModel):
    """Where the search stands, computed by the operator from its trials."""

    phase: Literal["Running", "Succeeded", "Failed"] | None = Field(
        default=None, description="Running, Succeeded (every trial finished, one succeeded) or Failed."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Detailed state, one entry per type.")
    observed_generation: int | None = Field(default=None, description="The spec generation this status is for.")
    trials: list[SweepTrialStatus] = Field(default_factory=list, description="Every trial so far, by number.")
    progress: str | None = Field(default=None, description="Trials finished / trials in all, e.g. 3/10.")
    running: int | None = Field(default=None, ge=0, description="Trials running now.")
    succeeded: int | None = Field(default=None, ge=0, description="Trials that finished.")
    pruned: int | None = Field(default=None, ge=0, description="Trials stopped early by the pruner.")
    failed: int | None = Field(default=None, ge=0, description="Trials that failed.")
    best_trial: str | None = Field(default=None, description="The trial with the best objective so far.")
    best_value: float | None = Field(default=None, description="Its objective.")
    best_parameters: dict[str, Choice] | None = Field(
        default=None,
        description="Its parameter values.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    reason: str | None = Field(default=None, description="Cause of the current phase, e.g. InvalidSpec.")
    message: str | None = Field(default=None, description="Human-readable explanation of the phase.")


class SweepMeta(ObjectMeta):
    name: str = Field(min_length=1, max_length=MAX_SWEEP_NAME_LENGTH, pattern=DNS_LABEL)


class FineTuneSweep(BaseModel):
    """A hyperparameter sweep of fine-tuning runs (kubetune.dev/v1alpha1 FineTuneSweep)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["kubetune.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneSweep"]
    metadata: SweepMeta
    spec: FineTuneSweepSpec
    status: FineTuneSweepStatus | None = None


def parse_finetunesweep(body: dict[str, Any]) -> FineTuneSweep:
    """Typed FineTuneSweep from a raw object; SpecError naming each field if invalid (as parse_finetunejob)."""
    try:
        return FineTuneSweep.model_validate(
            {key: value for key, value in body.items() if key != "status"}, by_alias=True, by_name=False
        )
    except ValidationError as error:
        raise SpecError(describe_errors(error, meant=lambda location: meant_field(FineTuneSweep, location))) from None
