"""The objects the operator creates, checked field by field and against the official Kubernetes schemas."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from kubetune_operator.builders import (
    ANNOTATION_DEACTIVATED,
    LABEL_KUEUE_QUEUE,
    build_nodes_service,
    build_trainer_configmap,
    build_trainer_job,
    configmap_name,
    dns_name,
    job_name,
    owner_reference,
    pod_failure_policy,
    run_policy_patch,
    scheduling_patch,
    suspend_patch,
    workload_activation_patch,
)
from kubetune_operator.settings import Settings
from kubetune_trainer import contract
from tests.objects import finetunejob

SETTINGS = Settings(trainer_image="registry.example/kubetune/trainer:test")
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
SECRET_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "WANDB_API_KEY",
)

CASES: dict[str, dict[str, Any]] = {
    "minimal": {},
    "cpu-only": {"resources": {"gpus": 0, "cpu": "2", "memory": "8Gi"}},
    "multi-gpu": {"resources": {"gpus": 4, "cpu": "32", "memory": "400Gi", "sharedMemory": "32Gi"}},
    "amd": {"resources": {"gpus": 2, "gpuResourceName": "amd.com/gpu"}},
    "scheduling": {
        "scheduling": {
            "nodeSelector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}
                        ]
                    }
                }
            },
            "priorityClassName": "training-high",
        }
    },
    "kueue": {"scheduling": {"queueName": "gpu-queue"}},
    "pod-additions": {
        "model": {"source": "/models/llama-3.1-8b/"},
        "resources": {"disk": "200Gi"},
        "pod": {
            "labels": {"team": "support", "example.com/cost-centre": "ml-42"},
            "annotations": {"sidecar.istio.io/inject": "false"},
            "env": [
                {"name": "HTTPS_PROXY", "value": "http://proxy.internal:3128"},
                {"name": "HF_ENDPOINT", "valueFrom": {"configMapKeyRef": {"name": "hub", "key": "endpoint"}}},
                {"name": "PROXY_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "password"}}},
            ],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}],
            "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
            "imagePullSecrets": [{"name": "registry-credentials"}],
        },
    },
    "multi-node": {"resources": {"gpus": 8, "nodes": 2}, "scheduling": {"queueName": "gpu-queue"}},
    "suspended": {"runPolicy": {"suspend": True, "backoffLimit": 0, "activeDeadlineSeconds": 3600}},
    "secrets": {
        "model": {"source": "hf://org/gated", "tokenSecretRef": {"name": "hf-token", "key": "token"}},
        "storage": {
            "endpoint": "http://minio.storage:9000",
            "credentialsSecretRef": {"name": "s3-credentials", "sessionTokenKey": "AWS_SESSION_TOKEN"},
        },
        "serviceAccountName": "s3-reader",
        "image": "registry.example/custom-trainer:2",
        "tracking": {
            "mlflow": {"trackingUri": "https://mlflow.example", "credentialsSecretRef": {"name": "mlflow-auth"}},
            "wandb": {"project": "support", "apiKeySecretRef": {"name": "wandb", "key": "api-key"}},
        },
    },
}


def built(case: str) -> tuple[dict[str, Any], dict[str, Any]]:
    job = finetunejob(spec=CASES[case])
    return build_trainer_configmap(job, SETTINGS), build_trainer_job(job, SETTINGS)


def built_with_service(case: str) -> list[dict[str, Any]]:
    service = build_nodes_service(finetunejob(spec=CASES[case]), SETTINGS)
    return [*built(case), *([service] if service is not None else [])]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def trainer(obj: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(obj)["containers"]
    return container


def env(obj: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in trainer(obj)["env"]}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_built_object_is_valid_kubernetes(case: str, version: str) -> None:
    for obj in built_with_service(case):
        kubernetes_validate.validate(obj, version, strict=True)


def test_children_are_named_after_the_finetunejob_and_owned_by_it() -> None:
    configmap, job = built("minimal")
    assert job["metadata"]["name"] == "support-bot"
    assert configmap["metadata"]["name"] == "support-bot-trainer"
    for obj in (configmap, job):
        assert obj["metadata"]["namespace"] == "default"
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "name": "support-bot",
                "uid": "0e5f3c1a-0000-4000-8000-000000000001",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert obj["metadata"]["labels"] == {
            "app.kubernetes.io/name": "kubetune-trainer",
            "app.kubernetes.io/instance": "support-bot",
            "app.kubernetes.io/managed-by": "kubetune",
            "app.kubernetes.io/part-of": "kubetune",
            "kubetune.dev/finetunejob": "support-bot",
        }
    assert job["spec"]["template"]["metadata"]["labels"] == configmap["metadata"]["labels"]


def test_long_names_are_cut_with_a_stable_hash() -> None:
    long = "a" * 60 + "-xy"
    name = dns_name(long, "-trainer")
    assert len(name) == 63 and name.endswith("-trainer")
    assert name == dns_name(long, "-trainer")
    assert name != dns_name("a" * 60 + "-xz", "-trainer")
    assert configmap_name(finetunejob(long)) == name
    assert job_name(finetunejob(long)) == long  # 63 characters fit a label value as they are
    assert dns_name("short", "-trainer") == "short-trainer"


def test_configmap_holds_the_trainer_config_and_no_secrets() -> None:
    configmap, job = built("secrets")
    config = json.loads(configmap["data"]["config.json"])
    assert config == finetunejob(spec=CASES["secrets"]).spec.trainer_config().trainer_json()
    assert set(config) >= {"model", "dataset", "training", "output", "storage"}
    assert not {"resources", "scheduling", "runPolicy", "image", "serviceAccountName"} & set(config)
    # Not even the references: the trainer never reads them (the Secrets reach it as env, below).
    assert "credentialsSecretRef" not in config["storage"] and "tokenSecretRef" not in config["model"]
    text = configmap["data"]["config.json"]
    for secret in ("aws_secret", "AKIA"):
        assert secret not in text
    # The Secret references reach the pod as env from the Secret, never as literal values.
    values = env(job)
    assert values["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}}
    assert values["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert values["AWS_SESSION_TOKEN"] == {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_SESSION_TOKEN"}}
    assert values["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    for item in trainer(job)["env"]:
        if item["name"] in SECRET_KEYS:
            assert "value" not in item


def keys_of(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {key for value in node.values() for key in keys_of(value)}
    if isinstance(node, list):
        return {key for item in node for key in keys_of(item)}
    return set()


def test_rendered_config_json_holds_no_secret_reference() -> None:
    configmap, _ = built("secrets")
    text = configmap["data"]["config.json"]
    assert not [key for key in keys_of(json.loads(text)) if key.endswith("SecretRef")]
    assert "s3-credentials" not in text and "hf-token" not in text
    assert "mlflow-auth" not in text and '"wandb"' in text and "api-key" not in text  # where, never who
    assert json.loads(text)["tracking"]["mlflow"] == {"trackingUri": "https://mlflow.example", "experiment": "kubetune"}
    # The spec still accepts and keeps them: the CRD shape users write is unchanged.
    spec = finetunejob(spec=CASES["secrets"]).spec
    assert spec.storage.credentials_secret_ref is not None and spec.model.token_secret_ref is not None


def test_without_secret_references_no_credential_env() -> None:
    _, job = built("minimal")
    assert not set(SECRET_KEYS) & set(env(job))


def test_run_identity_and_cache_env() -> None:
    _, job = built("minimal")
    values = env(job)
    assert values[contract.RUN_NAME_ENV] == "support-bot"
    assert values[contract.RUN_NAMESPACE_ENV] == "default"
    assert values[contract.METRICS_PORT_ENV] == str(contract.METRICS_PORT)
    assert values["HF_HOME"].startswith("/cache")


def test_gpu_requests_equal_limits_and_cpu_memory_when_set() -> None:
    _, job = built("multi-gpu")
    resources = trainer(job)["resources"]
    assert resources["requests"] == resources["limits"]
    assert resources["limits"] == {"cpu": "32", "memory": "400Gi", "nvidia.com/gpu": "4", "ephemeral-storage": "50Gi"}
    _, amd = built("amd")
    assert trainer(amd)["resources"]["limits"] == {"amd.com/gpu": "2", "ephemeral-storage": "50Gi"}
    _, cpu_only = built("cpu-only")
    assert trainer(cpu_only)["resources"]["limits"] == {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "50Gi"}


def test_gpu_runs_request_cpu_and_memory_by_default_without_limiting_them() -> None:
    # Before: a BestEffort pod with nothing but nvidia.com/gpu, the first one evicted on a busy node.
    for case, gpus in (("minimal", 1), ("amd", 2)):
        resources = trainer(built(case)[1])["resources"]
        assert resources["requests"]["cpu"] == str(4 * gpus)
        assert resources["requests"]["memory"] == f"{16 * gpus}Gi"
        assert "cpu" not in resources["limits"] and "memory" not in resources["limits"]  # Burstable
    assert trainer(built("cpu-only")[1])["resources"]["requests"]["cpu"] == "2"  # as set, nothing added


def test_the_model_cache_and_scratch_have_a_size_and_the_pod_requests_that_disk() -> None:
    for case, size in (("minimal", "50Gi"), ("pod-additions", "200Gi")):
        _, job = built(case)
        volumes = {volume["name"]: volume for volume in pod_spec(job)["volumes"]}
        assert volumes["cache"]["emptyDir"] == {"sizeLimit": size}
        assert volumes["tmp"]["emptyDir"] == {"sizeLimit": size}
        resources = trainer(job)["resources"]
        assert resources["requests"]["ephemeral-storage"] == resources["limits"]["ephemeral-storage"] == size
        # the trainer refuses a model larger than that before downloading it (exit 2, not an eviction loop)
        assert env(job)[contract.DISK_BYTES_ENV] == str(int(size.removesuffix("Gi")) * 1024**3)


def test_a_queued_run_requests_no_disk_that_kueue_would_have_to_cover() -> None:
    # Kueue admits a Workload only when its ClusterQueue covers every requested resource.
    _, job = built("kueue")
    resources = trainer(job)["resources"]
    assert "ephemeral-storage" not in resources["requests"] and "ephemeral-storage" not in resources["limits"]
    volumes = {volume["name"]: volume for volume in pod_spec(job)["volumes"]}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "50Gi"}  # still bounded
    assert env(job)[contract.DISK_BYTES_ENV] == str(50 * 1024**3)


def test_pod_additions_reach_the_pod_beside_kubetunes_own() -> None:
    _, job = built("pod-additions")
    template = job["spec"]["template"]
    assert template["metadata"]["labels"]["team"] == "support"
    assert template["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune"
    assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    pod = pod_spec(job)
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    container = trainer(job)
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert {"name": "config", "mountPath": "/etc/kubetune", "readOnly": True} in container["volumeMounts"]
    values = env(job)
    assert values["HTTPS_PROXY"] == "http://proxy.internal:3128" and values["HF_HOME"].startswith("/cache")
    by_name = {entry["name"]: entry for entry in container["env"]}
    assert by_name["PROXY_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "proxy", "key": "password"}}
    assert "imagePullSecrets" not in pod_spec(built("minimal")[1])


def test_default_gpu_resource_comes_from_settings_when_the_spec_leaves_it_out() -> None:
    job = build_trainer_job(finetunejob(), Settings(default_gpu_resource="amd.com/gpu"))
    assert trainer(job)["resources"]["limits"] == {"amd.com/gpu": "1", "ephemeral-storage": "50Gi"}


def test_one_gpu_runs_the_trainer_many_go_through_its_launcher() -> None:
    _, single = built("minimal")
    assert trainer(single)["command"] == [
        "python", "-m", "kubetune_trainer", "--config", contract.CONFIG_PATH,
        "--termination-log", contract.TERMINATION_LOG,
    ]  # fmt: skip
    _, multi = built("multi-gpu")
    command = trainer(multi)["command"]
    # Not torchrun itself: it would turn exit codes 2 and 3 into 1, which the podFailurePolicy cannot tell apart.
    assert "torchrun" not in command[0]
    assert command[command.index("--nproc-per-node") + 1] == "4"
    assert command[:3] == ["python", "-m", "kubetune_trainer"]
    assert command[command.index("--config") + 1] == contract.CONFIG_PATH


def test_the_trainers_stop_grace_is_the_pods_minus_a_margin() -> None:
    _, job = built("minimal")
    grace = pod_spec(job)["terminationGracePeriodSeconds"]
    assert grace == contract.TERMINATION_GRACE_SECONDS
    watchdog = int(env(job)[contract.STOP_GRACE_ENV])
    assert watchdog == grace - contract.STOP_GRACE_MARGIN_SECONDS
    assert 0 < watchdog < grace  # the watchdog writes its termination message before the kubelet's SIGKILL


def test_one_node_has_no_service_and_a_plain_job() -> None:
    _, job = built("multi-gpu")
    assert build_nodes_service(finetunejob(spec=CASES["multi-gpu"]), SETTINGS) is None
    assert "completionMode" not in job["spec"] and "subdomain" not in pod_spec(job)
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)


def test_multi_node_is_an_indexed_job_with_one_pod_per_node() -> None:
    _, job = built("multi-node")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert (spec["completions"], spec["parallelism"]) == (2, 2)
    assert spec["suspend"] is True  # queued: Kueue admits the whole Indexed Job (2 x 8 GPUs) at once
    assert spec["podFailurePolicy"] == pod_failure_policy()  # one policy for the whole run
    assert "backoffLimitPerIndex" not in spec
    assert pod_spec(job)["subdomain"] == "support-bot-nodes"
    assert trainer(job)["resources"]["limits"]["nvidia.com/gpu"] == "8"  # per node
    ports = {port["name"]: port["containerPort"] for port in trainer(job)["ports"]}
    assert ports == {contract.METRICS_PORT_NAME: contract.METRICS_PORT, "rendezvous": contract.RENDEZVOUS_PORT}


def test_multi_node_command_is_the_launcher_with_c10d_rendezvous_on_pod_zero() -> None:
    _, job = built("multi-node")
    command = trainer(job)["command"]
    assert command == contract.launch_command(
        8, rendezvous=contract.pod_rendezvous("support-bot", "support-bot-nodes", 2)
    )
    assert command[:3] == ["python", "-m", "kubetune_trainer"]  # the launcher keeps exit codes 2 and 3

    def option(name: str) -> str:
        return command[command.index(name) + 1]

    assert option("--nproc-per-node") == "8"
    assert option("--nnodes") == "2"
    assert option("--node-rank") == "$(JOB_COMPLETION_INDEX)"  # the kubelet expands it from the pod's env
    assert option("--node-address") == "support-bot-$(JOB_COMPLETION_INDEX).support-bot-nodes"
    assert option("--rdzv-endpoint") == f"support-bot-0.support-bot-nodes:{contract.RENDEZVOUS_PORT}"
    assert option("--rdzv-id") == "support-bot"
    assert int(option("--rdzv-timeout")) == contract.RENDEZVOUS_TIMEOUT_SECONDS


def test_torchrun_args_for_one_node_and_for_several() -> None:
    assert contract.torchrun_args(4) == ["--standalone", "--nproc-per-node=4"]
    node0 = contract.torchrun_args(8, nnodes=2, node_rank=0, node_address="a-0.s", endpoint="a-0.s:29400")
    node1 = contract.torchrun_args(8, nnodes=2, node_rank=1, node_address="a-1.s", endpoint="a-0.s:29400")
    assert "--rdzv-backend=c10d" in node0 and "--nnodes=2" in node0 and "--max-restarts=0" in node0
    assert "--rdzv-endpoint=a-0.s:29400" in node1 and "--local-addr=a-1.s" in node1
    conf0 = next(arg for arg in node0 if arg.startswith("--rdzv-conf="))
    conf1 = next(arg for arg in node1 if arg.startswith("--rdzv-conf="))
    assert "is_host=true" in conf0 and "is_host=false" in conf1  # node 0 hosts the store
    assert f"join_timeout={contract.RENDEZVOUS_TIMEOUT_SECONDS}" in conf1
    with pytest.raises(ValueError, match="endpoint"):
        contract.torchrun_args(8, nnodes=2)


def test_multi_node_service_is_headless_selects_only_this_runs_pods_and_is_owned() -> None:
    job = finetunejob(spec=CASES["multi-node"])
    service = build_nodes_service(job, SETTINGS)
    assert service is not None
    assert service["metadata"]["name"] == "support-bot-nodes"
    assert service["metadata"]["ownerReferences"] == [owner_reference(job)]  # deleted with the FineTuneJob
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {
        "batch.kubernetes.io/job-name": "support-bot",
        "kubetune.dev/finetunejob": "support-bot",
    }
    assert service["spec"]["publishNotReadyAddresses"] is True  # peers resolve before they are Ready
    assert [port["port"] for port in service["spec"]["ports"]] == [contract.RENDEZVOUS_PORT]


def test_multi_node_names_fit_dns_for_the_longest_finetunejob_name() -> None:
    name = "n" * 63
    job = finetunejob(name=name, spec=CASES["multi-node"])
    service = build_nodes_service(job, SETTINGS)
    assert service is not None
    assert len(service["metadata"]["name"]) <= 63
    assert job_name(job) == build_trainer_job(job, SETTINGS)["metadata"]["name"] != name
    assert len(f"{job_name(job)}-1") <= 63  # the Job controller's hostname of the last pod
    wide = finetunejob(name=name, spec={"resources": {"gpus": 8, "nodes": 64}})
    assert len(f"{job_name(wide)}-63") <= 63
    assert job_name(finetunejob(name=name)) == name  # one node: the name as before


def test_scheduling_fields_reach_the_pod() -> None:
    _, job = built("scheduling")
    pod = pod_spec(job)
    spec = CASES["scheduling"]["scheduling"]
    assert pod["nodeSelector"] == spec["nodeSelector"]
    assert pod["tolerations"] == spec["tolerations"]
    assert pod["affinity"] == spec["affinity"]
    assert pod["priorityClassName"] == "training-high"
    _, plain = built("minimal")
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName"} & set(pod_spec(plain))


def test_scheduling_patch_changes_only_mutable_template_fields() -> None:
    patch = scheduling_patch(finetunejob(spec=CASES["scheduling"]), SETTINGS)
    template = patch["spec"]["template"]["spec"]
    assert set(template) == {"nodeSelector", "tolerations", "affinity"}
    cleared = scheduling_patch(finetunejob(), SETTINGS)["spec"]["template"]["spec"]
    assert cleared == {"nodeSelector": None, "tolerations": None, "affinity": None}


def test_kueue_queue_label_and_created_suspended() -> None:
    _, job = built("kueue")
    assert job["metadata"]["labels"][LABEL_KUEUE_QUEUE] == "gpu-queue"
    assert job["spec"]["suspend"] is True
    _, plain = built("minimal")
    assert LABEL_KUEUE_QUEUE not in plain["metadata"]["labels"]
    assert plain["spec"]["suspend"] is False


def test_run_policy_reaches_the_job() -> None:
    _, job = built("suspended")
    assert job["spec"]["suspend"] is True
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    _, plain = built("minimal")
    assert plain["spec"]["backoffLimit"] == 3
    assert "activeDeadlineSeconds" not in plain["spec"]
    assert "ttlSecondsAfterFinished" not in plain["spec"]  # the operator deletes the FineTuneJob instead


def test_pod_failure_policy_follows_the_exit_code_contract() -> None:
    _, job = built("minimal")
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [contract.EXIT_INVALID_INPUT]},
    }
    assert rules[1] == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [contract.EXIT_PREEMPTED]},
    }
    assert rules[2] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert pod_spec(job)["restartPolicy"] == "Never"


def test_restricted_security_profile() -> None:
    _, job = built("secrets")
    pod = pod_spec(job)
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "s3-reader"
    security = trainer(job)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True


def test_image_config_volumes_port_and_termination_message() -> None:
    _, plain = built("minimal")
    assert trainer(plain)["image"] == SETTINGS.trainer_image
    _, custom = built("secrets")
    container = trainer(custom)
    assert container["image"] == "registry.example/custom-trainer:2"
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert mounts["config"] == {"name": "config", "mountPath": "/etc/kubetune", "readOnly": True}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert mounts["cache"]["mountPath"] == "/cache"
    assert mounts["tmp"]["mountPath"] == "/tmp"
    volumes = {volume["name"]: volume for volume in pod_spec(custom)["volumes"]}
    assert volumes["config"]["configMap"] == {"name": "support-bot-trainer"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    _, big = built("multi-gpu")
    assert {v["name"]: v for v in pod_spec(big)["volumes"]}["dshm"]["emptyDir"]["sizeLimit"] == "32Gi"


def test_suspend_patch_follows_the_spec_and_leaves_resuming_to_kueue() -> None:
    running, suspended = {"spec": {"suspend": False}}, {"spec": {"suspend": True}}
    assert suspend_patch(finetunejob(spec={"runPolicy": {"suspend": True}}), running) == {"spec": {"suspend": True}}
    assert suspend_patch(finetunejob(spec={"runPolicy": {"suspend": True}}), suspended) is None
    assert suspend_patch(finetunejob(), suspended) == {"spec": {"suspend": False}}
    assert suspend_patch(finetunejob(), running) is None
    assert suspend_patch(finetunejob(spec=CASES["kueue"]), suspended) is None  # Kueue admits and unsuspends


def test_run_policy_patch_brings_the_jobs_retry_limit_and_deadline_to_the_spec() -> None:
    built_job = build_trainer_job(finetunejob(), Settings())
    assert run_policy_patch(finetunejob(), built_job) is None  # as built: nothing to change
    edited = finetunejob(spec={"runPolicy": {"backoffLimit": 7, "activeDeadlineSeconds": 3600}})
    assert run_policy_patch(edited, built_job) == {"spec": {"backoffLimit": 7, "activeDeadlineSeconds": 3600}}
    with_deadline = build_trainer_job(edited, Settings())
    assert run_policy_patch(finetunejob(spec={"runPolicy": {"backoffLimit": 7}}), with_deadline) == {
        "spec": {"activeDeadlineSeconds": None}  # the deadline removed from the spec goes from the Job
    }


def test_a_suspended_queued_run_deactivates_its_kueue_workload_and_only_reactivates_its_own() -> None:
    queued = {"scheduling": {"queueName": "gpu"}}
    suspended = finetunejob(spec={**queued, "runPolicy": {"suspend": True}})
    running = finetunejob(spec=queued)
    active: dict = {"metadata": {"name": "w"}, "spec": {"active": True}}
    deactivate = workload_activation_patch(suspended, active)
    assert deactivate == {"metadata": {"annotations": {ANNOTATION_DEACTIVATED: "true"}}, "spec": {"active": False}}
    ours = {"metadata": {"name": "w", "annotations": {ANNOTATION_DEACTIVATED: "true"}}, "spec": {"active": False}}
    assert workload_activation_patch(running, ours) == {
        "metadata": {"annotations": {ANNOTATION_DEACTIVATED: None}}, "spec": {"active": True}
    }  # fmt: skip
    # Deactivated by Kueue or an administrator: not the operator's to undo.
    assert workload_activation_patch(running, {"metadata": {"name": "w"}, "spec": {"active": False}}) is None
    assert workload_activation_patch(suspended, ours) is None  # already so
    assert workload_activation_patch(running, active) is None
    assert workload_activation_patch(finetunejob(spec={"runPolicy": {"suspend": True}}), active) is None  # no queue


def test_tracker_credentials_come_from_their_secrets_only() -> None:
    _, job = built("secrets")
    variables = env(job)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        # Basic auth or a token: the Secret holds one or the other, so each key is optional.
        assert variables[key] == {"secretKeyRef": {"name": "mlflow-auth", "key": key, "optional": True}}
    assert variables["WANDB_API_KEY"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
    assert not {"MLFLOW_TRACKING_URI", "WANDB_PROJECT"} & set(variables)  # the rest is config.json's
