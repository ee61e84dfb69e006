"""`kubetune demo`: kubetune working end to end in minutes, with nothing but Python.

It makes a tiny Llama-architecture model and tokenizer (deterministic, from a config), starts an S3 server
on loopback so the S3 path is the one exercised, uploads the model and the support dataset shipped with this
package (`kubetune_cli/data/`, so a wheel install runs it too), and runs a real QLoRA FineTuneJob (4-bit NF4
on CPU) from S3 to S3 through `kubetune run`'s code. It ends with the artifacts (copied out of the
short-lived S3 server), the loss curve's ends, a sample generation, and the YAML that runs the same job on
a cluster.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from importlib.resources import as_file, files
from pathlib import Path
from typing import IO, Any

import yaml

from kubetune_cli.local import execute, free_port, prepare, print_status
from kubetune_operator import API_GROUP, API_VERSION, KIND
from kubetune_operator.api import parse_finetunejob
from kubetune_trainer.config import StorageSpec
from kubetune_trainer.contract import EXIT_OK

# Package data, not a path into a checkout: `pip install kubetune[local,trainer]` + `kubetune demo` works.
DEMO_DATA = files("kubetune_cli").joinpath("data")
DEMO_NAME = "support-bot-demo"
BUCKETS = ("models", "datasets", "artifacts")
SAMPLE_PROMPTS = [
    "How do I reset my Quillstack password?",
    "What does error code QS-429 mean?",
]


def demo_job(endpoint: str, max_steps: int) -> dict[str, Any]:
    """The FineTuneJob the demo runs: QLoRA defaults, sized for two CPU cores."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": DEMO_NAME},
        "spec": {
            "model": {"source": "s3://models/tiny-llama/"},
            "dataset": {
                "train": "s3://datasets/support/train.jsonl",
                "eval": "s3://datasets/support/eval.jsonl",
                "maxLength": 256,
            },
            "method": {"type": "qlora", "quantization": {"bits": 4, "type": "nf4", "doubleQuant": True}},
            "training": {
                "maxSteps": max_steps,
                "learningRate": 5.0e-3,  # a ~200k-parameter model from random init needs more than 2e-4
                "batchSize": 4,
                "gradientAccumulationSteps": 1,
                "evalEverySteps": max(10, max_steps // 4),
                "checkpointEverySteps": max(10, max_steps // 2),
                "logEverySteps": 5,
            },
            "evaluation": {"prompts": SAMPLE_PROMPTS, "maxNewTokens": 40},
            "output": {"destination": "s3://artifacts/support-bot-demo/"},
            "storage": {"endpoint": endpoint, "region": "us-east-1"},
            "resources": {"gpus": 0},
        },
    }


def cluster_job(job: dict[str, Any]) -> dict[str, Any]:
    """The same job for a real cluster: a real base model, a GPU, S3 credentials from a Secret."""
    cluster = copy.deepcopy(job)
    spec = cluster["spec"]
    spec["model"]["source"] = "s3://models/llama-3.1-8b-instruct/"
    spec["dataset"]["maxLength"] = 2048
    spec["training"] = {"epochs": 3}
    spec["evaluation"]["maxNewTokens"] = 128
    spec["storage"] = {"credentialsSecretRef": {"name": "s3-credentials"}}
    spec["resources"] = {"gpus": 1, "memory": "48Gi"}
    cluster["metadata"]["name"] = "support-bot"
    spec["output"]["destination"] = "s3://artifacts/support-bot/"
    return cluster


def run_demo(workdir: Path, *, max_steps: int = 200, out: IO[str] = sys.stdout) -> int:
    from moto.server import ThreadedMotoServer
    from transformers.utils import logging as transformers_logging

    from kubetune_trainer.storage import Storage
    from kubetune_trainer.tiny import write_tiny_model

    transformers_logging.disable_progress_bar()  # the demo prints its own steps

    started = time.monotonic()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] building a tiny Llama model and tokenizer in {workdir / 'tiny-llama'}", file=out, flush=True)
    # Wider random init than a pretrained model's 0.02: LoRA cannot move a near-uniform output head far.
    model_dir = write_tiny_model(workdir / "tiny-llama", initializer_range=0.2)

    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the embedded server's per-request lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # The embedded server takes any credentials; the trainer reads them from the standard AWS environment.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
    try:
        print(f"[2/4] uploading the model and the support dataset to an S3 server at {endpoint}", file=out, flush=True)
        storage = Storage(StorageSpec(endpoint=endpoint))
        for bucket in BUCKETS:
            storage.client.create_bucket(Bucket=bucket)
        storage.upload_dir(model_dir, "s3://models/tiny-llama/")
        with as_file(DEMO_DATA) as data:
            storage.upload_file(data / "support-instructions.jsonl", "s3://datasets/support/train.jsonl")
            storage.upload_file(data / "support-eval.jsonl", "s3://datasets/support/eval.jsonl")

        job_body = demo_job(endpoint, max_steps)
        job_path = workdir / "finetunejob.yaml"
        job_path.write_text(yaml.safe_dump(job_body, sort_keys=False))
        print(f"[3/4] running FineTuneJob {DEMO_NAME} ({job_path}): QLoRA, 4-bit NF4, S3 to S3", file=out, flush=True)
        run = prepare(parse_finetunejob(job_body), workdir / "run", max_steps=None, s3_endpoint=None)
        code, status = execute(run, out)
        print_status(status, out)
        if code != EXIT_OK:
            print(f"the demo run failed; trainer log: {run.trainer_log}", file=out)
            return code

        print("[4/4] copying the artifacts out of the S3 server", file=out, flush=True)
        artifacts = storage.download("s3://artifacts/support-bot-demo/", workdir / "artifacts")
    finally:
        server.stop()
    summarize(artifacts, job_body, time.monotonic() - started, out)
    return EXIT_OK


def summarize(artifacts: Path, job: dict[str, Any], seconds: float, out: IO[str]) -> None:
    metrics = json.loads((artifacts / "metrics.json").read_text())
    samples = [json.loads(line) for line in (artifacts / "samples.jsonl").read_text().splitlines() if line]
    print(f"\nartifacts: {artifacts}", file=out)
    for name in sorted(path.name for path in artifacts.iterdir()):
        print(f"  {name}", file=out)
    print(
        f"train loss: {metrics['first_train_loss']:.3f} -> {metrics['train_loss']:.3f} "
        f"over {metrics['steps']} steps; eval loss {metrics['eval_loss']:.3f}",
        file=out,
    )
    if samples:
        print(f"sample: {samples[0]['prompt']}\n  -> {samples[0]['completion'].strip()[:200]}", file=out)
    print(f"demo finished in {seconds:.0f} s\n", file=out)
    print("the same job on a cluster (kubectl apply -f -):\n---", file=out)
    print(yaml.safe_dump(cluster_job(job), sort_keys=False).rstrip(), file=out)
