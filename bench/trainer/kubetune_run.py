"""kubetune's own trainer (`kubetune_trainer.train.run`), in two configurations on the bench workload.

- `seed-method`: the seed recipe's method settings (8-bit base, LoRA r 8 / alpha 32 / dropout 0.05 on
  q_proj and v_proj, learning rate 2e-5), everything else kubetune's default: this isolates the pipeline
  (completion-only labels, packing, no padding, gradient checkpointing only with a GPU).
- `defaults`: kubetune's defaults exactly as a FineTuneJob gets them, nothing overridden but the data and
  the model (QLoRA nf4 with double quant, LoRA r 16 / dropout 0.05 on all linear layers, maxLength 2048,
  packing into rows of batchTokens = maxLength tokens, 2 rows a step, learning rate 2e-4, cosine with
  warm-up, clipping 0.3).
`seed-method` keeps the seed's batch 4 x 2 accumulation and maxLength 512 (as the seed truncates). Both:
one epoch, no held-out split (the bench evaluates every adapter with one evaluator).

`--without LEVER` turns one of the trainer's fast paths back into what it replaced, to measure it:
`segments` (sdpa over the whole packed row with transformers' block-diagonal mask), `shared-dropout`
(peft's own dropout per adapted module), `fused-lora` (peft's forward of each LoRA layer: clone, update,
scaling and sum as separate tensors), `dropout-mask` (torch's Bernoulli mask per element on CPUs),
`input-cast` (peft's cast of adapter inputs to fp32),
`bf16-weights` (peft's fp32 upcast of norms, embeddings and head kept),
`token-rows` (batchSize rows of maxLength tokens a micro-batch, as before batchTokens), `warm-start`,
`mmap-threshold` (glibc's dynamic mmap threshold left as it is), `fused-loss` (the model's own head and
cross-entropy, keeping the fp32 logits for backward).

Usage: python bench/trainer/kubetune_run.py --model DIR --train FILE --out DIR --variant V [--without L ...]
"""

from __future__ import annotations

import argparse
import os
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
    "seed-method": {"method": SEED_METHOD, "training": {"learningRate": 2e-5, "batchTokens": 4 * MAX_LENGTH}},
    "defaults": {"method": {}, "training": {}, "max_length": None},
    # The defaults with gradient checkpointing, as TRL's SFTConfig has it by default: memory for compute.
    "defaults-checkpointing": {"method": {}, "training": {"gradientCheckpointing": True}, "max_length": None},
}
LEVERS = (
    "tcmalloc",
    "segments",
    "shared-dropout",
    "fused-lora",
    "dropout-mask",
    "input-cast",
    "bf16-weights",
    "token-rows",
    "warm-start",
    "mmap-threshold",
    "fused-loss",
)


def switch_off(levers: list[str]) -> None:
    """Add the trainer's speed-ups among `levers` to KUBETUNE_SPEEDUPS_OFF, keeping what the shell set there."""
    from kubetune_trainer import runtime

    off = [part for part in os.environ.get(runtime.SPEEDUPS_OFF_ENV, "").split(",") if part]
    off += [lever for lever in levers if lever in runtime.SPEEDUPS and lever not in off]
    os.environ[runtime.SPEEDUPS_OFF_ENV] = ",".join(off)


def without(levers: list[str]) -> None:
    """Undo the named fast paths in this process: the trainer's speed-ups through its own switch
    (`runtime.SPEEDUPS_OFF_ENV`), the rest by monkeypatching the trainer's modules."""
    from kubetune_trainer import attention, config, objectives

    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        raise SystemExit(f"--without {', '.join(unknown)}: not one of {', '.join(LEVERS)}")
    switch_off(levers)
    for lever in levers:
        if lever == "segments":
            attention.register = lambda: "sdpa"  # type: ignore[assignment]
        elif lever == "token-rows":
            config.TrainerConfig.micro_batch_size = lambda self: self.training.batch_size  # type: ignore[method-assign]
            config.TrainerConfig.packed_row_tokens = lambda self: self.dataset.max_length  # type: ignore[method-assign]
        elif lever == "warm-start":
            objectives.warm_start = lambda scheduler, steps: scheduler  # type: ignore[assignment]


def config(
    model: str,
    train_file: str,
    destination: str,
    variant: str,
    *,
    max_length: int = MAX_LENGTH,
    max_steps: int | None = None,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config.json a FineTuneJob would hand the trainer for this variant (one epoch unless max_steps)."""
    chosen = VARIANTS[variant]
    length: dict[str, Any] = {"maxSteps": max_steps} if max_steps else {"epochs": 1.0}
    dataset: dict[str, Any] = {"train": str(Path(train_file).resolve()), "evalSplit": 0.0}
    if chosen.get("max_length", max_length):  # defaults: the CRD's maxLength
        dataset["maxLength"] = max_length
    return {
        "model": {"source": str(Path(model).resolve())},
        "dataset": dataset,
        "method": chosen["method"],
        "training": {
            **length,
            "checkpointEverySteps": 100000,
            "logEverySteps": 10,
            **chosen["training"],
            **(training or {}),
        },
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
    levers_off: list[str] = (),  # type: ignore[assignment]
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    without(list(levers_off))
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.train import run

    out = Path(output_dir)
    cfg = TrainerConfig.model_validate(
        config(
            model,
            train_file,
            str(out / "destination"),
            variant,
            max_length=max_length,
            max_steps=max_steps,
            training=training,
        )
    )
    quant = cfg.method.effective_quantization()
    outcome = run(cfg, out / "work")
    metrics = outcome.metrics
    return {
        "contender": f"kubetune-{variant}" + "".join(f"-without-{lever}" for lever in levers_off),
        "max_length": cfg.dataset.max_length,
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
    parser.add_argument("--without", action="append", default=[], choices=LEVERS)
    parser.add_argument("--result")
    args = parser.parse_args(argv)
    import sys

    from kubetune_trainer import runtime

    switch_off(args.without)
    runtime.preload_allocator([sys.executable, *sys.argv])  # as the trainer's entry point does, before torch loads
    runtime.configure(os.environ)
    write_result(args.result, train(args.model, args.train, args.out, variant=args.variant, levers_off=args.without))


if __name__ == "__main__":
    main()
