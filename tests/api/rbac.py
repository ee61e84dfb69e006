"""What the Helm chart's ClusterRole grants the operator, as (verb, apiGroup, resource, subresource).

The one place both sides read: the operator's API tests assert every call the operator made is in
GRANTED, and the chart's test can assert its ClusterRole grants exactly this.
"""

from __future__ import annotations

Grant = tuple[str, str, str, str | None]


def _grants(verbs: str, group: str, resource: str, subresource: str | None = None) -> set[Grant]:
    return {(verb, group, resource, subresource) for verb in verbs.split()}


GRANTED: frozenset[Grant] = frozenset(
    _grants("get list watch patch delete", "kubetune.dev", "finetunejobs")
    | _grants("get patch", "kubetune.dev", "finetunejobs", "status")
    | _grants("get list watch create patch delete", "batch", "jobs")
    | _grants("get list watch create patch delete", "", "configmaps")
    | _grants("get list watch", "", "pods")
    | _grants("create patch", "", "events")
    | _grants("create patch", "events.k8s.io", "events")
    | _grants("list watch", "", "namespaces")
    | _grants("list watch", "apiextensions.k8s.io", "customresourcedefinitions")
)

# Not observable through the API tests, but needed on a cluster with the OwnerReferencesPermissionEnforcement
# admission plugin (on by default in many distributions): setting blockOwnerDeletion on a child requires
# `update` of the owner's finalizers subresource.
NEEDED_BY_ADMISSION: frozenset[Grant] = frozenset({("update", "kubetune.dev", "finetunejobs", "finalizers")})
