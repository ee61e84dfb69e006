"""The seed guide's recipe (its steps 2-5, then step 7's save), as faithfully as today's libraries run it.

Deviations, each needed to run at all or to measure fairly (marked DEVIATION below):
- `load_in_8bit=True` as a from_pretrained kwarg is gone: the same request goes through
  `BitsAndBytesConfig(load_in_8bit=True)`.
- The guide's Trainer gets no labels (its tokenized rows have none and the default collator adds none),
  so it cannot compute a loss. `DataCollatorForLanguageModeling(mlm=False)` supplies labels = input_ids
  with padding set to -100. This tokenizer's pad token is its own `<pad>`, not EOS, so no real token is
  masked by it (the pad == eos trap does not apply; the guide appends no EOS anyway).
- `evaluation_strategy` is now `eval_strategy`; `tokenizer=` is now `processing_class=`; `logging_dir` is
  gone (it only named the TensorBoard directory).
- `report_to="none"` (no wandb), `use_cpu=True`, and one epoch over the benchmark's examples
  instead of three, so that every contender trains on the same examples the same number of times.

Usage: python bench/trainer/seed_recipe.py --model DIR --train FILE --out DIR [--result FILE]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

try:
    from bench.trainer.workload import MAX_LENGTH, write_result
except ModuleNotFoundError:  # run as a script
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.trainer.workload import MAX_LENGTH, write_result


def train(
    model_name: str, train_file: str, output_dir: str, *, epochs: float = 1, use_cpu: bool = True
) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    started = time.monotonic()
    # Step 2: load the model in 8-bit and wrap it with LoRA.
    tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_name,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),  # DEVIATION: was load_in_8bit=True
        device_map="auto",
        trust_remote_code=True,
    )
    lora_config = LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.05,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    model = get_peft_model(model, lora_config)

    # Step 3: the dataset and its instruction format.
    dataset = load_dataset("json", data_files={"train": train_file})

    def format_instruction(example: dict[str, str]) -> dict[str, str]:
        return {"text": f"### Instruction:\n{example['prompt']}\n\n### Response:\n{example['response']}"}

    formatted_dataset = dataset.map(format_instruction)

    # Step 4: tokenize, padded to 512.
    def tokenize(batch: dict[str, list[str]]) -> Any:
        return tokenizer(
            batch["text"], padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )

    tokenized_dataset = formatted_dataset.map(tokenize, batched=True)

    # Step 5: the Trainer.
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=epochs,  # DEVIATION: 3 in the guide; the bench gives every contender one pass
        learning_rate=2e-5,
        logging_steps=10,
        report_to="none",  # DEVIATION: was "wandb"
        save_total_limit=2,
        eval_strategy="no",  # DEVIATION: was evaluation_strategy
        use_cpu=use_cpu,  # DEVIATION: the CPU bench machine has no GPU
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized_dataset["train"],
        processing_class=tokenizer,  # DEVIATION: was tokenizer=
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),  # DEVIATION: labels
    )
    setup_seconds = time.monotonic() - started
    t0 = time.monotonic()
    output = trainer.train()
    train_seconds = time.monotonic() - t0

    # Step 7: save the adapter.
    model.save_pretrained(f"{output_dir}/adapter")
    tokenizer.save_pretrained(f"{output_dir}/adapter")
    train_rows = tokenized_dataset["train"]
    real_tokens = int(torch.as_tensor(train_rows["attention_mask"]).sum()) * epochs
    return {
        "contender": "seed",
        "quantization": "int8",
        "adapter": f"{output_dir}/adapter",
        "examples": len(train_rows),
        "real_tokens": int(real_tokens),
        "processed_tokens": len(train_rows) * MAX_LENGTH * epochs,  # padding included
        "train_seconds": round(train_seconds, 3),
        "setup_seconds": round(setup_seconds, 3),
        "optimizer_steps": trainer.state.global_step,
        "train_loss": output.training_loss,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--result")
    args = parser.parse_args(argv)
    write_result(args.result, train(args.model, args.train, args.out))


if __name__ == "__main__":
    main()
