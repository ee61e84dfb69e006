"""What a training run is: the typed trainer configuration (`config.json`).

This is the training part of a FineTuneJob spec. The operator embeds these models in its API (and
generates the CRD schema from them), so this module is pure pydantic: it must import without torch.

Every field carries help text (it becomes the CRD description that `kubectl explain` prints), and every
cross-field rule is a `Rule`: one CEL expression for the API server and the same check, with the same
message, for offline validation (`kubetune validate`) and for the trainer itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic.alias_generators import to_camel

DEFAULT_INSTRUCTION_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n{response}"

# A bucket name as S3 allows it (3-63 lowercase letters, digits, dots, hyphens), then an optional key.
_S3 = r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?"
_HF = r"hf://[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?"
_LOCAL = r"(file://)?/.*"
MODEL_URI = rf"^({_S3}|{_HF}|{_LOCAL})$"
DATA_URI = rf"^({_S3}|{_LOCAL})$"
QUANTITY = r"^([+]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
# The bound of every integer field. The API server stores integers as int64, but it reads a schema's bounds as
# JSON numbers (float64): 2**63 - 1 becomes 2**63, which is no int64, and a CRD whose defaults are checked against
# it is refused ("Maximum boundary value must be of type integer"). 2**53 - 1 is the largest integer a JSON
# number holds exactly; the models refuse what the API server would.
INTEGER_MAX = 2**53 - 1
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, enforced twice with one message: by the API server and by the model.

    `cel` is the `x-kubernetes-validations` rule (with `self` the object the model describes);
    `holds` is the same predicate in Python. A unit test evaluates both over the bad-input catalog.
    """

    cel: str
    message: str
    holds: Callable[[Any], bool]
    field_path: str | None = None  # relative JSON path the error points at (reason FieldValueInvalid)

    def schema(self) -> dict[str, str]:
        entry = {"rule": self.cel, "message": self.message}
        if self.field_path:
            entry["fieldPath"] = self.field_path
        return entry


def _cel_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _must_match(pattern: str, message: str) -> AfterValidator:
    """The model's half of a regex rule; `_cel_must_match` is the API server's, with the same message."""

    def check(value: str) -> str:
        if not re.search(pattern, value):
            raise ValueError(message)
        return value

    return AfterValidator(check)


def _cel_must_match(pattern: str, message: str) -> Any:
    rule: dict[str, Any] = {"rule": f"self.matches({_cel_string(pattern)})", "message": message}
    return Field(min_length=1, max_length=1024, json_schema_extra={"x-kubernetes-validations": [rule]})


MODEL_ALLOWED = "s3://bucket/prefix/, hf://org/name, file:///path or an absolute path"
DATA_ALLOWED = "s3://bucket/key, s3://bucket/prefix/, file:///path or an absolute path"
_MODEL_MESSAGE = f"must be {MODEL_ALLOWED}"
_DATA_MESSAGE = f"must be {DATA_ALLOWED}"
_TEMPLATE = r"(?s)\{prompt\}.*\{response\}"
_TEMPLATE_MESSAGE = "must contain {prompt} followed by {response}"
ModelUri = Annotated[str, _cel_must_match(MODEL_URI, _MODEL_MESSAGE), _must_match(MODEL_URI, _MODEL_MESSAGE)]
DataUri = Annotated[str, _cel_must_match(DATA_URI, _DATA_MESSAGE), _must_match(DATA_URI, _DATA_MESSAGE)]
InstructionTemplate = Annotated[
    str, _cel_must_match(_TEMPLATE, _TEMPLATE_MESSAGE), _must_match(_TEMPLATE, _TEMPLATE_MESSAGE)
]


