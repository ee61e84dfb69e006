"""The chart's RBAC (tests/chart/rbac_expected.py) as (verb, apiGroup, resource, subresource), the shape of
the emulated API server's request log."""

from __future__ import annotations

from tests.chart.rbac_expected import ADMISSION_ONLY, ALL_NAMESPACES, KUEUE_ONLY, SWEEP_ONLY, Permission

Grant = tuple[str, str, str, str | None]


def as_grant(permission: Permission) -> Grant:
    group, resource, verb = permission
    name, _, subresource = resource.partition("/")
    return (verb, group, name, subresource or None)


GRANTED: frozenset[Grant] = frozenset(as_grant(permission) for permission in ALL_NAMESPACES)
NEEDED_BY_ADMISSION: frozenset[Grant] = frozenset(as_grant(permission) for permission in ADMISSION_ONLY)
USED_ONLY_WITH_KUEUE: frozenset[Grant] = frozenset(as_grant(permission) for permission in KUEUE_ONLY)
USED_ONLY_WITH_SWEEPS: frozenset[Grant] = frozenset(as_grant(permission) for permission in SWEEP_ONLY)
