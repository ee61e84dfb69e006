"""The one evaluator every contender's adapter goes through: mean loss over response tokens.

Each held-out row is rendered with the seed's template; the loss is token-weighted cross-entropy over
the tokens of `{response}` only (prompt and template masked, no EOS: the seed recipe never trains one),
truncated at 512 like training. The base is loaded with the quantization the adapter was trained on
(int8 or nf4, fp32 compute), then the adapter from its saved directory.

Usage: python bench/trainer/evaluate.py --model DIR --eval FILE --jobs JOBS.json --result FILE
where JOBS.json is a list of {"adapter": DIR or null, "quantization": "int8"|"nf4"|"none"}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

try:
    from bench.trainer.workload import MAX_LENGTH, TEMPLATE, read_jsonl
except ModuleNotFoundError:  # run as a script
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.trainer.workload import MAX_LENGTH, TEMPLATE, read_jsonl

IGNORE = -100


def encode(tokenizer: Any, row: dict[str, str]) -> tuple[list[int], list[int]]:
    prefix = TEMPLATE[: TEMPLATE.index("{response}")].replace("{prompt}", row["prompt"])
    prompt_ids = tokenizer(prefix)["input_ids"]
    response_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[:MAX_LENGTH]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:MAX_LENGTH]
    return ids, labels


def load_base(model_dir: str, quantization: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = {
        "none": None,
        "int8": BitsAndBytesConfig(load_in_8bit=True),
        "nf4": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    }[quantization]
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.float32)


def response_loss(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    model.eval()
    for module in model.modules():
        # bitsandbytes' CPU inference path for 4-bit layers (taken in eval mode without grad on AVX512-BF16
        # CPUs) repacks weights and asserts out_features % 32 == 0, which intermediate 688 is not; in
        # training mode a Linear4bit dequantizes as in training, and it has no dropout to switch off.
        if type(module).__name__ == "Linear4bit":
            module.training = True
    with torch.no_grad():
        for row in rows:
            ids, labels = encode(tokenizer, row)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            total += F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum").item()
            count += int((target != IGNORE).sum())
    return {"eval_loss": total / count, "eval_tokens": count}


def evaluate(model_dir: str, eval_file: str, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = read_jsonl(Path(eval_file))
    results = []
    for job in jobs:
        model = load_base(model_dir, job["quantization"])
        if job.get("adapter"):
            model = PeftModel.from_pretrained(model, job["adapter"])
        results.append({**job, **response_loss(model, tokenizer, rows)})
        del model
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--jobs", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    jobs = json.loads(Path(args.jobs).read_text())
    Path(args.result).write_text(json.dumps(evaluate(args.model, args.eval, jobs), indent=2))


if __name__ == "__main__":
    main()
