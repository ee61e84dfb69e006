"""The shipped Grafana dashboard shows data: every panel's PromQL, run through a real Prometheus that scrapes a
real trainer and the real operator, returns samples.

The live test wires the pieces as a cluster would, playing only what this machine lacks (the Job controller,
scheduler and kubelet, via `tests.kubeapi.cluster`, as the API tests do):

- the operator (Kopf, in-process) against the emulated API server; a FineTuneJob with local paths;
- the trainer: `python -m kubetune_trainer` with the config.json the operator rendered into the ConfigMap and
  the environment from the Job's container, on a tiny model, until Prometheus has seen several steps,
  evaluations and checkpoint uploads; then SIGTERM, as a preemption (it saves a checkpoint and exits 3);
- a second FineTuneJob whose pod fails (exit 2, invalid input), so the outcome panels have a finished run;
- Prometheus, with static targets relabelled exactly as prometheus-operator does for the chart's rendered
  PodMonitor and ServiceMonitor (the target labels, the chart's relabelings, metricRelabelings, honorLabels).

GPU panels: see `dashboard.GPU_ONLY_PANELS`; on CPU their queries must succeed and be empty. The preference
panels (`dashboard.DPO_PANELS`) must be empty for this SFT run; a DPO run, watched the same way, shows them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.api.fixtures import Cluster, Operator
from tests.kubeapi import cluster as kubelet
from tests.metrics import dashboard as dash
from tests.support.prometheus import (
    SCRAPE_INTERVAL_SECONDS,
    Prometheus,
    free_port,
    promtool_check_metrics,
    require_prometheus,
)
from tests.support.tools import ensure_helm

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "kubetune"
RELEASE, RELEASE_NAMESPACE = "kubetune", "kubetune-system"
RUN, NAMESPACE = "support-bot", "default"
DOOMED = "doomed-run"
# Grafana's $__rate_interval is max($__interval + scrape interval, 4 x scrape interval); with 1 s scrapes that
# is 4 s. A wider window keeps the check steady when this (shared, 2-core) machine delays a scrape.
RATE_INTERVAL = "15s"


# -- the dashboard on its own -------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_with_run_variables() -> None:
    board = dash.load()
    assert board["uid"] == "kubetune" and board["schemaVersion"] >= 39
    assert "id" not in board
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "finetunejob"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"]["uid"] == dash.DATASOURCE_UID
        assert variable["includeAll"] is True and variable["multi"] is True and variable["allValue"] == ".*"
        dash.parse_label_values(dash.variable_queries(board)[name])
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    for panel in dash.panels(dash.load()):
        assert panel["datasource"] == {"type": "prometheus", "uid": dash.DATASOURCE_UID}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == dash.DATASOURCE_UID, (panel["title"], target["refId"])


def test_per_run_queries_select_by_the_monitors_labels_and_variables() -> None:
    """Trainer and kubetune_run_* series carry namespace and finetunejob: every selector of them filters by both."""
    for query in dash.queries(dash.load()):
        for name in dash.metric_names(query.expr):
            if name.startswith(("kubetune_trainer_", "kubetune_run_progress", "kubetune_run_train")):
                selectors = [part for part in query.expr.split(name)[1:]]
                for rest in selectors:
                    assert rest.startswith('{namespace=~"$namespace", finetunejob=~"$finetunejob"}'), (
                        query.panel,
                        name,
                    )


def exposed_sample_names(exposition: str) -> set[str]:
    """Every sample name an exposition can produce, from its families (a labelled family may have no samples)."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
        names.update(sample.name for sample in family.samples)
    return names


