"""kubetune's own trainer (`kubetune_trainer.train.run`), in two configurations on the bench workload.

- `seed-method`: the seed recipe's method settings (8-bit base, LoRA r 8 / alpha 32 / dropout 0.05 on
  q_proj and v_proj, learning rate 2e-5), everything else kubetune's default: this isolates the pipeline
  (completion-only labels, packing, no padding, gradient checkpointing only with a GPU).
- `defaults`: kubetune's defaults as a FineTuneJob gets them (QLoRA nf4 with double quant, LoRA r 16 on
  all linear layers, packing, learning rate 2e-4, cosine with warm-up, clipping 0.3).
Both: batch 4 x 2 accumulation (kubetune's default, the seed's too), maxLength 512 as the seed
truncates, one epoch, no held-out split (the bench evaluates every adapter with one evaluator).

Usage: python bench/trainer/kubetune_run.py --model DIR --train FILE --out DIR --variant V [--result FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

try:
    from bench.trainer.workload import MAX_LENGTH, write_result
except ModuleNotFoundError:  # run as a script
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "trainer"))
    from bench.trainer.workload import MAX_LENGTH, write_result

SEED_METHOD = {
    "type": "qlora",
    "quantization": {"bits": 8},
    "lora": {"r": 8, "alpha": 32, "dropout": 0.05, "targetModules": ["q_proj", "v_proj"]},
}
VARIANTS: dict[str, dict[str, Any]] = {
    "seed-method": {"method": SEED_METHOD, "training": {"learningRate": 2e-5}},
    "defaults": {"method": {}, "training": {}},
}


def config(
    model: str,
    train_file: str,
    destination: str,
    variant: str,
    *,
    max_length: int = MAX_LENGTH,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """The config.json a FineTuneJob would hand the trainer for this variant (one epoch unless max_steps)."""
    chosen = VARIANTS[variant]
    length: dict[str, Any] = {"maxSteps": max_steps} if max_steps else {"epochs": 1.0}
    return {
        "model": {"source": str(Path(model).resolve())},
        "dataset": {"train": str(Path(train_file).resolve()), "evalSplit": 0.0, "maxLength": max_length},
        "method": chosen["method"],
        "training": {**length, "checkpointEverySteps": 100000, "logEverySteps": 10, **chosen["training"]},
        "output": {"destination": str(Path(destination).resolve())},
    }


def train(
    model: str,
    train_file: str,
    output_dir: str,
    *,
    variant: str,
    max_length: int = MAX_LENGTH,
    max_steps: int | None = None,
) -> dict[str, Any]:
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.train import run

    out = Path(output_dir)
    cfg = TrainerConfig.model_validate(
        config(model, train_file, str(out / "destination"), variant, max_length=max_length, max_steps=max_steps)
    )
    quant = cfg.method.effective_quantization()
    outcome = run(cfg, out / "work")
    metrics = outcome.metrics
    return {
        "contender": f"kubetune-{variant}",
        "quantization": "none" if quant is None else ("int8" if quant.bits == 8 else quant.type),
        "adapter": str(out / "destination" / "adapter"),
        "examples": metrics["train_examples"],
        "real_tokens": metrics["trained_tokens"],
        "train_seconds": metrics["train_seconds"],
        "optimizer_steps": metrics["steps"],
        "train_loss": metrics["train_loss"],
        "peak_gpu_memory_bytes": max(metrics["peak_gpu_memory_bytes"].values(), default=None),
        "config": cfg.trainer_json(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--result")
    args = parser.parse_args(argv)
    write_result(args.result, train(args.model, args.train, args.out, variant=args.variant))


if __name__ == "__main__":
    main()