class ApiModel(BaseModel):
    """Base for every API model: camelCase on the wire, unknown fields rejected, types strict.

    Strict like the API server's schema: "yes" is not a boolean and "4" is not an integer.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        strict=True,
        allow_inf_nan=False,  # JSON has no inf/nan: the API server could never store one
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        for rule in type(self).rules:
            if not rule.holds(self):
                raise ValueError(rule.message)
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        schema = handler(core_schema)
        schema = handler.resolve_ref_schema(schema)
        if cls.rules:
            schema["x-kubernetes-validations"] = [rule.schema() for rule in cls.rules]
        return schema


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    source: ModelUri = Field(
        description="Where the base model (config.json, weights, tokenizer) is: s3://bucket/prefix/, hf://org/name "
        "(where the cluster reaches the Hugging Face Hub), or a path on a mounted volume.",
    )
    revision: str | None = Field(
        default=None, min_length=1, max_length=255, description="Branch, tag or commit; hf:// sources only."
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run Python code shipped with the model. Off by default: it executes arbitrary code.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!has(self.revision) || self.source.startsWith('hf://')",
            "model.revision is only valid with an hf:// source",
            lambda m: m.revision is None or m.source.startswith("hf://"),
            ".revision",
        ),
    )


class DatasetFields(ApiModel):
    """Column names in the dataset rows."""

    prompt: str = Field(
        default="prompt",
        min_length=1,
        max_length=128,
        description="Instruction and preference formats: the prompt column (in the preference chat form a list of "
        "messages; absent there when chosen and rejected carry the shared conversation).",
    )
    response: str = Field(
        default="response",
        min_length=1,
        max_length=128,
        description="Instruction format: the response column.",
    )
    messages: str = Field(
        default="messages",
        min_length=1,
        max_length=128,
        description="Chat format: the column holding a list of {role, content} messages.",
    )
    text: str = Field(default="text", min_length=1, max_length=128, description="Text format: the text column.")
    chosen: str = Field(
        default="chosen",
        min_length=1,
        max_length=128,
        description="Preference format: the preferred answer (a string, or a list of {role, content} messages).",
    )
    rejected: str = Field(
        default="rejected",
        min_length=1,
        max_length=128,
        description="Preference format: the dispreferred answer, in the same form as chosen.",
    )


class DatasetSpec(ApiModel):
    """Training (and evaluation) data."""

    train: DataUri = Field(
        description="Training data: a .jsonl, .json, .csv or .parquet object or file, "
        "or a prefix/directory holding them.",
    )
    eval: DataUri | None = Field(
        default=None, description="Evaluation data in the same formats. When absent, evalSplit is held out."
    )
    eval_split: float = Field(
        default=0.05,
        ge=0,
        lt=0.5,
        description="Fraction of train held out (seeded) for evaluation when eval is absent; 0 disables eval.",
    )
    format: Literal["instruction", "chat", "text", "preference"] = Field(
        default="instruction",
        description="instruction: prompt/response rows rendered with template; chat: a messages list rendered "
        "with the tokenizer's chat template, the loss on each assistant message and its end-of-turn token only "
        "(a row whose template leaves no assistant token fails the run); text: plain text rows; "
        "preference: prompt/chosen/rejected rows for objective dpo (strings, or message lists rendered with the "
        "chat template).",
    )
    fields: DatasetFields = Field(default_factory=DatasetFields, description="Column names in the rows.")
    template: InstructionTemplate = Field(
        default=DEFAULT_INSTRUCTION_TEMPLATE,
        max_length=4096,
        description="Instruction format: how a row becomes text. Must contain {prompt} and then {response}; "
        "the loss counts only what {response} renders (and the EOS token). Default: the seed guide's.",
    )
    max_length: int = Field(
        default=2048,
        ge=16,
        le=131072,
        description="Tokens per training sequence; longer examples are truncated.",
    )
    packing: bool = Field(
        default=True,
        description="Pack whole examples into rows of up to training.batchTokens tokens, one row a micro-batch "
        "(no padding; attention and loss kept within each example). Much higher throughput on short rows; on "
        "by default. Not used by the preference format "
        "(each pair is one padded chosen and one rejected sequence).",
    )


class QuantizationSpec(ApiModel):
    """bitsandbytes quantization of the frozen base weights (QLoRA)."""

    bits: Literal[4, 8] = Field(default=4, description="4 (QLoRA, NF4 by default) or 8 (LLM.int8 LoRA).")
    type: Literal["nf4", "fp4"] = Field(
        default="nf4",
        description="4-bit data type. nf4 is information-theoretically optimal for normal weights "
        "(QLoRA paper, Dettmers et al. 2023).",
    )
    double_quant: bool = Field(
        default=True,
        description="Quantize the quantization constants too: ~0.4 bits/parameter saved (QLoRA paper).",
    )


class LoraSpec(ApiModel):
    """LoRA adapter shape (PEFT)."""

    r: int = Field(default=16, ge=1, le=1024, description="Adapter rank. 16 is a common default for 7-8B models.")
    alpha: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Scaling numerator (scale = alpha / r); 2*r is the usual choice.",
    )
    dropout: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description="Dropout on the adapter input; 0.05 is the QLoRA paper's for 7-13B models. Adapted modules "
        "that read the same input (q/k/v_proj, gate/up_proj) share one dropped copy of it.",
    )
    target_modules: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description="Modules that get adapters: all-linear (every linear layer but the output head; the QLoRA "
        "paper found all layers needed to match full fine-tuning) or names such as q_proj, v_proj.",
    )


class MethodSpec(ApiModel):
    """How the model is adapted."""

    type: Literal["qlora", "lora", "full"] = Field(
        default="qlora",
        description="qlora: LoRA on a 4- or 8-bit quantized frozen base (least memory); lora: LoRA on a "
        "16-bit base; full: every weight trained.",
    )
    quantization: QuantizationSpec | None = Field(
        default=None, description="qlora only. Default: 4-bit nf4 with double quantization."
    )
    lora: LoraSpec | None = Field(
        default=None, description="qlora and lora only. Default: r 16, alpha 32, dropout 0.05, all-linear."
    )

    rules = (
        Rule(
            "!has(self.quantization) || self.type == 'qlora'",
            "method.quantization is only valid with method.type qlora",
            lambda m: m.quantization is None or m.type == "qlora",
            ".quantization",
        ),
        Rule(
            "!has(self.lora) || self.type != 'full'",
            "method.lora is only valid with method.type qlora or lora",
            lambda m: m.lora is None or m.type != "full",
            ".lora",
        ),
    )

    def effective_quantization(self) -> QuantizationSpec | None:
        if self.type != "qlora":
            return None
        return self.quantization or QuantizationSpec()

    def effective_lora(self) -> LoraSpec | None:
        if self.type == "full":
            return None
        return self.lora or LoraSpec()


DpoLoss = Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "apo_zero", "apo_down", "sppo_hard"]
# Loss variants whose label smoothing means something, and its default for each (the papers' values).
LABEL_SMOOTHING_DEFAULTS = {"robust": 0.1, "exo_pair": 1e-3}


class DpoSpec(ApiModel):
    """Direct Preference Optimization settings (TRL's DPOTrainer)."""

    beta: float = Field(
        default=0.1,
        gt=0,
        le=100,
        description="How far the policy may move from the reference: higher keeps it closer. 0.1 is the DPO "
        "paper's (Rafailov et al. 2023); for ipo it is the regularization tau of the IPO paper.",
    )
    loss: DpoLoss = Field(
        default="sigmoid",
        description="sigmoid: DPO; ipo: IPO (Azar et al. 2023); hinge: SLiC; robust: Robust DPO for noisy labels "
        "(Chowdhury et al. 2024); exo_pair: EXO; nca_pair: NCA; apo_zero, apo_down: APO; sppo_hard: SPPO. All "
        "take the same prompt/chosen/rejected pairs (TRL's loss_type).",
    )
    label_smoothing: float | None = Field(
        default=None,
        ge=0,
        lt=0.5,
        description="robust and exo_pair only: the assumed probability that a label is flipped (robust; default "
        "0.1, the Robust DPO paper's) or EXO's epsilon (default 1e-3, the EXO paper's).",
    )
    max_prompt_length: int | None = Field(
        default=None,
        ge=1,
        le=131072,
        description="Prompt tokens kept per pair (default: half of dataset.maxLength); longer prompts keep their "
        "end (the part next to the answer). "
        "The pair's sequences are then cut to dataset.maxLength, keeping the start of each answer. Both are "
        "counted in metrics.json (truncated_examples).",
    )
    sft_weight: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description="Weight of an added negative log-likelihood term on the chosen answers (RPO, Pang et al. "
        "2024, who use 1.0). 0 disables it.",
    )
    reference_model: ModelSpec | None = Field(
        default=None,
        description="The frozen reference policy, when it is not the base model. Unset with qlora/lora: the base "
        "with the adapter disabled (no second copy in memory). Unset with full: a frozen copy of the base, which "
        "costs a second full set of weights in the training precision (e.g. ~16 GB more for an 8B model in bf16).",
    )

    rules = (
        Rule(
            "!has(self.labelSmoothing) || self.loss == 'robust' || self.loss == 'exo_pair'",
            "objective.dpo.labelSmoothing is only valid with objective.dpo.loss robust or exo_pair",
            lambda d: d.label_smoothing is None or d.loss in LABEL_SMOOTHING_DEFAULTS,
            ".labelSmoothing",
        ),
    )

    def effective_max_prompt_length(self, max_length: int) -> int:
        return self.max_prompt_length if self.max_prompt_length is not None else max_length // 2

    def effective_label_smoothing(self) -> float:
        if self.label_smoothing is not None:
            return self.label_smoothing
        return LABEL_SMOOTHING_DEFAULTS.get(self.loss, 0.0)


