"""`spec.pod`: what a cluster asks of every pod that kubetune cannot know, added to the trainer pods.

Extra environment (a proxy, a mirror of the Hugging Face Hub), volumes and where they are mounted (a PVC holding
the model), labels and annotations (cost centres, service meshes, admission policies), and image pull Secrets.
Each is checked where it could break what kubetune sets: no env, volume, mount path, label or annotation of the
operator's own, and no literal value for a variable whose name says it holds a secret (the spec is readable by
anyone who may read FineTuneJobs; a Secret is the place for it). Part of the API (`api` embeds `PodSpec`), so
the CRD carries the same rules as CEL.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from kubetune_trainer.config import DNS_SUBDOMAIN, ApiModel, Rule
from kubetune_trainer.contract import CONFIG_PATH

ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"  # what the API server allows for an env var name
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

# What the operator sets on every trainer pod, which spec.pod may not replace.
OPERATOR_ENV_PREFIX = "KUBETUNE_"
OPERATOR_ENV = (
    "HF_HOME",
    "XDG_CACHE_HOME",
    "TMPDIR",
    "HF_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "WANDB_API_KEY",
    "JOB_COMPLETION_INDEX",
)
OPERATOR_VOLUMES = ("config", "dshm", "cache", "tmp")
OPERATOR_MOUNT_PATHS = (CONFIG_PATH.rsplit("/", 1)[0], "/dev/shm", "/cache", "/tmp")
# Label and annotation prefixes the operator and the Job controller own.
OPERATOR_KEY_PREFIXES = ("kubetune.dev/", "app.kubernetes.io/", "batch.kubernetes.io/", "kueue.x-k8s.io/")
# A variable named like this holds a secret: it must come from a Secret (valueFrom), not a literal value.
SECRET_NAME = r"(?i)(password|passwd|secret|token|api_?key|access_?key|credential|private_?key)"


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{value}'" for value in values) + "]"


def _cel_no_prefix(variable: str, prefixes: tuple[str, ...]) -> str:
    return " && ".join(f"!{variable}.startsWith('{prefix}')" for prefix in prefixes)


class KeySelector(ApiModel):
    """A key of a Secret or ConfigMap in the FineTuneJob's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the object.")
    key: str = Field(min_length=1, max_length=253, description="The key whose value the variable gets.")
    optional: bool | None = Field(default=None, description="Start the pod even when the key is missing.")


class EnvSource(ApiModel):
    """Where a variable's value comes from: a Secret's key or a ConfigMap's key."""

    secret_key_ref: KeySelector | None = Field(default=None, description="A key of a Secret.")
    config_map_key_ref: KeySelector | None = Field(default=None, description="A key of a ConfigMap.")

    rules = (
        Rule(
            "has(self.secretKeyRef) != has(self.configMapKeyRef)",
            "valueFrom needs exactly one of secretKeyRef and configMapKeyRef",
            lambda s: (s.secret_key_ref is None) != (s.config_map_key_ref is None),
        ),
    )


class EnvVar(ApiModel):
    """An environment variable of the trainer container (core/v1 EnvVar, value or Secret/ConfigMap key)."""

    name: str = Field(min_length=1, max_length=256, pattern=ENV_NAME, description="Variable name, e.g. HTTPS_PROXY.")
    value: str | None = Field(default=None, max_length=32768, description="Literal value (not for secrets).")
    value_from: EnvSource | None = Field(default=None, description="The value from a Secret's or ConfigMap's key.")

    rules = (
        Rule(
            "!(has(self.value) && has(self.valueFrom))",
            "set value or valueFrom, not both",
            lambda e: e.value is None or e.value_from is None,
        ),
        Rule(
            f"!(self.name in {_cel_list(OPERATOR_ENV)}) && !self.name.startsWith('{OPERATOR_ENV_PREFIX}')",
            f"kubetune sets this variable itself ({', '.join(OPERATOR_ENV)} and {OPERATOR_ENV_PREFIX}*): "
            "use the spec's own field (storage.credentialsSecretRef, model.tokenSecretRef, tracking) instead",
            lambda e: e.name not in OPERATOR_ENV and not e.name.startswith(OPERATOR_ENV_PREFIX),
            ".name",
        ),
        Rule(
            f"!has(self.value) || !self.name.matches('{SECRET_NAME}')",
            "a variable named like a secret takes its value from a Secret (valueFrom.secretKeyRef), never "
            "a literal value: FineTuneJobs are readable by more people than Secrets",
            lambda e: e.value is None or not re.search(SECRET_NAME, e.name),
            ".value",
        ),
    )


