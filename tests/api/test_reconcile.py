"""Create -> ConfigMap + Job, and the phases of a run, end to end through the operator."""

from __future__ import annotations

import json

from tests.api.conftest import Cluster, Operator
from tests.kubeapi import cluster as kubelet


def test_create_makes_configmap_and_job(operator: Operator, cluster: Cluster) -> None:
    ftj = cluster.apply(spec={"scheduling": {"nodeSelector": {"gpu": "h100"}}})
    job = cluster.wait_job()
    configmap = cluster.configmap()
    assert configmap is not None
    for child in (job, configmap):
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner["uid"] == ftj["metadata"]["uid"] and owner["controller"] is True
        assert child["metadata"]["labels"]["kubetune.dev/finetunejob"] == "support-bot"
    config = json.loads(configmap["data"]["config.json"])
    assert config["model"]["source"] == "s3://models/tiny/"
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/kubetune/trainer:test"
    assert pod["nodeSelector"] == {"gpu": "h100"}
    status = cluster.wait_phase("Pending", reason="WaitingForPod")
    assert status["jobName"] == "support-bot"
    assert status["observedGeneration"] == ftj["metadata"]["generation"]
    assert {c["type"] for c in status["conditions"]} >= {"Ready", "Running", "Succeeded", "Failed", "Suspended"}