class ObjectiveSpec(ApiModel):
    """What the training optimizes: supervised fine-tuning (sft) or preference optimization (dpo)."""

    type: Literal["sft", "dpo"] = Field(
        default="sft",
        description="sft: next-token loss on the responses (dataset.format instruction, chat or text); dpo: Direct "
        "Preference Optimization on chosen/rejected pairs (dataset.format preference), with LoRA, QLoRA or full.",
    )
    dpo: DpoSpec | None = Field(
        default=None,
        description="type dpo only. Default: beta 0.1, loss sigmoid, maxPromptLength half of dataset.maxLength, "
        "sftWeight 0, the base model as reference.",
    )

    rules = (
        Rule(
            "!has(self.dpo) || self.type == 'dpo'",
            "objective.dpo is only valid with objective.type dpo",
            lambda o: o.dpo is None or o.type == "dpo",
            ".dpo",
        ),
    )

    def effective_dpo(self) -> DpoSpec | None:
        if self.type != "dpo":
            return None
        return self.dpo or DpoSpec()


class EarlyStoppingSpec(ApiModel):
    """Stop when eval loss stops improving."""

    patience: int = Field(default=3, ge=1, le=1000, description="Evaluations without improvement before stopping.")
    threshold: float = Field(default=0.0, ge=0, description="Minimum eval-loss decrease that counts as improvement.")


