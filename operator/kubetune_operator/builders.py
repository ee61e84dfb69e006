"""Pure builders: a FineTuneJob and the operator's settings in, the Kubernetes objects it runs as out.

Everything a builder needs arrives as an argument (STYLE.md habit 2): no globals, no API calls, so a unit
test checks every field without a cluster. Children have fixed names derived from the parent, which makes
creating them idempotent (a 409 means "already there").
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from kubetune_operator import API_GROUP, API_VERSION, KIND
from kubetune_operator.api import (
    DEFAULT_CPU_PER_GPU,
    DEFAULT_DISK,
    DEFAULT_MEMORY_GI_PER_GPU,
    FineTuneJob,
)
from kubetune_operator.settings import Settings
from kubetune_trainer import contract

TRAINER_CONTAINER = "trainer"
CONFIG_FILE = "config.json"
CONFIG_DIR = contract.CONFIG_PATH.rsplit("/", 1)[0]
CONFIGMAP_SUFFIX = "-trainer"
SERVICE_SUFFIX = "-nodes"
DNS_LABEL_MAX = 63
RUN_AS = 65532  # the trainer image's non-root user and group

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_FINETUNEJOB = f"{API_GROUP}/finetunejob"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"  # set by the Job controller on the pods of a Job
LABEL_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # the node of a multi-node run's pod
# On a Kueue Workload the operator deactivated for spec.runPolicy.suspend: only such a Workload is reactivated.
ANNOTATION_DEACTIVATED = f"{API_GROUP}/deactivated-for-suspend"
MANAGED_BY = "kubetune"

CACHE_DIR = "/cache"
CACHE_ENV = {"HF_HOME": f"{CACHE_DIR}/huggingface", "XDG_CACHE_HOME": CACHE_DIR, "TMPDIR": "/tmp"}


def dns_name(base: str, suffix: str = "", limit: int = DNS_LABEL_MAX) -> str:
    """`base + suffix`, cut to `limit` characters with a stable hash of the full name when too long.

    Two different long names never collapse into one child name, and the same name always gives the same
    child (so a restarted operator finds what it created).
    """
    full = base + suffix
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-.')}-{digest}{suffix}"


def configmap_name(job: FineTuneJob) -> str:
    return dns_name(job.metadata.name, CONFIGMAP_SUFFIX)


def job_name(job: FineTuneJob) -> str:
    # The Job controller copies the Job name into a pod label, so it must fit a label value; the pods of an
    # Indexed Job are also named (hostname) `<job>-<index>`, which must fit a DNS label.
    nodes = job.spec.resources.nodes
    return dns_name(job.metadata.name, limit=DNS_LABEL_MAX - (len(f"-{nodes - 1}") if nodes > 1 else 0))


def service_name(job: FineTuneJob) -> str:
    # The pod's subdomain: `<job>-<index>.<service>` must stay a valid DNS name (each label <= 63).
    return dns_name(job.metadata.name, SERVICE_SUFFIX)


def is_multi_node(job: FineTuneJob) -> bool:
    return job.spec.resources.nodes > 1


def labels(job: FineTuneJob) -> dict[str, str]:
    """Labels of every child; `LABEL_MANAGED_BY` is what the operator's Job and Pod watches select on."""
    name = job.metadata.name
    return {
        LABEL_NAME: "kubetune-trainer",
        LABEL_INSTANCE: name,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PART_OF: "kubetune",
        LABEL_FINETUNEJOB: name,
    }


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    """The FineTuneJob as controller of a child: deleting it deletes the child (garbage collection)."""
    if not job.metadata.uid:
        raise ValueError(f"FineTuneJob {job.metadata.name} has no metadata.uid: children need it to be owned")
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: FineTuneJob, name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": {**labels(job), **(extra_labels or {})}}
    if job.metadata.namespace:
        metadata["namespace"] = job.metadata.namespace
    if job.metadata.uid:
        metadata["ownerReferences"] = [owner_reference(job)]
    return metadata


def trainer_config_json(job: FineTuneJob) -> str:
    """config.json: the training part of the spec only; credentials stay Secret references."""
    return json.dumps(job.spec.trainer_config().trainer_json(), indent=2, sort_keys=True) + "\n"


def build_trainer_configmap(job: FineTuneJob, settings: Settings) -> dict[str, Any]:
    """The ConfigMap `<name>-trainer` holding config.json."""
    del settings  # same signature as the other builders; nothing in the ConfigMap is operator-wide
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, configmap_name(job)),
        "data": {CONFIG_FILE: trainer_config_json(job)},
    }