def test_every_metric_the_dashboard_uses_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the metric families the operator and the trainer register (GPU ones as with CUDA)."""
    import torch

    from kubetune_operator.metrics import Metrics
    from kubetune_trainer.server import Telemetry

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # registers the GPU gauges; none is read
    trainer = Telemetry(NAMESPACE, RUN)
    monkeypatch.undo()
    exported = exposed_sample_names(generate_latest_text(trainer.registry))
    exported |= exposed_sample_names(Metrics().render().decode())
    used = {name for query in dash.queries(dash.load()) for name in dash.metric_names(query.expr)}
    assert used, "no metric names found in the dashboard"
    assert used <= exported, f"the dashboard uses metrics nobody exports: {sorted(used - exported)}"


def generate_latest_text(registry: Any) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


# -- the live test: real trainer, real operator, real Prometheus --------------------------------------------


def _snake(key: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in key)


def _relabel_configs(relabelings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{_snake(k): v for k, v in rule.items()} for rule in relabelings]


def render_monitors() -> dict[str, dict[str, Any]]:
    values = {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}}
    rendered = subprocess.run(
        [str(ensure_helm()), "template", RELEASE, str(CHART_DIR), "--namespace", RELEASE_NAMESPACE, "-f", "-"],
        input=yaml.safe_dump(values),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    return {d["kind"]: d for d in docs if d["kind"] in ("PodMonitor", "ServiceMonitor")}


def scrape_configs(monitors: dict[str, dict[str, Any]], trainer: tuple[int, str], operator_port: int) -> list[Any]:
    """Static targets with the meta labels Kubernetes service discovery would give, relabelled as
    prometheus-operator generates it for the chart's monitors (target labels first, then the chart's rules)."""
    trainer_port, trainer_pod = trainer
    pod_monitor = monitors["PodMonitor"]
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    service_monitor = monitors["ServiceMonitor"]
    (service_endpoint,) = service_monitor["spec"]["endpoints"]

    def copy(source: str, target: str) -> dict[str, Any]:
        return {"source_labels": [source], "target_label": target, "action": "replace"}

    def fixed(target: str, value: str) -> dict[str, Any]:
        return {"target_label": target, "replacement": value, "action": "replace"}

    trainer_config = {
        "job_name": "trainer",
        "metrics_path": pod_endpoint["path"],
        "honor_labels": bool(pod_endpoint.get("honorLabels", False)),
        "static_configs": [
            {
                "targets": [f"127.0.0.1:{trainer_port}"],
                "labels": {
                    "__meta_kubernetes_namespace": NAMESPACE,
                    "__meta_kubernetes_pod_name": trainer_pod,
                    "__meta_kubernetes_pod_container_name": "trainer",
                    "__meta_kubernetes_pod_label_kubetune_dev_finetunejob": RUN,
                },
            }
        ],
        "relabel_configs": [
            copy("__meta_kubernetes_namespace", "namespace"),
            copy("__meta_kubernetes_pod_container_name", "container"),
            copy("__meta_kubernetes_pod_name", "pod"),
            fixed("job", f"{pod_monitor['metadata']['namespace']}/{pod_monitor['metadata']['name']}"),
            fixed("endpoint", pod_endpoint["port"]),
            *_relabel_configs(pod_endpoint.get("relabelings", [])),
        ],
        "metric_relabel_configs": _relabel_configs(pod_endpoint.get("metricRelabelings", [])),
    }
    service = service_monitor["metadata"]["name"]
    operator_config = {
        "job_name": "operator",
        "metrics_path": service_endpoint["path"],
        "honor_labels": bool(service_endpoint.get("honorLabels", False)),
        "static_configs": [
            {
                "targets": [f"127.0.0.1:{operator_port}"],
                "labels": {
                    "__meta_kubernetes_namespace": RELEASE_NAMESPACE,
                    "__meta_kubernetes_service_name": service,
                    "__meta_kubernetes_pod_name": f"{service}-5d9c7b8f4-x2x7q",
                    "__meta_kubernetes_pod_container_name": "operator",
                },
            }
        ],
        "relabel_configs": [
            copy("__meta_kubernetes_namespace", "namespace"),
            copy("__meta_kubernetes_service_name", "service"),
            copy("__meta_kubernetes_pod_name", "pod"),
            copy("__meta_kubernetes_pod_container_name", "container"),
            copy("__meta_kubernetes_service_name", "job"),
            fixed("endpoint", service_endpoint["port"]),
            *_relabel_configs(service_endpoint.get("relabelings", [])),
        ],
        "metric_relabel_configs": _relabel_configs(service_endpoint.get("metricRelabelings", [])),
    }
    return [trainer_config, operator_config]


def write_data(tmp_path: Path) -> tuple[Path, Path]:
    examples = REPO_ROOT / "cli" / "kubetune_cli" / "data"
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text((examples / "support-instructions.jsonl").read_text())
    evaluation.write_text("".join((examples / "support-eval.jsonl").read_text().splitlines(True)[:6]))
    return train, evaluation


def run_spec(model: Path, train: Path, evaluation: Path, output: Path) -> dict[str, Any]:
    """Small and slow enough to scrape: many steps (stopped by SIGTERM), frequent evals and checkpoints."""
    return {
        "model": {"source": str(model)},
        "dataset": {"train": str(train), "eval": str(evaluation), "maxLength": 64, "packing": True},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
        "training": {
            "maxSteps": 5000,
            "batchSize": 2,
            "gradientAccumulationSteps": 1,
            "logEverySteps": 1,
            "evalEverySteps": 4,
            "checkpointEverySteps": 3,
            "checkpointsToKeep": 1,
            "precision": "fp32",
            "gradientCheckpointing": False,
        },
        "output": {"destination": str(output)},
    }


def trainer_environment(job: dict[str, Any], port: int) -> dict[str, str]:
    """The environment the Job gives the trainer container (plain values), on a free local port."""
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e}}
    env["KUBETUNE_METRICS_PORT"] = str(port)
    # This checkout's trainer, whatever the venv has installed.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "trainer"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def with_metrics_port(job: dict[str, Any], port: int) -> dict[str, Any]:
    """The Job as created, but its pods' metrics port moved to a free local one (many tests share 127.0.0.1)."""
    job = json.loads(json.dumps(job))
    for declared in job["spec"]["template"]["spec"]["containers"][0]["ports"]:
        if declared["name"] == "metrics":
            declared["containerPort"] = port
    return job


