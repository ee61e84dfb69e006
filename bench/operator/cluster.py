"""The operator benchmark on a real control plane: kube-apiserver + etcd, the Job controller, the scheduler and
KWOK nodes (tests/cluster's harness), the operator authenticated as the Helm chart's ServiceAccount.

    python bench/operator/run.py --backend cluster [--count 1000] [--idle-seconds 60]

What differs from the emulated run (bench/operator/run.py):

- The real Job controller makes the pods, the real scheduler places them on KWOK nodes added for the bench
  (enough GPUs for every run), KWOK runs them: nothing is played by the bench but the user's burst.
- create -> Job is timed at the bench: each FineTuneJob from when its create was answered, each Job from when
  the bench's own watch of Jobs saw it ADDED (so a watch delivery delay is included, unlike the emulator's
  timestamps taken at the store).
- Requests are counted by the apiserver: its audit log records every request of a ServiceAccount (the
  operator's), with verb, resource and time; counted from the burst until every run is Running.
- The control plane's own CPU (apiserver, etcd, controllers, scheduler, KWOK, Kueue) is measured beside the
  operator's: on 2 cores they compete.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import pathlib
import shutil
import threading
import time
from typing import Any

import kubernetes
import psutil

from bench.operator import run as bench
from kubetune_cli.local import free_port
from tests.cluster.conftest import install
from tests.cluster.controlplane import ControlPlane, kwok_node
from tests.objects import finetunejob_body

NAMESPACE = "bench"
GROUP, VERSION, PLURAL = "kubetune.dev", "v1alpha1", "finetunejobs"
BENCH_NODES = 8  # KWOK nodes added for the burst, each with room for BENCH_NODE_PODS trainer pods
BENCH_NODE_PODS = 200
RELEASE, RELEASE_NAMESPACE = "kubetune", "kubetune-system"


def bench_node(index: int) -> dict[str, Any]:
    node = kwok_node(f"bench-node-{index}", gpus=BENCH_NODE_PODS)
    capacity = {
        **node["status"]["capacity"],
        "cpu": "4000",
        "memory": "64Ti",
        "ephemeral-storage": "64Ti",
        "pods": str(BENCH_NODE_PODS),
    }  # a trainer pod asks for 50Gi of disk (spec.resources.disk)
    node["status"] = {"capacity": capacity, "allocatable": capacity}
    return node


class JobWatch:
    """When each Job in the bench namespace was first seen (time.monotonic), from a watch of its own."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.batch = kubernetes.client.BatchV1Api(api)
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        version = self.batch.list_namespaced_job(NAMESPACE).metadata.resource_version
        while not self._stop.is_set():
            watch = kubernetes.watch.Watch()
            try:
                for event in watch.stream(self.batch.list_namespaced_job, NAMESPACE, resource_version=version,
                                          timeout_seconds=30, allow_watch_bookmarks=True):  # fmt: skip
                    obj = event["object"]
                    if event["type"] == "BOOKMARK":  # served as a plain dict
                        version = event["raw_object"]["metadata"]["resourceVersion"]
                        continue
                    version = obj.metadata.resource_version
                    if event["type"] == "ADDED":
                        self.seen.setdefault(obj.metadata.name, time.monotonic())
                    if self._stop.is_set():
                        break
            except kubernetes.client.ApiException as error:
                if error.status != 410:
                    raise
                version = self.batch.list_namespaced_job(NAMESPACE).metadata.resource_version
            except Exception:
                if self._stop.is_set():  # the control plane went first
                    return
                raise

    def stop(self) -> None:
        self._stop.set()


