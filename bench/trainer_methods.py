"""Steps per second and peak RSS of the trainer per method on the tiny model (CPU), one process per method.

    python bench/trainer_methods.py [--steps 20] [--workdir DIR]

Each method runs `python -m kubetune_trainer` on local files (no S3), so the numbers are the trainer's own:
steps/s over the training loop (metrics.json) and the process's peak resident set size (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "qlora4": {"type": "qlora", "quantization": {"bits": 4}},
    "qlora8": {"type": "qlora", "quantization": {"bits": 8}},
    "lora": {"type": "lora"},
    "full": {"type": "full"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer"), str(REPO)]),
        "KUBETUNE_METRICS_PORT": "0",
    }
    model = work / "model"
    subprocess.run(
        [sys.executable, "-c", f"from kubetune_cli.tiny import write_tiny_model; write_tiny_model({str(model)!r})"],
        env=env,
        check=True,
    )
    print(f"{'method':8} {'steps/s':>8} {'peak RSS MiB':>13} {'first loss':>11} {'last loss':>10}")
    for name, method in METHODS.items():
        out = work / f"out-{name}"
        config = {
            "model": {"source": str(model)},
            "dataset": {
                "train": str(REPO / "cli/kubetune_cli/data/support-instructions.jsonl"),
                "maxLength": 256,
                "evalSplit": 0,
            },
            "method": method,
            "training": {
                "maxSteps": args.steps,
                "learningRate": 3e-3 if name == "full" else 1e-2,
                "batchSize": 4,
                "gradientAccumulationSteps": 1,
                "logEverySteps": 5,
                "checkpointEverySteps": 10_000,
            },
            "output": {"destination": str(out)},
        }
        path = work / f"{name}.json"
        path.write_text(json.dumps(config))
        subprocess.run(
            [sys.executable, "-m", "kubetune_trainer", "--config", str(path), "--termination-log",
             str(work / f"{name}.term"), "--workdir", str(work / f"wd-{name}")],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        metrics = json.loads((out / "metrics.json").read_text())
        print(
            f"{name:8} {metrics['steps_per_second']:8.2f} {metrics['peak_rss_bytes'] / 2**20:13.0f} "
            f"{metrics['first_train_loss']:11.3f} {metrics['train_loss']:10.3f}"
        )


if __name__ == "__main__":
    main()