def start_pod(job: dict[str, Any]) -> dict[str, Any]:
    """Create, schedule and start the Job's pod, at 127.0.0.1 so the operator's /progress polls reach it."""
    pod = kubelet.create_pod_for_job(job)
    pod = kubelet.set_pod_running(pod)
    meta = pod["metadata"]
    kubernetes.client.CoreV1Api().patch_namespaced_pod_status(
        meta["name"], meta["namespace"], {"status": {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}}
    )
    kubelet.update_job_status(job, active=1)
    return pod


def fail_a_run(cluster: Cluster, spec: dict[str, Any]) -> None:
    """A second FineTuneJob whose trainer exits 2 (bad input) and whose Job fails on the podFailurePolicy."""
    from kubetune_trainer.contract import EXIT_INVALID_INPUT, TerminationMessage, TrainerError

    cluster.apply(DOOMED, spec=spec)
    job = cluster.wait_job(DOOMED)
    pod = start_pod(with_metrics_port(job, free_port()))
    cluster.wait_phase("Running", DOOMED)
    message = TerminationMessage(
        outcome="invalid",
        exit_code=EXIT_INVALID_INPUT,
        error=TrainerError(reason="InvalidDataset", message="line 3: no 'prompt' field", field="dataset.fields.prompt"),
    ).encode()
    kubelet.terminate_pod(pod, EXIT_INVALID_INPUT, message)
    kubelet.set_job_condition(job, "Failed", "PodFailurePolicy", "Container trainer exited with code 2")
    cluster.wait_phase("Failed", DOOMED)


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    points = [p for series in result for p in series.get("values", [series.get("value")]) if p]
    return [float(v) for _, v in points if math.isfinite(float(v))]


@dataclass
class WatchedRun:
    """A FineTuneJob the operator made a Job (and a running pod at 127.0.0.1) for, with Prometheus scraping the
    trainer's port and the operator; `start_trainer` runs the trainer with the operator's config.json."""

    cluster: Cluster
    job: dict[str, Any]
    pod: dict[str, Any]
    spec: dict[str, Any]
    trainer_port: int
    operator_port: int
    prometheus: Prometheus
    builder: subprocess.Popen[bytes]
    tmp_path: Path
    trainer: subprocess.Popen[bytes] | None = None

    @property
    def termination(self) -> Path:
        return self.tmp_path / "termination-log"

    def start_trainer(self) -> subprocess.Popen[bytes]:
        config = self.tmp_path / "config.json"
        config.write_text(self.cluster.configmap(f"{RUN}-trainer")["data"]["config.json"])
        assert self.builder.wait(timeout=60) == 0, "building the tiny model failed"
        self.trainer = subprocess.Popen(
            [
                *(sys.executable, "-m", "kubetune_trainer", "--config", str(config)),
                *("--termination-log", str(self.termination), "--workdir", str(self.tmp_path / "work")),
            ],
            env=trainer_environment(self.job, self.trainer_port),
        )
        return self.trainer


