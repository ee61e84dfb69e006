"""objective dpo against sft on the same model and the same prompts/answers, on a CPU.

Contenders, each `python -m kubetune_trainer` in a subprocess (alternating, `--reps` rounds):
- `sft`: prompt + chosen answer as instruction rows (template "{prompt}{response}": the same tokens as DPO's
  chosen sequence), packing off (DPO pads too);
- `sft-packed`: the same with kubetune's default packing;
- `dpo`: prompt / chosen / rejected pairs, objective dpo (sigmoid, beta 0.1), reference = adapter disabled.
All: QLoRA nf4 (kubetune's default method), batch 4 (pairs for dpo), no accumulation, the same steps.

Measured from each run's metrics.json: real tokens per second of train() (for dpo the chosen and the rejected
sequences, each with its prompt; the reference pass is extra work these tokens do not count), sequences
(examples or pairs) per second, peak RSS of the trainer process, and /proc/loadavg beside each run.

Usage: python bench/trainer/dpo_vs_sft.py [--reps 3] [--steps 20] [--out bench/results/dpo-vs-sft-DATE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "examples" / "data" / "preferences.jsonl"
MODEL_SHAPE = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 6, "vocab_size": 2000}


def config(kind: str, model: Path, data: Path, out: Path, steps: int) -> dict[str, Any]:
    dataset: dict[str, Any] = {"train": str(data), "evalSplit": 0, "maxLength": 256}
    cfg: dict[str, Any] = {
        "model": {"source": str(model)},
        "dataset": dataset,
        "training": {
            "maxSteps": steps,
            "batchSize": 4,
            "gradientAccumulationSteps": 1,
            "learningRate": 1e-4,
            "logEverySteps": 5,
            "checkpointEverySteps": 10_000,
        },
        "output": {"destination": str(out)},
    }
    if kind == "dpo":
        dataset["format"] = "preference"
        cfg["objective"] = {"type": "dpo"}
    else:
        dataset.update(template="{prompt}{response}", packing=kind == "sft-packed")
    return cfg


def run_one(kind: str, model: Path, rows: dict[str, Path], work: Path, steps: int, n: int) -> dict[str, Any]:
    out = work / f"{kind}-{n}"
    cfg_path = work / f"{kind}-{n}.json"
    cfg_path.write_text(json.dumps(config(kind, model, rows["dpo" if kind == "dpo" else "sft"], out, steps)))
    load = Path("/proc/loadavg").read_text().split()[:3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "trainer"), str(ROOT)])}
    env["KUBETUNE_METRICS_PORT"] = "0"
    subprocess.run(
        [
            *(sys.executable, "-m", "kubetune_trainer", "--config", str(cfg_path)),
            *("--workdir", str(work / f"w-{kind}-{n}"), "--termination-log", str(work / f"{kind}-{n}.termination")),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    seconds = metrics["train_seconds"]
    return {
        "kind": kind,
        "rep": n,
        "loadavg_before": load,
        "train_seconds": seconds,
        "trained_tokens": metrics["trained_tokens"],
        "tokens_per_second": round(metrics["trained_tokens"] / seconds, 1),
        "sequences_per_second": round(metrics["steps"] * 4 / seconds, 2),
        "peak_rss_mb": round(metrics["peak_rss_bytes"] / 2**20, 1),
        # With CUDA: the trainer's torch.cuda.max_memory_allocated per device (none on a CPU).
        "peak_gpu_mb": {d: round(b / 2**20, 1) for d, b in metrics["peak_gpu_memory_bytes"].items()} or None,
        "precision": metrics["precision"],
    }


KEYS = ("tokens_per_second", "sequences_per_second", "peak_rss_mb")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per contender, and dpo/sft ratios: of the medians, and within each round (the fairer one on a
    shared machine, where the load moves between rounds)."""
    summary: dict[str, Any] = {}
    for kind in ("sft", "sft-packed", "dpo"):
        mine = [r for r in runs if r["kind"] == kind]
        summary[kind] = {key: statistics.median(r[key] for r in mine) for key in KEYS}
    for key in KEYS:
        summary[f"dpo/sft {key}"] = round(summary["dpo"][key] / summary["sft"][key], 3)
    by_round = {}
    for n in sorted({r["rep"] for r in runs}):
        one = {r["kind"]: r for r in runs if r["rep"] == n}
        by_round[n] = {key: round(one["dpo"][key] / one["sft"][key], 3) for key in KEYS}
    summary["dpo/sft by round"] = by_round
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "trainer"))
    from kubetune_cli.tiny import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="dpo-vs-sft-"))
    model = write_tiny_model(work / "model", **MODEL_SHAPE)
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    rows = {"dpo": work / "pairs.jsonl", "sft": work / "sft.jsonl"}
    rows["dpo"].write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rows["sft"].write_text("".join(json.dumps({"prompt": p["prompt"], "response": p["chosen"]}) + "\n" for p in pairs))
    runs = []
    for n in range(args.reps):
        for kind in ("sft", "sft-packed", "dpo") if n % 2 == 0 else ("dpo", "sft-packed", "sft"):
            runs.append(run_one(kind, model, rows, work, args.steps, n))
            print(json.dumps(runs[-1]), flush=True)
    summary = summarize(runs)
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "bench/trainer/dpo_vs_sft.py", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} CPUs, shared with other jobs (see loadavg_before per run); no GPU",
        "model": MODEL_SHAPE,
        "data": f"{PAIRS.relative_to(ROOT)} ({len(pairs)} pairs); sft rows = prompt + chosen",
        "steps": args.steps,
        "runs": runs,
        "median": summary,
    }
    out = args.out or ROOT / "bench" / "results" / f"dpo-vs-sft-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
