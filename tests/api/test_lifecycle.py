"""Clean-up after a run, and many FineTuneJobs at once."""

from __future__ import annotations

import collections
import statistics
import time

import pytest

from kubetune_operator.reconcile import COALESCE_SECONDS
from tests.api.fixtures import OPERATOR_AGENTS, REPORT_LINES, Cluster, Operator, wait_for
from tests.kubeapi import cluster as kubelet


def test_finished_finetunejob_is_deleted_after_its_ttl(operator: Operator, cluster: Cluster) -> None:
    # completionTime has whole seconds: a TTL of 3 s leaves the test at least 2 s to see Succeeded.
    cluster.apply(spec={"runPolicy": {"ttlSecondsAfterFinished": 3}})
    job = cluster.wait_job()
    kubelet.terminate_pod(kubelet.create_pod_for_job(job), 0, "")
    kubelet.set_job_condition(job, "Complete", "CompletionsReached", "")
    cluster.wait_phase("Succeeded")
    assert cluster.ftj() is not None
    wait_for(lambda: cluster.ftj() is None, timeout=10, what="FineTuneJob deleted after its TTL")
    cluster.server.collect_garbage()
    assert cluster.job() is None and cluster.configmap() is None


@pytest.mark.slow
def test_fifty_finetunejobs_at_once(operator: Operator, cluster: Cluster) -> None:
    names = [f"run-{i:02d}" for i in range(50)]
    created: dict[str, float] = {}
    for name in names:
        cluster.apply(name)
        created[name] = time.monotonic()
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while len(seen) < len(names) and time.monotonic() < deadline:
        now = time.monotonic()
        for job in cluster.jobs():
            seen.setdefault(job["metadata"]["name"], now)
        time.sleep(0.02)
    assert sorted(seen) == names, f"missing Jobs: {sorted(set(names) - set(seen))}"
    latencies = sorted(seen[name] - created[name] for name in names)
    p50, worst = statistics.median(latencies), latencies[-1]
    REPORT_LINES.append(f"50 FineTuneJobs: create -> Job created p50 {p50:.2f} s, max {worst:.2f} s")
    for name in names:
        cluster.wait_phase("Pending", name, timeout=30)
    assert len(cluster.jobs()) == 50  # one each, no duplicates
    assert worst < 30


def test_runs_until_running_cost_their_writes_and_no_reads(operator: Operator, cluster: Cluster) -> None:
    """Reads come from the watch-fed cache: until Running, a run costs a ConfigMap, a Job and one status patch
    per phase (Pending, Running), plus an Event per phase, and no get or list beyond Kopf's own list+watch.
    Each pod runs within COALESCE_SECONDS of its creation, so Pending's reason change (ContainerCreating) is
    never written: the run goes from its first Pending write to Running."""
    operator.stop()
    operator.start(KUBETUNE_PROGRESS_INTERVAL_SECONDS="60")  # one poll on Running (below the threshold), no more
    names = [f"run-{i}" for i in range(5)]
    first = len(cluster.server.emulator.api_requests)
    for name in names:
        cluster.apply(name)
    jobs = [cluster.wait_job(name) for name in names]
    for name in names:
        cluster.wait_phase("Pending", name)
    for job in jobs:
        kubelet.set_pod_running(kubelet.create_pod_for_job(job))
    for name in names:
        cluster.wait_phase("Running", name)
    time.sleep(COALESCE_SECONDS + 0.5)  # what the last events still trigger (a held-back write is due by then)
    calls = collections.Counter(
        (r.verb, r.resource, r.subresource)
        for r in cluster.server.emulator.api_requests[first:]
        if r.user_agent.startswith(OPERATOR_AGENTS)
        and r.verb != "watch"
        and not (r.verb == "list" and r.user_agent.startswith("kopf/"))  # Kopf's list+watch streams
    )
    events = calls.pop(("create", "events", None), 0)
    assert dict(calls) == {
        ("create", "configmaps", None): 5,
        ("create", "jobs", None): 5,
        ("patch", "finetunejobs", "status"): 10,
    }
    assert events == 10  # Pending, Running