@contextlib.contextmanager
def watched_run(
    operator: Operator, cluster: Cluster, tmp_path: Path, spec_for: Callable[[Path], dict[str, Any]]
) -> Iterator[WatchedRun]:
    """`spec_for(model dir)` applied as the FineTuneJob RUN, its pod running, Prometheus watching it."""
    model = tmp_path / "model"
    # The tiny model is built in a child process, while the rest starts.
    builder = subprocess.Popen(
        [sys.executable, "-c", f"from kubetune_cli.tiny import write_tiny_model; write_tiny_model({str(model)!r})"],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "trainer")},
    )
    run: WatchedRun | None = None
    prometheus: Prometheus | None = None
    try:
        spec = spec_for(model)
        cluster.apply(RUN, spec=spec)
        job = cluster.wait_job(RUN)
        trainer_port = free_port()
        pod = start_pod(with_metrics_port(job, trainer_port))
        operator_port = int(operator.env["KUBETUNE_METRICS_PORT"])
        prometheus = Prometheus(
            scrape_configs(render_monitors(), (trainer_port, pod["metadata"]["name"]), operator_port)
        ).start()
        cluster.wait_phase("Running", RUN)
        run = WatchedRun(cluster, job, pod, spec, trainer_port, operator_port, prometheus, builder, tmp_path)
        yield run
    finally:
        for child in (builder, run.trainer if run else None):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()
        if prometheus is not None:
            prometheus.stop()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_every_dashboard_query_returns_data_from_a_real_run(
    operator: Operator, cluster: Cluster, tmp_path: Path
) -> None:
    require_prometheus()
    started = time.time()
    train, evaluation = write_data(tmp_path)
    with watched_run(
        operator, cluster, tmp_path, lambda model: run_spec(model, train, evaluation, tmp_path / "out")
    ) as watched:
        prometheus = watched.prometheus
        # A failed run while Prometheus watches, after it has two scrapes of the operator: rate() and increase()
        # need a sample from before an observation.
        prometheus.wait_for('count_over_time(up{job="kubetune"}[1m]) >= 2', timeout=20, what="operator scrapes")
        fail_a_run(cluster, watched.spec)

        trainer_process = watched.start_trainer()
        run = f'namespace="{NAMESPACE}", finetunejob="{RUN}"'
        # Enough for every panel: several scraped steps, two evaluations, a few checkpoint uploads (a labelled
        # histogram's first observation creates its series, so rate() needs the ones after), status progress.
        prometheus.wait_for(f"kubetune_trainer_step{{{run}}} >= 6", timeout=70, what="six scraped steps")
        prometheus.wait_for(f"kubetune_trainer_checkpoint_upload_seconds_count{{{run}}} >= 3", timeout=30)
        prometheus.wait_for(f"kubetune_trainer_eval_loss{{{run}}}", timeout=30)
        prometheus.wait_for(f"kubetune_run_progress_ratio{{{run}}} > 0", timeout=20)
        prometheus.wait_for('kubetune_run_duration_seconds_count{outcome="failed"} >= 1', timeout=20)
        prometheus.wait_for(f"changes(kubetune_trainer_step{{{run}}}[15s]) >= 2", timeout=20)
        time.sleep(2 * SCRAPE_INTERVAL_SECONDS)  # the newest samples lie inside the range queries' last step
        assert trainer_process.poll() is None, "the trainer ended before the checks; see its log above"

        check_target_labels(prometheus, watched.pod["metadata"]["name"])
        check_expositions(watched.trainer_port, watched.operator_port)
        check_queries(prometheus, started)

        trainer_process.send_signal(signal.SIGTERM)  # a preemption: it saves a checkpoint and exits 3
        assert trainer_process.wait(timeout=60) == 3
        assert json.loads(watched.termination.read_text())["outcome"] == "preempted"
    assert time.time() - started < 90, f"took {time.time() - started:.0f} s; the budget is 90 s"


def check_target_labels(prometheus: Prometheus, pod: str) -> None:
    """The labels a trainer series ends up with are the monitors' target labels; no exported_* copies."""
    (series,) = prometheus.query(f'kubetune_trainer_total_steps{{finetunejob="{RUN}"}}')
    labels = series["metric"]
    assert labels["namespace"] == NAMESPACE and labels["pod"] == pod and labels["container"] == "trainer"
    assert not [k for k in labels if k.startswith("exported_")], labels
    (progress,) = prometheus.query(f'kubetune_run_progress_ratio{{finetunejob="{RUN}"}}')
    assert progress["metric"]["namespace"] == NAMESPACE  # honorLabels: the FineTuneJob's, not the operator's
    (reconciles,) = prometheus.query('kubetune_reconcile_total{result="ok"}')
    assert reconciles["metric"]["namespace"] == RELEASE_NAMESPACE


def check_expositions(trainer_port: int, operator_port: int) -> None:
    for port in (trainer_port, operator_port):
        exposition = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).content
        lint = promtool_check_metrics(exposition)
        assert lint.returncode == 0 and not lint.stdout.strip(), f"promtool on :{port}: {lint.stdout}{lint.stderr}"


