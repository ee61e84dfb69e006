"""The Kubernetes API permissions the operator needs, as (apiGroup, resource, verb) triples: the one list.

Least privilege: exactly the calls the operator makes (recorded from the emulated API server over the
operator tests, tests/api), plus what admission needs that no API call shows. The chart's RBAC
(templates/_helpers.tpl, `kubetune.rbac.*`) must grant exactly these; the chart tests compare the rendered
roles with them, and the operator tests check every call is granted and every grant is used
(tests/api/rbac.py, tests/api/test_rbac_is_used.py). Change all three together.
"""

from __future__ import annotations

Permission = tuple[str, str, str]


def _grant(group: str, resource: str, *verbs: str) -> set[Permission]:
    return {(group, resource, verb) for verb in verbs}


# FineTuneSweeps: watched, their status written; their trials are FineTuneJobs created (one that exists is awaited
# from the watch, never read) and patched when pruned (granted above). finalizers: blockOwnerDeletion on the trials.
SWEEPS: frozenset[Permission] = frozenset(
    _grant("kubetune.dev", "finetunejobs", "create")
    | _grant("kubetune.dev", "finetunesweeps", "list", "watch")
    | _grant("kubetune.dev", "finetunesweeps/status", "patch")
    | _grant("kubetune.dev", "finetunesweeps/finalizers", "update")
)

# Granted in every namespace the operator watches (a Role each, or the ClusterRole).
NAMESPACED: frozenset[Permission] = frozenset(
    # Reconciled from the watch (no get). patch: Kopf removes the finalizer an earlier version added; delete:
    # ttlSecondsAfterFinished removes the FineTuneJob itself (its children go by ownerReferences).
    _grant("kubetune.dev", "finetunejobs", "list", "watch", "patch", "delete")
    | _grant("kubetune.dev", "finetunejobs/status", "patch")
    | SWEEPS
    # update on finalizers: the OwnerReferencesPermissionEnforcement admission plugin (on in many
    # distributions) requires it to set blockOwnerDeletion on the children.
    | _grant("kubetune.dev", "finetunejobs/finalizers", "update")
    # get: a child that already exists (409 on create) is read and adopted.
    | _grant("batch", "jobs", "get", "list", "watch", "create", "patch")
    | _grant("", "configmaps", "get", "create")
    # The headless Service of a multi-node run (its pods' DNS names); deleted with the FineTuneJob by ownerReferences.
    | _grant("", "services", "get", "create")
    | _grant("", "pods", "list", "watch")
    | _grant("", "events", "create")
    # Kueue's Workloads: why a queued run waits, and `spec.active` to keep a user's suspend (Kueue would
    # unsuspend an admitted Job). Unused where Kueue is not installed.
    | _grant("kueue.x-k8s.io", "workloads", "list", "watch", "patch")
)

# Only when the operator watches every namespace: Kopf watches CRDs (cluster-scoped) to follow kinds as they
# appear. Watching listed namespaces it does not (scanning is off, see kubetune_operator.main.startup), and it
# never lists namespaces, so a namespaced install grants nothing cluster-wide.
ALL_NAMESPACES_ONLY: frozenset[Permission] = frozenset(
    _grant("apiextensions.k8s.io", "customresourcedefinitions", "list", "watch")
)

# Everything the operator may do when it watches all namespaces.
ALL_NAMESPACES: frozenset[Permission] = NAMESPACED | ALL_NAMESPACES_ONLY

# Only used on a cluster with Kueue: the emulated API (tests/api) has none, the real control plane
# (tests/cluster) does and checks these grants there.
KUEUE_ONLY: frozenset[Permission] = frozenset(_grant("kueue.x-k8s.io", "workloads", "list", "watch", "patch"))

# Granted for admission, never seen as an API call.
ADMISSION_ONLY: frozenset[Permission] = frozenset(
    _grant("kubetune.dev", "finetunejobs/finalizers", "update")
    | _grant("kubetune.dev", "finetunesweeps/finalizers", "update")
)
# Used only where FineTuneSweeps are served: the emulated API (tests/api) serves FineTuneJobs alone; the real
# control plane (tests/cluster/test_sweep.py) serves both and checks these grants there.
SWEEP_ONLY: frozenset[Permission] = SWEEPS - ADMISSION_ONLY