def create_burst(api: kubernetes.client.ApiClient, names: list[str]) -> dict[str, float]:
    """Create every FineTuneJob, CLIENT_CONCURRENCY at a time; when each create was answered (monotonic)."""
    custom = kubernetes.client.CustomObjectsApi(api)
    answered: dict[str, float] = {}
    lock = threading.Lock()
    pending = list(reversed(names))

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                name = pending.pop()
            custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, finetunejob_body(name, NAMESPACE))
            answered[name] = time.monotonic()

    threads = [threading.Thread(target=worker) for _ in range(bench.CLIENT_CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answered


def phases(api: kubernetes.client.ApiClient) -> collections.Counter[str]:
    custom = kubernetes.client.CustomObjectsApi(api)
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)
    return collections.Counter((item.get("status") or {}).get("phase") or "" for item in listed["items"])


def audited(
    plane: ControlPlane, username: str, since: datetime.datetime, until: datetime.datetime | None
) -> list[dict[str, Any]]:
    """The audit events of `username`'s requests completed in [since, until)."""
    events: dict[str, dict[str, Any]] = {}
    with plane.audit_log.open() as log:
        for line in log:
            event = json.loads(line)
            if event.get("user", {}).get("username") != username or not event.get("objectRef"):
                continue
            stamp = datetime.datetime.fromisoformat(event["stageTimestamp"].replace("Z", "+00:00"))
            if stamp >= since and (until is None or stamp < until):
                events[event["auditID"]] = event
    return list(events.values())


def count_audited(events: list[dict[str, Any]], count: int) -> dict[str, Any]:
    """The operator's requests as the apiserver's audit log recorded them (see bench.tally)."""
    calls = [(e["verb"], e["objectRef"]["resource"], e["objectRef"].get("subresource"), e.get("userAgent", ""))
             for e in events]  # fmt: skip
    return bench.tally(calls, count)


def plane_cpu_seconds(plane: ControlPlane) -> dict[str, float]:
    cpu: dict[str, float] = {}
    for component in plane.components:
        if component.process is None:
            continue
        try:
            times = psutil.Process(component.process.pid).cpu_times()
        except psutil.Error:
            continue
        cpu[component.name] = times.user + times.system
    return cpu


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before.get(name, 0.0), 2) for name in after}