def check_queries(prometheus: Prometheus, started: float, *, dpo_run: bool = False) -> None:
    """An SFT run: every panel but the GPU and DPO ones has data, those have none. A DPO run: the DPO panels
    have data."""
    board = dash.load()
    end = time.time()
    choices = {}
    for name, query in dash.variable_queries(board).items():
        selector, label = dash.parse_label_values(query)
        values = prometheus.label_values(label, dash.substitute(selector, {"namespace": ".*"}))
        choices[name] = values
    assert NAMESPACE in choices["namespace"] and RUN in choices["finetunejob"], choices
    builtins = {"__rate_interval": RATE_INTERVAL, "__interval": "1s", "__range": f"{math.ceil(end - started)}s"}
    selections = {
        "All": {"namespace": ".*", "finetunejob": ".*", **builtins},
        "this run": {"namespace": NAMESPACE, "finetunejob": RUN, **builtins},
    }
    empty, gpu_nonempty, dpo_nonempty, sweep_nonempty = [], [], [], []
    for query in dash.queries(board):
        if dpo_run and not query.dpo_only:
            continue
        for selection, variables in selections.items():
            expr = dash.substitute(query.expr, variables)
            result = (
                prometheus.query(expr)
                if query.instant
                else prometheus.query_range(expr, start=started, end=end, step=1)
            )  # raises with Prometheus' message when the expression is invalid
            where = f"{query.panel} / {query.ref_id} ({selection}): {expr}"
            if query.gpu_only:
                if result:
                    gpu_nonempty.append(where)
            elif query.dpo_only and not dpo_run:
                if result:
                    dpo_nonempty.append(where)
            elif query.sweep_only:
                if result:
                    sweep_nonempty.append(where)
            elif not finite_values(result):
                empty.append(f"{where}\n    -> {json.dumps(result)[:300]}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert not gpu_nonempty, "GPU-only panels with data on a CPU run (update GPU_ONLY_PANELS):\n" + "\n".join(
        gpu_nonempty
    )
    assert not dpo_nonempty, "DPO panels with data from an SFT run (update DPO_PANELS):\n" + "\n".join(dpo_nonempty)
    assert not sweep_nonempty, "sweep panels with data without a sweep (update SWEEP_PANELS):\n" + "\n".join(
        sweep_nonempty
    )


def preference_data(tmp_path: Path) -> tuple[Path, Path]:
    preferences = (REPO_ROOT / "examples" / "data" / "preferences.jsonl").read_text().splitlines(True)
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(preferences[:32]))
    evaluation.write_text("".join(preferences[32:]))
    return train, evaluation


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_preference_panels_show_a_dpo_run(operator: Operator, cluster: Cluster, tmp_path: Path) -> None:
    """objective dpo through the operator (its config.json, its Job's environment), scraped by Prometheus: the
    reward panels have data, and the operator's status.progress carries the reward metrics."""
    require_prometheus()
    started = time.time()
    train, evaluation = preference_data(tmp_path)

    def dpo_spec(model: Path) -> dict[str, Any]:
        spec = run_spec(model, train, evaluation, tmp_path / "out")
        spec["dataset"] = {"train": str(train), "eval": str(evaluation), "maxLength": 64, "format": "preference"}
        spec["objective"] = {"type": "dpo"}
        return spec

    with watched_run(operator, cluster, tmp_path, dpo_spec) as watched:
        trainer_process = watched.start_trainer()
        config = json.loads((tmp_path / "config.json").read_text())
        assert config["objective"] == {"type": "dpo"}
        run = f'namespace="{NAMESPACE}", finetunejob="{RUN}"'
        prometheus = watched.prometheus
        prometheus.wait_for(f"kubetune_trainer_step{{{run}}} >= 5", timeout=90, what="five scraped steps")
        prometheus.wait_for(f"kubetune_trainer_eval_reward_accuracy{{{run}}}", timeout=30)
        prometheus.wait_for(f"changes(kubetune_trainer_reward_margin{{{run}}}[15s]) >= 1", timeout=20)
        time.sleep(2 * SCRAPE_INTERVAL_SECONDS)
        assert trainer_process.poll() is None, "the trainer ended before the checks; see its log above"
        check_queries(prometheus, started, dpo_run=True)
        deadline = time.monotonic() + 20
        while "rewardAccuracy" not in cluster.status(RUN).get("progress", {}) and time.monotonic() < deadline:
            time.sleep(0.5)
        progress = cluster.status(RUN)["progress"]
        assert 0 <= progress["rewardAccuracy"] <= 1 and "rewardMargin" in progress, progress