DEFAULT_EPOCHS = 3


class TrainingSpec(ApiModel):
    """The optimization loop."""

    epochs: float | None = Field(
        default=None,
        gt=0,
        le=1000,
        description=f"Passes over the data ({DEFAULT_EPOCHS} when maxSteps is not set).",
    )
    max_steps: int | None = Field(
        default=None, ge=1, le=INTEGER_MAX, description="Optimizer steps to run, instead of epochs."
    )
    learning_rate: float = Field(
        default=2e-4,
        gt=0,
        le=1,
        description="Peak learning rate. 2e-4 is the QLoRA paper's for 7-13B models.",
    )
    batch_size: int = Field(
        default=4,
        ge=1,
        le=4096,
        description="Without dataset.packing: sequences per device per micro-batch. With packing, "
        "batchTokens sets the micro-batch instead.",
    )
    batch_tokens: int | None = Field(
        default=None,
        ge=1,
        le=INTEGER_MAX,
        description="With dataset.packing: tokens per device per micro-batch. Whole examples are packed into "
        "one row of at most this many tokens (an example longer than that gets a row of its own), so "
        "activation memory follows tokens, not batchSize x maxLength; gradientAccumulationSteps such rows "
        "make an optimizer step. Unset: dataset.maxLength.",
    )
    gradient_accumulation_steps: int = Field(default=2, ge=1, le=4096, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule after warm-up."
    )
    weight_decay: float = Field(default=0.0, ge=0, lt=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(
        default=0.3,
        ge=0,
        description="Gradient clipping norm; 0.3 is the QLoRA paper's. 0 disables clipping.",
    )
    optimizer: Literal["auto", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        default="auto",
        description="auto: paged 8-bit AdamW for qlora on CUDA (QLoRA paper's paged optimizers), fused "
        "AdamW elsewhere.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="auto: bf16 where the hardware supports it (CUDA GPUs since Ampere; CPUs with AVX512-BF16 or "
        "AMX), else fp16 on GPU, fp32 on CPU.",
    )
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="Recompute activations in backward: much less activation memory for ~1/3 more compute. "
        "Unset: on with a GPU, where memory bounds batch and sequence length; off on a CPU, where memory "
        "is plentiful and the recomputed forward pass is pure cost.",
    )
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seed for data order, splits and init.")
    log_every_steps: int = Field(
        default=10, ge=1, le=INTEGER_MAX, description="Steps between log lines and progress updates."
    )
    eval_every_steps: int = Field(
        default=100, ge=1, le=INTEGER_MAX, description="Steps between evaluations (and at the end)."
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None, description="Stop when eval loss stops improving. Off when absent."
    )
    checkpoint_every_steps: int = Field(
        default=200, ge=1, le=INTEGER_MAX, description="Steps between checkpoints under <destination>/checkpoints/."
    )
    checkpoints_to_keep: int = Field(default=2, ge=1, le=100, description="Newest complete checkpoints kept.")

    rules = (
        Rule(
            "!(has(self.epochs) && has(self.maxSteps))",
            "set either training.epochs or training.maxSteps, not both",
            lambda t: not (t.epochs is not None and t.max_steps is not None),
        ),
    )

    def effective_epochs(self) -> float:
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS


class EvaluationSpec(ApiModel):
    """Sample generations saved with the artifacts."""

    prompts: list[Annotated[str, StringConstraints(min_length=1, max_length=8192)]] = Field(
        default_factory=list,
        max_length=32,
        description="Prompts (raw; instruction-format runs wrap them in the template) to generate from after "
        "training; results go to samples.jsonl.",
    )
    max_new_tokens: int = Field(default=128, ge=1, le=4096, description="Tokens generated per prompt.")


class OutputSpec(ApiModel):
    """Where checkpoints and artifacts go."""

    destination: DataUri = Field(
        description="Prefix for checkpoints/, adapter/, metrics.json, samples.jsonl and README.md. "
        "A restarted run with the same destination resumes from its newest complete checkpoint. A destination "
        "holds one run: its run.json records what defines it, and a spec that differs fails (exit 2) naming "
        "the changed fields, unless overwrite is set.",
    )
    overwrite: bool = Field(
        default=False,
        description="When the destination holds another run (a spec that differs in a field that shapes the "
        "weights or artifacts), delete its checkpoints and artifacts and train this one in its place. The same "
        "run still resumes: a restart never deletes its own checkpoints.",
    )
    merge_adapter: bool = Field(
        default=False,
        description="Also write merged/: the adapter merged into a 16-bit copy of the base (never into 4-bit "
        "weights, which degrades quality).",
    )


class StorageSpec(ApiModel):
    """How s3:// URIs are reached."""

    endpoint: str | None = Field(
        default=None,
        max_length=1024,
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="S3-compatible endpoint URL (MinIO, SeaweedFS, Ceph...); path-style addressing is used. "
        "Empty: AWS S3.",
    )
    region: str = Field(default="us-east-1", min_length=1, max_length=64, description="S3 region.")


class MlflowSpec(ApiModel):
    """An MLflow tracking server the run reports to (transformers' MLflowCallback)."""

    tracking_uri: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^(https?://\S+|databricks(://\S+)?)$",
        description="MLflow tracking server, e.g. http://mlflow.mlflow:5000 (or databricks).",
    )
    experiment: str = Field(
        default="kubetune",
        min_length=1,
        max_length=500,
        description="Experiment the run is logged under; created when missing.",
    )
    run_name: str | None = Field(
        default=None, min_length=1, max_length=250, description="Name of the MLflow run. Default: the job's name."
    )


class WandbSpec(ApiModel):
    """A Weights & Biases project the run reports to (transformers' WandbCallback)."""

    project: str = Field(min_length=1, max_length=128, description="W&B project.")
    entity: str | None = Field(default=None, min_length=1, max_length=128, description="W&B team or user.")
    mode: Literal["online", "offline"] = Field(
        default="online",
        description="online: send to W&B as the run goes; offline: write the run directory only (uploaded to "
        "<destination>/wandb/, to push later with `wandb sync`).",
    )
    run_name: str | None = Field(
        default=None, min_length=1, max_length=128, description="Name of the W&B run. Default: the job's name."
    )


class TrackingSpec(ApiModel):
    """Experiment trackers that receive the run's config, per-step metrics, final result and model card.
    Off when absent. A tracker that cannot be reached never fails the run: status.tracking says so."""

    mlflow: MlflowSpec | None = Field(default=None, description="Report to an MLflow tracking server.")
    wandb: WandbSpec | None = Field(default=None, description="Report to Weights & Biases.")


class TrainerConfig(ApiModel):
    """The training part of a FineTuneJob: everything the trainer reads, and nothing secret.

    Secret references (model.tokenSecretRef, storage.credentialsSecretRef, the trackers' credentials) are the
    FineTuneJob's: the operator turns them into env from Secrets, and the trainer reads the standard variables
    (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...)."""

    model: ModelSpec = Field(description="The base model.")
    dataset: DatasetSpec = Field(description="Training and evaluation data.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="qlora (default), lora or full.")
    objective: ObjectiveSpec = Field(
        default_factory=ObjectiveSpec, description="sft (default) or dpo, with DPO's settings."
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimization settings.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Sample generations.")
    output: OutputSpec = Field(description="Where checkpoints and artifacts are written.")
    storage: StorageSpec = Field(
        default_factory=StorageSpec,
        description="S3 endpoint and region. Credentials are never in the config: the trainer reads the standard "
        "AWS_* variables, which the operator sets from the FineTuneJob's storage.credentialsSecretRef.",
    )
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow and W&B; off by default.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!self.output.mergeAdapter || self.method.type != 'full'",
            "output.mergeAdapter is only valid with method.type qlora or lora",
            lambda c: not c.output.merge_adapter or c.method.type != "full",
        ),
        Rule(
            "(self.objective.type == 'dpo') == (self.dataset.format == 'preference')",
            "objective.type dpo needs dataset.format preference, and dataset.format preference needs "
            "objective.type dpo",
            lambda c: (c.objective.type == "dpo") == (c.dataset.format == "preference"),
        ),
        Rule(
            "!has(self.objective.dpo) || !has(self.objective.dpo.maxPromptLength) || "
            "self.objective.dpo.maxPromptLength < self.dataset.maxLength",
            "objective.dpo.maxPromptLength must be less than dataset.maxLength (the answers need room)",
            lambda c: (
                c.objective.dpo is None
                or c.objective.dpo.max_prompt_length is None
                or c.objective.dpo.max_prompt_length < c.dataset.max_length
            ),
        ),
    )

    def packed_row_tokens(self) -> int:
        """With packing: the token budget of one packed row, which is one micro-batch per device."""
        return self.training.batch_tokens or self.dataset.max_length

    def micro_batch_size(self) -> int:
        """Sequences (pairs for dpo) per device per micro-batch: one packed row with packing, else batchSize.

        The preference format is never packed: each pair is one chosen and one rejected sequence."""
        return 1 if self.dataset.packing and self.dataset.format != "preference" else self.training.batch_size

    def trainer_json(self) -> dict[str, Any]:
        """The config.json document: camelCase, defaults filled in."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def error_path(location: Sequence[int | str]) -> str:
    """A pydantic error's location as a dotted field path (`dataset.maxLength`, `items.0.name`)."""
    return ".".join(str(part) for part in location if part != "")


def describe_errors(
    error: ValidationError, meant: Callable[[Sequence[int | str]], str | None] | None = None
) -> list[str]:
    """Pydantic errors as `field.path: message`, in the names the input used (camelCase on the wire).

    `meant(location)` names the field an unknown one most likely meant; the FineTuneJob's API passes its
    spelling helper, so `kubetune validate`, the operator and the trainer word a refusal the same way."""
    problems = []
    for item in error.errors():
        path = error_path(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            guess = meant(item["loc"]) if meant is not None else None
            message = f"unknown field; did you mean `{guess}`?" if guess else "unknown field"
        problems.append(f"{path}: {message}" if path else message)
    return problems