def run_cluster(args: Any) -> dict[str, Any]:
    workdir: pathlib.Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "operator-cluster.log"
    log_path.write_bytes(b"")
    load_before = os.getloadavg()
    names = [f"bench-{i:05d}" for i in range(args.count)]
    shutil.rmtree(workdir / "cluster", ignore_errors=True)  # a fresh etcd each run (a previous run's is stopped)
    plane = ControlPlane(workdir / "cluster")
    started_plane = time.monotonic()
    plane.start()
    try:
        plane_start_seconds = time.monotonic() - started_plane
        installation = install(plane, RELEASE, RELEASE_NAMESPACE)
        plane.kubectl_apply([bench_node(i) for i in range(BENCH_NODES)])
        plane.kubectl("create", "namespace", NAMESPACE)
        api = kubernetes.config.new_client_from_config(config_file=str(plane.admin_kubeconfig))
        api.configuration.connection_pool_maxsize = bench.CLIENT_CONCURRENCY
        overrides = dict(item.split("=", 1) for item in args.operator_env)

        def operator_env(**extra: str) -> dict[str, str]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
            env.update(installation.env)  # the chart's settings
            env.update(KUBECONFIG=str(installation.kubeconfig), PYTHONPATH=os.pathsep.join(bench.SOURCE_PATHS),
                       KUBETUNE_METRICS_PORT=str(free_port()), KUBETUNE_HEALTH_PORT=str(free_port()),
                       KUBETUNE_LISTEN_ADDRESS="127.0.0.1")  # fmt: skip
            env.update(overrides)
            env.update(extra)
            return env

        def watching(since: datetime.datetime) -> Any:
            return lambda: any(e["verb"] == "watch" and e["objectRef"]["resource"] == PLURAL
                               for e in audited(plane, installation.username, since, None))  # fmt: skip

        operator = bench.OperatorProcess(operator_env(), log_path, args.profile)
        operator.argv = [*operator.argv[:-1]]  # `kubetune operator`: the chart's KUBETUNE_NAMESPACES decides
        operator.start_until(watching(datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=5)))
        cpu_at_start, rss_at_start = operator.cpu_seconds(), operator.rss()
        jobs = JobWatch(api)
        time.sleep(1.0)  # the watch is open

        plane_cpu = plane_cpu_seconds(plane)
        burst_wall = datetime.datetime.now(datetime.UTC)
        started = time.monotonic()
        answered = create_burst(api, names)
        burst_seconds = time.monotonic() - started
        reconciled = bench.wait_until(lambda: all(n in jobs.seen for n in names), args.timeout, "every Job")
        all_jobs_seconds = max(jobs.seen[n] for n in names) - started
        latencies = [jobs.seen[n] - answered[n] for n in names]
        cpu_reconcile = operator.cpu_seconds() - cpu_at_start
        plane_cpu_reconcile = _delta(plane_cpu_seconds(plane), plane_cpu)

        def all_running() -> bool:
            return phases(api).get("Running", 0) == args.count

        running_wait = bench.wait_until(all_running, args.timeout * 3, "every FineTuneJob Running")
        running_wall = datetime.datetime.now(datetime.UTC)
        until_running = count_audited(audited(plane, installation.username, burst_wall, running_wall), args.count)
        cpu_until_running = operator.cpu_seconds() - cpu_at_start
        plane_cpu_until_running = _delta(plane_cpu_seconds(plane), plane_cpu)
        peak_rss_until_running = operator.peak_rss

        # Idle with progress polls at the chart's interval (pod IPs are KWOK's: every poll times out).
        time.sleep(5)
        idle_start_wall, cpu_idle, plane_idle = (
            datetime.datetime.now(datetime.UTC),
            operator.cpu_seconds(),
            plane_cpu_seconds(plane),
        )
        time.sleep(args.idle_seconds)
        idle_polling = {
            "seconds": args.idle_seconds,
            "cpu_seconds": round(operator.cpu_seconds() - cpu_idle, 3),
            "cpu_percent_of_one_core": round(100 * (operator.cpu_seconds() - cpu_idle) / args.idle_seconds, 2),
            "control_plane_cpu_seconds": _delta(plane_cpu_seconds(plane), plane_idle),
            "requests": count_audited(audited(plane, installation.username, idle_start_wall, None), args.count)[
                "by_call"
            ],
        }
        peak_rss = operator.peak_rss
        stop_seconds = operator.stop()

        # Polling off: a restarted operator resumes every run from its lists, settles, then sits.
        restart_wall = datetime.datetime.now(datetime.UTC)
        operator = bench.OperatorProcess(operator_env(KUBETUNE_PROGRESS_INTERVAL_SECONDS=bench.POLLING_OFF_SECONDS),
                                         log_path, None)  # fmt: skip
        operator.argv = [*operator.argv[:-1]]
        restarted = time.monotonic()
        operator.start_until(watching(restart_wall))
        bench.wait_cpu_quiet(operator, args.timeout)  # every run resumed from the lists
        settle_seconds = round(time.monotonic() - restarted, 2)
        resumed = count_audited(audited(plane, installation.username, restart_wall, None), args.count)
        idle_start_wall, cpu_idle = datetime.datetime.now(datetime.UTC), operator.cpu_seconds()
        time.sleep(args.idle_seconds)
        idle_off = {
            "seconds": args.idle_seconds,
            "cpu_seconds": round(operator.cpu_seconds() - cpu_idle, 3),
            "cpu_percent_of_one_core": round(100 * (operator.cpu_seconds() - cpu_idle) / args.idle_seconds, 2),
            "requests": count_audited(audited(plane, installation.username, idle_start_wall, None), args.count)[
                "by_call"
            ],
            "restart_requests_by_call": resumed["by_call"],
            "restart_peak_rss_mb": round(operator.peak_rss / 2**20, 1),
            "restart_settle_seconds": settle_seconds,
        }
        operator.stop()
        jobs.stop()
    finally:
        plane.stop()
    log = log_path.read_text(errors="replace")
    result: dict[str, Any] = {
        "benchmark": "operator",
        "backend": "cluster (kube-apiserver + etcd + Job controller + scheduler + KWOK + Kueue, tests/cluster)",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "bench/operator/run.py", *args.argv]),
        "machine": {**bench.machine(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "control_plane": {
            "start_seconds": round(plane_start_seconds, 1),
            "versions": plane.binaries.versions,
            "bench_nodes": BENCH_NODES,
        },
        "operator": {
            "argv": ["kubetune", "operator"],
            "authenticated_as": installation.username,
            "env": {k: v for k, v in operator_env().items() if k.startswith("KUBETUNE_")},
            "rss_at_start_mb": round(rss_at_start / 2**20, 1),
            **bench.log_counts(log),
            "stop_seconds": round(stop_seconds, 2),
        },
        "count": args.count,
        "reconcile": {
            "create_burst_seconds": round(burst_seconds, 3),
            "all_jobs_seconds": round(all_jobs_seconds, 3),
            "waited_after_burst_seconds": round(reconciled, 3),
            "reconciled": sum(n in jobs.seen for n in names),
            "create_answered_to_job_seen_seconds": bench.percentiles(latencies),
            "create_to_job_seconds": bench.percentiles(latencies),
            "operator_cpu_seconds": round(cpu_reconcile, 3),
            "control_plane_cpu_seconds": plane_cpu_reconcile,
        },
        "until_running": {
            "after_all_jobs_seconds": round(running_wait, 3),
            "operator_cpu_seconds": round(cpu_until_running, 3),
            "control_plane_cpu_seconds": plane_cpu_until_running,
            **until_running,
        },
        "peak_rss_mb": round(peak_rss / 2**20, 1),
        "peak_rss_until_running_mb": round(peak_rss_until_running / 2**20, 1),
        "idle_polling_default": idle_polling,
        "idle_polling_off": idle_off,
    }
    result["targets"] = bench.targets(result)
    return result
