"""What a user would pick instead of the seed recipe: TRL's SFTTrainer, same method settings.

8-bit base (`BitsAndBytesConfig(load_in_8bit=True)`), LoRA r 8 / alpha 32 / dropout 0.05 on q_proj and
v_proj, learning rate 2e-5, batch 4 x 2 accumulation, max_length 512, one epoch - as the seed recipe.
Everything else is TRL's default: prompt/completion rows with completion-only loss, EOS appended,
gradient checkpointing on; `--packing` turns on TRL's packing (best-fit decreasing, padding-free).

Usage: python bench/trainer/trl_baseline.py --model DIR --train FILE --out DIR [--packing] [--result FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

try:
    from bench.trainer.workload import MAX_LENGTH, TEMPLATE, read_jsonl, write_result
except ModuleNotFoundError:  # run as a script
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.trainer.workload import MAX_LENGTH, TEMPLATE, read_jsonl, write_result


def train(model_name: str, train_file: str, output_dir: str, *, packing: bool, epochs: float = 1) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    started = time.monotonic()
    prefix, suffix = TEMPLATE.split("{response}")
    rows = [
        {"prompt": prefix.replace("{prompt}", r["prompt"]), "completion": r["response"] + suffix}
        for r in read_jsonl(Path(train_file))
    ]
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForCausalLM.from_pretrained(model_name, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    peft_config = LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM
    )
    args = SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=epochs,
        learning_rate=2e-5,
        max_length=MAX_LENGTH,
        packing=packing,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    setup_seconds = time.monotonic() - started
    t0 = time.monotonic()
    output = trainer.train()
    train_seconds = time.monotonic() - t0
    trainer.model.save_pretrained(f"{output_dir}/adapter")
    # Packed or not, the rows TRL trains on hold no padding: their lengths are the real tokens.
    real_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * epochs
    return {
        "contender": "trl-packing" if packing else "trl",
        "quantization": "int8",
        "adapter": f"{output_dir}/adapter",
        "examples": len(rows),
        "real_tokens": int(real_tokens),
        "sequences": len(trainer.train_dataset),
        "train_seconds": round(train_seconds, 3),
        "setup_seconds": round(setup_seconds, 3),
        "optimizer_steps": trainer.state.global_step,
        "train_loss": output.training_loss,
        "gradient_checkpointing": args.gradient_checkpointing,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--result")
    args = parser.parse_args(argv)
    write_result(args.result, train(args.model, args.train, args.out, packing=args.packing))


if __name__ == "__main__":
    main()