class Volume(ApiModel):
    """A core/v1 Volume added to the trainer pods (persistentVolumeClaim, configMap, secret, csi, nfs...). Its name
    is checked here, the rest by the API server when the Job is created."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL, description="Volume name.")

    rules = (
        Rule(
            f"!(self.name in {_cel_list(OPERATOR_VOLUMES)})",
            f"volume names {', '.join(OPERATOR_VOLUMES)} are kubetune's own; choose another name",
            lambda v: v.name not in OPERATOR_VOLUMES,
            ".name",
        ),
    )

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        schema = super().__get_pydantic_json_schema__(core_schema, handler)
        schema["x-kubernetes-preserve-unknown-fields"] = True
        return schema


class VolumeMount(ApiModel):
    """Where one of spec.pod.volumes appears in the trainer container."""

    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL, description="A volume of spec.pod.volumes.")
    mount_path: str = Field(
        min_length=2, max_length=4096, pattern=r"^/", description="Absolute path in the container, e.g. /models."
    )
    read_only: bool = Field(default=False, description="Mount read-only.")
    sub_path: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="A path inside the volume to mount instead of its root.",
    )

    rules = (
        Rule(
            f"!(self.mountPath in {_cel_list(OPERATOR_MOUNT_PATHS)})",
            f"mount paths {', '.join(OPERATOR_MOUNT_PATHS)} are kubetune's own; choose another path",
            lambda m: m.mount_path not in OPERATOR_MOUNT_PATHS,
            ".mountPath",
        ),
    )


class LocalObjectReference(ApiModel):
    """An object in the FineTuneJob's namespace, by name."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the Secret.")


# The API server keeps such a list's names unique (and a server-side apply merges it by name).
LIST_MAP_BY_NAME: dict[str, Any] = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}
LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE)]
AnnotationValue = Annotated[str, StringConstraints(max_length=65536)]


def _keys_rule(what: str) -> Rule:
    # Only the prefixes: the syntax of each key is checked by the API server when the Job is created (a
    # FineTuneJob cannot check it at admission: CEL cannot bound the cost of a regex over a map's keys).
    return Rule(
        f"!has(self.{what}) || self.{what}.all(k, {_cel_no_prefix('k', OPERATOR_KEY_PREFIXES)})",
        f"pod.{what}: keys under {', '.join(OPERATOR_KEY_PREFIXES)} are set by kubetune and Kubernetes",
        lambda p: not any(k.startswith(OPERATOR_KEY_PREFIXES) for k in getattr(p, what)),
    )


class PodSpec(ApiModel):
    """Additions to the trainer pods, for what a cluster asks of every pod: env, volumes, labels, annotations,
    image pull Secrets. kubetune's own settings cannot be replaced through it."""

    labels: dict[str, LabelValue] = Field(
        default_factory=dict, max_length=64, description="Labels added to the trainer pods."
    )
    annotations: dict[str, AnnotationValue] = Field(
        default_factory=dict,
        max_length=64,
        description="Annotations added to the trainer pods (e.g. for a service mesh).",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=128,
        description="Environment variables added to the trainer container, e.g. HTTPS_PROXY or HF_ENDPOINT. "
        "Secrets only through valueFrom.secretKeyRef.",
        json_schema_extra=LIST_MAP_BY_NAME,
    )
    volumes: list[Volume] = Field(
        default_factory=list,
        max_length=32,
        description="core/v1 Volumes added to the pods, e.g. a persistentVolumeClaim holding the model (then "
        "model.source: /models/NAME with a volumeMount at /models).",
        json_schema_extra=LIST_MAP_BY_NAME,
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, max_length=32, description="Where spec.pod.volumes appear in the trainer container."
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list,
        max_length=16,
        description="Secrets for pulling the trainer image from a private registry.",
    )

    rules = (
        _keys_rule("labels"),
        _keys_rule("annotations"),
        Rule(
            # has(): the API server checks these rules against the schema's default ({}) too, before defaulting
            "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && "
            "self.volumes.exists(v, v.name == m.name))",
            "pod.volumeMounts: each name must be one of pod.volumes",
            lambda p: {m.name for m in p.volume_mounts} <= {v.name for v in p.volumes},
        ),
    )

    @model_validator(mode="after")
    def _names_once(self) -> PodSpec:
        # The API server's half is the lists' x-kubernetes-list-type map: it refuses a name given twice.
        for what, names in (("env", [e.name for e in self.env]), ("volumes", [v.name for v in self.volumes])):
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ValueError(f"pod.{what}: {', '.join(twice)} given more than once; each name at most once")
        return self