def gpu_resource_name(job: FineTuneJob, settings: Settings) -> str:
    """The spec's resource name when given; the operator's default when the field was left out."""
    resources = job.spec.resources
    return (
        resources.gpu_resource_name
        if "gpu_resource_name" in resources.model_fields_set
        else settings.default_gpu_resource
    )


_QUANTITY_FACTORS = {
    **{suffix: 1024**power for power, suffix in enumerate(("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{suffix: 1000**power for power, suffix in enumerate(("k", "M", "G", "T", "P", "E"), start=1)},
    **{"m": 1e-3, "u": 1e-6, "n": 1e-9},
}


def quantity_bytes(text: str) -> int | None:
    """A Kubernetes quantity of bytes (50Gi, 100G, 1.5Ti, 1e9) as an integer; None for a spelling the API's
    loose pattern lets through but that names no amount (5Gi3)."""
    match = re.fullmatch(r"\+?([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)([a-zA-Z]*)", text)
    if match is None or match.group(2) not in _QUANTITY_FACTORS:
        return None
    return int(float(match.group(1)) * _QUANTITY_FACTORS[match.group(2)])


def disk(job: FineTuneJob) -> str:
    """Local disk per pod: the ephemeral-storage request and limit, and the size limit of each scratch volume."""
    return job.spec.resources.disk or DEFAULT_DISK


def _resources(job: FineTuneJob, settings: Settings) -> dict[str, Any]:
    """What the spec sets is requested and limited; CPU and memory a GPU run leaves out are requested only
    (Burstable: a default too small for the model slows it rather than OOM-kills it)."""
    spec = job.spec.resources
    # Kueue admits a Job only when its ClusterQueue covers every resource the pods request, and few cover
    # ephemeral-storage: a queued run keeps the scratch volumes' size limits and the trainer's check, not the request.
    amounts: dict[str, str] = {} if job.spec.scheduling.queue_name else {"ephemeral-storage": disk(job)}
    defaults: dict[str, str] = {}
    if spec.cpu is not None:
        amounts["cpu"] = spec.cpu
    elif spec.gpus:
        defaults["cpu"] = str(DEFAULT_CPU_PER_GPU * spec.gpus)
    if spec.memory is not None:
        amounts["memory"] = spec.memory
    elif spec.gpus:
        defaults["memory"] = f"{DEFAULT_MEMORY_GI_PER_GPU * spec.gpus}Gi"
    if spec.gpus:
        amounts[gpu_resource_name(job, settings)] = str(spec.gpus)  # extended resources: requests == limits
    if not amounts and not defaults:
        return {}
    return {"requests": {**defaults, **amounts}, "limits": dict(amounts)}


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _env(job: FineTuneJob) -> list[dict[str, Any]]:
    launch = contract.launch_env(
        job.metadata.name,
        job.metadata.namespace or "default",
        termination_grace_seconds=contract.TERMINATION_GRACE_SECONDS,
    )
    env: list[dict[str, Any]] = [
        *({"name": name, "value": value} for name, value in launch.items()),
        *({"name": name, "value": value} for name, value in CACHE_ENV.items()),
    ]
    disk_bytes = quantity_bytes(disk(job))
    if disk_bytes is not None:
        env.append({"name": contract.DISK_BYTES_ENV, "value": str(disk_bytes)})
    credentials = job.spec.storage.credentials_secret_ref
    if credentials is not None:
        env.append(_secret_env("AWS_ACCESS_KEY_ID", credentials.name, credentials.access_key_id_key))
        env.append(_secret_env("AWS_SECRET_ACCESS_KEY", credentials.name, credentials.secret_access_key_key))
        if credentials.session_token_key:
            env.append(_secret_env("AWS_SESSION_TOKEN", credentials.name, credentials.session_token_key))
    token = job.spec.model.token_secret_ref
    if token is not None:
        env.append(_secret_env("HF_TOKEN", token.name, token.key))
    added = [entry.model_dump(by_alias=True, exclude_none=True) for entry in job.spec.pod.env]
    return env + _tracking_env(job) + added  # spec.pod.env cannot name any of ours (pod_api refuses it)


MLFLOW_CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _tracking_env(job: FineTuneJob) -> list[dict[str, Any]]:
    """The trackers' credentials, from Secret references only (config.json holds where, never who)."""
    env: list[dict[str, Any]] = []
    mlflow, wandb = job.spec.tracking.mlflow, job.spec.tracking.wandb
    if mlflow is not None and mlflow.credentials_secret_ref is not None:
        for key in MLFLOW_CREDENTIAL_KEYS:  # basic auth or a token: whichever keys the Secret holds
            entry = _secret_env(key, mlflow.credentials_secret_ref.name, key)
            entry["valueFrom"]["secretKeyRef"]["optional"] = True
            env.append(entry)
    if wandb is not None and wandb.api_key_secret_ref is not None:
        env.append(_secret_env("WANDB_API_KEY", wandb.api_key_secret_ref.name, wandb.api_key_secret_ref.key))
    return env


def rendezvous(job: FineTuneJob) -> contract.Rendezvous | None:
    """Where the nodes of a multi-node run meet (pod 0 of the Indexed Job), or None on one node."""
    if not is_multi_node(job):
        return None
    return contract.pod_rendezvous(job_name(job), service_name(job), job.spec.resources.nodes)


def _container(job: FineTuneJob, settings: Settings) -> dict[str, Any]:
    ports = [{"name": contract.METRICS_PORT_NAME, "containerPort": contract.METRICS_PORT, "protocol": "TCP"}]
    if is_multi_node(job):
        ports.append(
            {"name": contract.RENDEZVOUS_PORT_NAME, "containerPort": contract.RENDEZVOUS_PORT, "protocol": "TCP"}
        )
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": job.spec.image or settings.trainer_image,
        "imagePullPolicy": settings.trainer_image_pull_policy,
        "command": contract.launch_command(job.spec.resources.gpus, rendezvous=rendezvous(job)),
        "env": _env(job),
        "ports": ports,
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            *(mount.model_dump(by_alias=True, exclude_none=True) for mount in job.spec.pod.volume_mounts),
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
        # The trainer writes one JSON object here on every exit; a crash before that leaves the log tail.
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = _resources(job, settings)
    if resources:
        container["resources"] = resources
    return container


def _pod_spec(job: FineTuneJob, settings: Settings) -> dict[str, Any]:
    spec = job.spec
    scheduling = spec.scheduling
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # retries are new pods counted by the Job (podFailurePolicy needs Never)
        "automountServiceAccountToken": False,  # the trainer never talks to the API
        "terminationGracePeriodSeconds": contract.TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(job, settings)],
        "volumes": [
            {"name": "config", "configMap": {"name": configmap_name(job)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}},
            # The model download and checkpoints (tmp) and caches share the pod's disk; neither may outgrow it.
            {"name": "cache", "emptyDir": {"sizeLimit": disk(job)}},
            {"name": "tmp", "emptyDir": {"sizeLimit": disk(job)}},
            *(volume.model_dump(by_alias=True, exclude_none=True) for volume in spec.pod.volumes),
        ],
    }
    if spec.pod.image_pull_secrets:
        pod["imagePullSecrets"] = [secret.model_dump(by_alias=True) for secret in spec.pod.image_pull_secrets]
    if is_multi_node(job):
        pod["subdomain"] = service_name(job)  # each pod is <job>-<index>.<service> (Indexed Job hostnames)
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    if scheduling.node_selector:
        pod["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod["tolerations"] = [
            toleration.model_dump(by_alias=True, exclude_none=True) for toleration in scheduling.tolerations
        ]
    if scheduling.affinity:
        pod["affinity"] = scheduling.affinity
    if scheduling.priority_class_name:
        pod["priorityClassName"] = scheduling.priority_class_name
    return pod


def _pod_metadata(job: FineTuneJob) -> dict[str, Any]:
    """The trainer pods' labels (spec.pod.labels, then kubetune's) and annotations (spec.pod.annotations)."""
    metadata: dict[str, Any] = {"labels": {**job.spec.pod.labels, **labels(job)}}
    if job.spec.pod.annotations:
        metadata["annotations"] = dict(job.spec.pod.annotations)
    return metadata


def pod_failure_policy() -> dict[str, Any]:
    """The exit-code contract: invalid input fails at once; a checkpointed stop and disruptions are retried
    without counting against backoffLimit."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": TRAINER_CONTAINER,
                    "operator": "In",
                    "values": [contract.EXIT_INVALID_INPUT],
                },
            },
            {
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": TRAINER_CONTAINER,
                    "operator": "In",
                    "values": [contract.EXIT_PREEMPTED],
                },
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def job_suspended(job: FineTuneJob) -> bool:
    """Whether the Job is created suspended: asked by the user, or queued (Kueue unsuspends on admission)."""
    return job.spec.run_policy.suspend or bool(job.spec.scheduling.queue_name)


def build_trainer_job(job: FineTuneJob, settings: Settings) -> dict[str, Any]:
    """The batch/v1 Job `<name>` running the trainer: one pod, or one pod per node.

    Several nodes make an Indexed Job (`completions = parallelism = nodes`): pod `<job>-<index>` is node
    `<index>`, and the Job succeeds only when every index has. podFailurePolicy and backoffLimit count for the
    whole run, not per index (no backoffLimitPerIndex): the nodes train one model in lock-step, so a node that
    fails stops its peers, and retrying one index alone cannot make progress.
    """
    spec = job.spec
    queue = spec.scheduling.queue_name
    nodes = spec.resources.nodes
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.run_policy.backoff_limit,
        "completions": nodes,
        "parallelism": nodes,
        "suspend": job_suspended(job),
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": _pod_metadata(job), "spec": _pod_spec(job, settings)},
    }
    if is_multi_node(job):
        job_spec["completionMode"] = "Indexed"
    if spec.run_policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job, job_name(job), {LABEL_KUEUE_QUEUE: queue} if queue else None),
        "spec": job_spec,
    }


def build_nodes_service(job: FineTuneJob, settings: Settings) -> dict[str, Any] | None:
    """The headless Service `<name>-nodes` giving each pod of a multi-node run its DNS name, or None.

    It selects only this run's pods (the Job controller's job-name label and the FineTuneJob's) and publishes
    them before they are ready: the nodes resolve each other while the rendezvous is forming.
    """
    del settings
    if not is_multi_node(job):
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(job)),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_JOB_NAME: job_name(job), LABEL_FINETUNEJOB: job.metadata.name},
            "publishNotReadyAddresses": True,
            "ports": [
                {
                    "name": contract.RENDEZVOUS_PORT_NAME,
                    "port": contract.RENDEZVOUS_PORT,
                    "targetPort": contract.RENDEZVOUS_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def scheduling_patch(job: FineTuneJob, settings: Settings) -> dict[str, Any]:
    """A merge patch bringing a suspended Job's pod template to the spec's scheduling fields.

    Kubernetes lets exactly these template fields change, and only while the Job is suspended and has never
    started (priorityClassName is immutable). `None` removes a field that the spec no longer sets.
    """
    pod = _pod_spec(job, settings)
    return {"spec": {"template": {"spec": {key: pod.get(key) for key in ("nodeSelector", "tolerations", "affinity")}}}}


def suspend_patch(job: FineTuneJob, observed_job: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch making a Job's `suspend` follow spec.runPolicy.suspend, or None if it does.

    With a Kueue queue the operator only ever suspends: resuming is Kueue's (it admits and unsuspends).
    """
    suspended = bool(observed_job.get("spec", {}).get("suspend"))
    if job.spec.run_policy.suspend and not suspended:
        return {"spec": {"suspend": True}}
    if not job.spec.run_policy.suspend and suspended and not job.spec.scheduling.queue_name:
        return {"spec": {"suspend": False}}
    return None


def run_policy_patch(job: FineTuneJob, observed_job: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch making a Job's backoffLimit and activeDeadlineSeconds follow spec.runPolicy (a Job takes
    changes to both while it runs), or None if they do."""
    current = observed_job.get("spec", {})
    wanted = {
        "backoffLimit": job.spec.run_policy.backoff_limit,
        "activeDeadlineSeconds": job.spec.run_policy.active_deadline_seconds,  # None: the patch removes it
    }
    changed = {field: value for field, value in wanted.items() if current.get(field) != value}
    return {"spec": changed} if changed else None


def workload_activation_patch(job: FineTuneJob, workload: dict[str, Any] | None) -> dict[str, Any] | None:
    """The merge patch making a queued run's Kueue Workload follow spec.runPolicy.suspend, or None.

    Kueue unsuspends the Job of an admitted Workload, so suspending the Job alone does not hold: Kueue's way to
    stop a Workload is `spec.active: false` (it evicts it and suspends the Job). Only a Workload the operator
    deactivated is reactivated, never one Kueue or an administrator deactivated.
    """
    if workload is None or not job.spec.scheduling.queue_name:
        return None
    active = workload.get("spec", {}).get("active", True) is not False
    ours = ANNOTATION_DEACTIVATED in (workload.get("metadata", {}).get("annotations") or {})
    if job.spec.run_policy.suspend and active:
        return {"metadata": {"annotations": {ANNOTATION_DEACTIVATED: "true"}}, "spec": {"active": False}}
    if not job.spec.run_policy.suspend and not active and ours:
        return {"metadata": {"annotations": {ANNOTATION_DEACTIVATED: None}}, "spec": {"active": True}}
    return None
