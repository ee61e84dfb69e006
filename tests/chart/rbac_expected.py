"""The Kubernetes API permissions the operator needs, as (apiGroup, resource, verb) triples.

The chart's RBAC (templates/_helpers.tpl, `kubetune.rbac.*`) must grant exactly these; the chart
tests compare the rendered roles with them, and the operator tests compare them with the requests
the operator actually made against the emulated API server. Change all three together.
"""

from __future__ import annotations

Permission = tuple[str, str, str]


def _grant(group: str, resource: str, *verbs: str) -> set[Permission]:
    return {(group, resource, verb) for verb in verbs}


# Granted in every namespace the operator watches (a Role each, or the ClusterRole).
NAMESPACED: frozenset[Permission] = frozenset(
    # delete: ttlSecondsAfterFinished removes the FineTuneJob itself.
    _grant("kubetune.dev", "finetunejobs", "get", "list", "watch", "patch", "delete")
    | _grant("kubetune.dev", "finetunejobs/status", "get", "patch")
    | _grant("batch", "jobs", "get", "list", "watch", "create", "patch", "delete")
    | _grant("", "configmaps", "get", "list", "watch", "create", "patch", "delete")
    | _grant("", "pods", "get", "list", "watch")
    | _grant("", "events", "create", "patch")
    | _grant("events.k8s.io", "events", "create", "patch")
)

# Only when the operator watches every namespace: Kopf lists and watches namespaces.
ALL_NAMESPACES_ONLY: frozenset[Permission] = frozenset(_grant("", "namespaces", "list", "watch"))

# Always cluster-wide, even in namespaced mode: Kopf scans CRDs, which are cluster-scoped.
CLUSTER_SCOPED: frozenset[Permission] = frozenset(
    _grant("apiextensions.k8s.io", "customresourcedefinitions", "list", "watch")
)

# Everything the operator may do when it watches all namespaces.
ALL_NAMESPACES: frozenset[Permission] = NAMESPACED | ALL_NAMESPACES_ONLY | CLUSTER_SCOPED
