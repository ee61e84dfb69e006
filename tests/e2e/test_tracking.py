"""spec.tracking end to end: `kubetune run` reporting to a real MLflow tracking server on loopback and to W&B
in offline mode, and a tracking server that is down costing the run nothing."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from kubetune_cli.local import free_port
from kubetune_trainer.contract import EXIT_OK
from tests.e2e.test_local import DATA, kubetune, local_job, status_of, write_job
from tests.support.trackers import MlflowServer, wandb_history, wandb_run_dir, wandb_summary
from tests.unit.test_status_schema import STATUS_SCHEMA

STEPS = 6


def tracked_job(tmp_path: Path, model: Path, tracking: dict[str, object]) -> Path:
    job = local_job(
        str(model),
        f"file://{DATA}/support-instructions.jsonl",
        str(tmp_path / "out"),
        maxSteps=STEPS,
        logEverySteps=1,
        evalEverySteps=3,
        checkpointEverySteps=100,
    )
    job["metadata"]["name"] = "tracked"
    job["spec"]["dataset"]["evalSplit"] = 0.02
    job["spec"]["tracking"] = tracking
    return write_job(tmp_path / "job.yaml", job)


def test_a_run_reports_to_mlflow_and_to_wandb_offline(
    tmp_path: Path, tiny_model_dir: Path, mlflow_tracking: MlflowServer
) -> None:
    path = tracked_job(
        tmp_path,
        tiny_model_dir,
        {
            "mlflow": {"trackingUri": mlflow_tracking.url, "experiment": "e2e"},
            "wandb": {"project": "e2e", "mode": "offline"},
        },
    )
    result = kubetune("run", str(path), "--workdir", str(tmp_path / "work"))
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    status = status_of(result.stdout)
    jsonschema.validate(status, STATUS_SCHEMA)  # status.tracking is declared in the CRD
    mlflow_run, wandb_run = status["tracking"]
    assert mlflow_run["backend"] == "mlflow" and mlflow_run["state"] == "finished", status
    assert mlflow_run["url"].startswith(f"{mlflow_tracking.url}/#/experiments/")
    assert mlflow_run["url"].endswith(f"/runs/{mlflow_run['runId']}")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())

    client = mlflow_tracking.client()
    run = client.get_run(mlflow_run["runId"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == "e2e"
    # The whole effective config, as dotted parameters (and as config.json among the artifacts).
    params = run.data.params
    assert params["kubetune.training.maxSteps"] == str(STEPS)
    assert params["kubetune.dataset.maxLength"] == "128"
    assert params["kubetune.method.type"] == "qlora"
    # One point per logged step for every per-step metric, the same values the trainer recorded.
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [h["step"] for h in metrics["loss_history"]] == list(range(1, STEPS + 1))
    assert [m.value for m in losses] == [h["loss"] for h in metrics["loss_history"]]
    for name in ("learning_rate", "grad_norm", "tokens_per_second"):
        assert len(client.get_metric_history(run.info.run_id, name)) == STEPS, name
    evals = client.get_metric_history(run.info.run_id, "eval_loss")
    assert [m.step for m in evals] == [h["step"] for h in metrics["eval_history"]] == [3, 6]
    final = run.data.metrics
    assert final["final/eval_loss"] == metrics["eval_loss"]
    assert final["final/train_loss"] == metrics["train_loss"]
    assert final["final/trained_tokens"] == metrics["trained_tokens"]
    assert final["final/steps"] == STEPS
    assert run.data.tags["kubetune.artifacts.adapter"] == f"{tmp_path / 'out'}/adapter/"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"README.md", "metrics.json", "config.json"} <= artifacts

    # W&B offline: the run directory, uploaded with the artifacts, holds the same metrics.
    assert wandb_run["backend"] == "wandb" and wandb_run["state"] == "finished", status
    run_dir = wandb_run_dir(tmp_path / "out")
    assert wandb_run["location"] == f"{tmp_path / 'out'}/wandb/{run_dir.name}/"
    assert run_dir.name.endswith(wandb_run["runId"])
    history = wandb_history(run_dir)
    train_rows = [row for row in history if "train/loss" in row]
    assert [row["train/global_step"] for row in train_rows] == list(range(1, STEPS + 1))
    assert [row["train/loss"] for row in train_rows] == [h["loss"] for h in metrics["loss_history"]]
    assert all("train/tokens_per_second" in row and "train/grad_norm" in row for row in train_rows)
    assert [row["eval/loss"] for row in history if "eval/loss" in row] == [
        h["eval_loss"] for h in metrics["eval_history"]
    ]
    summary = wandb_summary(run_dir)
    assert summary["final/eval_loss"] == metrics["eval_loss"]
    assert summary["artifacts/adapter"] == f"{tmp_path / 'out'}/adapter/"
    assert {"README.md", "metrics.json"} <= {p.name for p in (run_dir / "files").iterdir()}


def test_a_tracking_server_that_is_down_costs_the_run_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    path = tracked_job(tmp_path, tiny_model_dir, {"mlflow": {"trackingUri": down}})
    result = kubetune(
        "run", str(path), "--workdir", str(tmp_path / "work"), env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    )
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    status = status_of(result.stdout)
    assert status["phase"] == "Succeeded" and status["result"]["steps"] == STEPS
    (tracked,) = status["tracking"]
    assert tracked["backend"] == "mlflow" and tracked["state"] == "failed"
    assert tracked["message"].startswith("cannot start a run in mlflow:"), tracked
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
    log = (tmp_path / "work" / "trainer.log").read_text()
    assert "training goes on without it" in log
