"""`kubetune render`: what the operator would create, or the same located errors as `kubetune validate`."""

from __future__ import annotations

import json
import pathlib

import kubernetes_validate
import pytest
import yaml

from kubetune_cli.main import main

EXAMPLES = pathlib.Path(__file__).parents[2] / "examples"


@pytest.mark.parametrize("example", ["qlora-minimal.yaml", "kueue-queued.yaml", "multi-gpu.yaml", "chat-lora.yaml"])
def test_render_prints_a_configmap_and_a_job(example: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(EXAMPLES / example), "--image", "registry.example/trainer:9"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [obj["kind"] for obj in objects] == ["ConfigMap", "Job"]
    configmap, job = objects
    assert json.loads(configmap["data"]["config.json"])["output"]["destination"].startswith("s3://")
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/trainer:9"
    for obj in objects:
        kubernetes_validate.validate(obj, "1.33.0", strict=True)


def test_render_reports_invalid_files_like_validate(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLES / "qlora-minimal.yaml").read_text().replace("s3://", "ftp://", 1))
    assert main(["render", str(bad)]) == 1
    rendered_errors = capsys.readouterr()
    assert rendered_errors.out == ""
    assert main(["validate", str(bad)]) == 1
    assert capsys.readouterr().err == rendered_errors.err
    assert rendered_errors.err.startswith(f"{bad}:")


def test_render_of_a_multi_node_run_shows_the_service_and_the_rendezvous(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(EXAMPLES / "multi-node.yaml")]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [obj["kind"] for obj in objects] == ["ConfigMap", "Service", "Job"]
    _, service, job = objects
    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 2
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--rdzv-endpoint") + 1] == "llama-70b-2node-0.llama-70b-2node-nodes:29400"
    for obj in objects:
        kubernetes_validate.validate(obj, "1.33.0", strict=True)
