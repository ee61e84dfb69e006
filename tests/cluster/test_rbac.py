"""The chart's RBAC, as the real apiserver enforces it: the operator runs with its ServiceAccount's token, and the
apiserver's audit log records every call it makes. Least privilege from both sides: no call is refused (403) or
goes beyond the grants, and every grant is used over a FineTuneJob's life (Kueue included) and a sweep's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.rbac import GRANTED, NEEDED_BY_ADMISSION
from tests.cluster.conftest import (
    GROUP,
    VERSION,
    Installation,
    Kube,
    OperatorProcess,
    assert_granted,
    audited_calls,
    helm,
    install,
    wait_for,
)
from tests.objects import LEGACY_FINALIZER, SPEC, succeeded_message

OUTAGE_NAMESPACES = "t-test-runs-whose-children-are-being-creat"  # test_outages' namespaces (kept short)


def test_every_call_is_granted_and_every_grant_is_used(
    kube: Kube, ns: str, operator: OperatorProcess, installed: Installation, eight_gpu_queue: str
) -> None:
    queued = {"resources": {"gpus": 8}, "scheduling": {"queueName": eight_gpu_queue}}
    # With the finalizer an earlier version added: Kopf removes it (patch finetunejobs), so the TTL can delete it.
    created = kube.apply(
        ns, "queued", spec={**queued, "runPolicy": {"ttlSecondsAfterFinished": 1}}, finalizers=[LEGACY_FINALIZER]
    )
    first = kube.wait_running_pod(ns, "queued")["metadata"]["name"]
    kube.patch_spec(ns, {"runPolicy": {"suspend": True}}, "queued")  # the Job and Kueue's Workload are patched
    kube.wait_phase(ns, "Suspended", "queued")
    kube.patch_spec(ns, {"runPolicy": {"suspend": False}}, "queued")
    kube.run_pod_to(ns, 0, succeeded_message(), "queued", exclude={first})
    # Succeeded holds for about a second before the TTL deletes the run: watched, not polled.
    kube.watch_phase(ns, "Succeeded", since=created, timeout=90)
    wait_for(lambda: kube.ftj(ns, "queued") is None, 30, "the TTL to delete the FineTuneJob")
    # Not queued: Kueue 0.17 may not readmit a Job recreated under the same name at once (see the closing note).
    kube.apply(ns)
    kube.wait_running_pod(ns)
    old = kube.job(ns)["metadata"]["uid"]
    kube.batch.delete_namespaced_job("run", ns, propagation_policy="Background")  # someone deletes it mid-run
    # recreated beside the ConfigMap that stayed, which is read and adopted (get after a 409)
    wait_for(lambda: (j := kube.job(ns)) and j["metadata"]["uid"] != old, 30, "the Job recreated")
    # A multi-node run has a headless Service too: created, and read and adopted when its Job is recreated.
    kube.apply(ns, "gang", spec={"resources": {"gpus": 8, "nodes": 2}})
    old = kube.wait_job(ns, "gang")["metadata"]["uid"]
    kube.batch.delete_namespaced_job("gang", ns, propagation_policy="Background")
    wait_for(lambda: (j := kube.job(ns, "gang")) and j["metadata"]["uid"] != old, 30, "the gang's Job recreated")
    kube.delete_ftj(ns, "gang")
    # A sweep of one trial: the trial is created (create finetunejobs), the sweep's status written.
    rates = {"name": "training.learningRate", "categorical": {"choices": [1e-4]}}
    sweep = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneSweep", "metadata": {"name": "sweep"},
             "spec": {"template": {"spec": SPEC}, "trials": 1, "parameters": [rates]}}  # fmt: skip
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "finetunesweeps", sweep)
    kube.run_pod_to(ns, 0, succeeded_message(), "sweep-0")
    wait_for(
        lambda: (kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, "finetunesweeps", "sweep").get("status")
                 or {}).get("phase") == "Succeeded", 60, "the sweep to succeed",
    )  # fmt: skip
    # test_outages kills and restarts kube-apiserver; until its RBAC authorizer has synced it forbids every call, so
    # the operator's calls in that test's namespaces say nothing about the chart's grants.
    calls = [
        c
        for c in audited_calls(kube.plane, installed.username)
        if not (c.namespace or "").startswith(OUTAGE_NAMESPACES)
    ]
    assert_granted(calls)
    unused = GRANTED - NEEDED_BY_ADMISSION - {c.grant for c in calls}
    assert not unused, f"granted but never used: {sorted(unused, key=str)}"


@pytest.fixture
def namespaced_operator(kube: Kube, ns: str, operator: OperatorProcess) -> Iterator[tuple[Installation, str]]:
    """A second release watching only `ns`; the cluster-wide operator is stopped meanwhile (two operators
    would both reconcile `ns`)."""
    installation = install(kube.plane, "team", f"{ns}-op", f"watchNamespaces={{{ns}}}", skip_crds=True)
    operator.stop()
    scoped = OperatorProcess(installation, kube.plane.directory / "logs").start()
    try:
        yield installation, ns
    finally:
        scoped.stop()
        operator.start()
        helm(kube.plane, "uninstall", "team", "--namespace", installation.namespace)
        kube.core.delete_namespace(installation.namespace)
        assert "Traceback" not in scoped.log_text(), scoped.log_tail(80)


def test_namespaced_mode_runs_in_its_namespaces_and_nowhere_else(
    kube: Kube, namespaced_operator: tuple[Installation, str]
) -> None:
    installation, watched = namespaced_operator
    assert installation.env["KUBETUNE_NAMESPACES"] == watched
    other = f"{watched}-op"  # the release's own namespace: not watched
    kube.apply(watched)
    kube.apply(other)
    kube.run_pod_to(watched, 0, succeeded_message())
    kube.wait_phase(watched, "Succeeded")
    assert kube.job(other) is None and kube.status(other) == {}, "an unwatched namespace was reconciled"
    can = kube.kubectl("auth", "can-i", "create", "jobs.batch", f"--as={installation.username}", "-n", "default",
                       check=False)  # fmt: skip
    assert can.stdout.strip() == "no", "the namespaced release must not reach other namespaces"
    calls = audited_calls(kube.plane, installation.username)
    assert_granted(calls)
    assert {c.namespace for c in calls if c.namespace} == {watched}
