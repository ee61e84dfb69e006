"""What a finished run leaves under its destination, and the marker that says it finished.

adapter/        adapter_config.json + adapter_model.safetensors + tokenizer files (lora, qlora)
model/          full weights + tokenizer files (full fine-tuning)
merged/         adapter merged into a 16-bit (fp32 on CPU) copy of the base, when output.mergeAdapter
metrics.json    loss history, final losses, perplexity, tokens, times, throughput, peak memory
samples.jsonl   generations for evaluation.prompts with the trained model (and the base model's, for an adapter)
README.md       model card
COMPLETE        written last; holds the result and artifact URIs. Its presence means "done".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.contract import COMPLETE_MARKER, Artifacts, Result
from kubetune_trainer.storage import Storage, join

log = logging.getLogger(__name__)


def finished_run(storage: Storage, destination: str) -> tuple[Result, Artifacts] | None:
    """The result recorded by a run that already completed at this destination, or None."""
    marker = join(destination, COMPLETE_MARKER)
    if not storage.exists(marker):
        return None
    doc = json.loads(storage.read_bytes(marker) or b"{}")
    return Result.model_validate(doc.get("result") or {}), Artifacts.model_validate(doc.get("artifacts") or {})


def save_weights(model: Any, tokenizer: Any, directory: Path, *, full: bool) -> None:
    """Adapter only (no embedding/head copies, so vLLM loads it) or the full model; tokenizer alongside."""
    directory.mkdir(parents=True, exist_ok=True)
    if full:
        model.save_pretrained(directory, safe_serialization=True)
    else:
        model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    tokenizer.save_pretrained(directory)


def prompt_text(cfg: TrainerConfig, tokenizer: Any, prompt: str, *, chat: bool = False) -> str:
    """The prompt as the model saw prompts in training; `chat`: preference rows were message lists."""
    from kubetune_trainer.data import instruction_prompt

    if cfg.dataset.format == "instruction":
        return instruction_prompt(cfg.dataset, prompt)
    if cfg.dataset.format == "chat" or chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def generate_samples(model: Any, tokenizer: Any, cfg: TrainerConfig, *, chat: bool = False) -> list[dict[str, str]]:
    """Greedy generations for evaluation.prompts (the seed guide's step 6, with the trained weights); with an
    adapter, the base model's answer too (`base_completion`, the adapter disabled): what fine-tuning changed."""
    import torch

    samples = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    disable_adapter = getattr(model, "disable_adapter", None)  # PEFT models: the base is the adapter switched off
    for prompt in cfg.evaluation.prompts:
        text = prompt_text(cfg, tokenizer, prompt, chat=chat)
        templated = cfg.dataset.format == "chat" or chat
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not templated).to(device)

        def complete(inputs: Any = inputs) -> str:
            with torch.no_grad():
                output = model.generate(
                    **inputs,
                    max_new_tokens=cfg.evaluation.max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            return str(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))

        sample = {"prompt": prompt, "completion": complete()}
        if disable_adapter is not None:
            with disable_adapter():
                sample["base_completion"] = complete()
        samples.append(sample)
    if was_training:
        model.train()
    return samples


def base_eval_loss(trainer: Any) -> float | None:
    """The eval loss of the base model (the adapter disabled) on the same eval data and loss as the run's own
    evaluations: the number fine-tuning is measured against. None for a model without an adapter. It goes
    through the evaluation loop without `evaluate`, so no callback takes it for the run's eval loss."""
    disable_adapter = getattr(trainer.model, "disable_adapter", None)
    if disable_adapter is None:
        return None
    with disable_adapter():
        output = trainer.evaluation_loop(
            trainer.get_eval_dataloader(), description="base model", prediction_loss_only=True, metric_key_prefix="base"
        )
    loss = output.metrics.get("base_loss")
    return float(loss) if loss is not None else None


def merge_adapter(model_dir: Path, adapter_dir: Path, out_dir: Path, cfg: TrainerConfig, dtype: Any) -> None:
    """Reload the base unquantized (merging into 4-bit weights would round the update away) and merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _objective_lines(cfg: TrainerConfig, metrics: dict[str, Any]) -> list[str]:
    dpo = metrics.get("dpo")
    if cfg.objective.type != "dpo" or not dpo:
        return ["- objective: sft (next-token loss on the responses)"]
    lines = [
        f"- objective: dpo (Direct Preference Optimization, TRL DPOTrainer), loss {dpo['loss']}, beta {dpo['beta']}",
        f"- reference policy: {dpo['reference_model']}",
        f"- maxPromptLength {dpo['max_prompt_length']}, SFT term weight {dpo['sft_weight']}"
        + (f", label smoothing {dpo['label_smoothing']}" if dpo["label_smoothing"] else ""),
    ]
    if metrics.get("reward_accuracy") is not None:
        lines.append(
            f"- final reward accuracy {_number(metrics['reward_accuracy'])}, "
            f"margin {_number(metrics.get('reward_margin'))}"
        )
    return lines


def model_card(cfg: TrainerConfig, metrics: dict[str, Any]) -> str:
    """README.md of the artifacts: the base model, method, objective, data, hyperparameters and results."""
    method = cfg.method
    quant = method.effective_quantization()
    lora = method.effective_lora()
    t = cfg.training
    lines = [
        "---",
        "library_name: peft" if lora else "library_name: transformers",
        f"base_model: {cfg.model.source}",
        "tags: [kubetune, " + method.type + ("" if cfg.objective.type == "sft" else ", " + cfg.objective.type) + "]",
        "---",
        "",
        f"# Fine-tuned {cfg.model.source}",
        "",
        "Trained by the kubetune trainer.",
        "",
        "## Method",
        "",
        f"- method: {method.type}",
    ]
    if quant:
        q = f"{quant.bits}-bit" + (f" {quant.type}, double quant {quant.double_quant}" if quant.bits == 4 else "")
        lines.append(f"- quantization: {q}")
    if lora:
        lines.append(f"- LoRA: r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, targets {lora.target_modules}")
    lines += _objective_lines(cfg, metrics)
    lines += [
        "",
        "## Data",
        "",
        f"- train: {cfg.dataset.train}",
        f"- eval: {cfg.dataset.eval or f'{cfg.dataset.eval_split:.0%} held out of train'}",
        f"- format: {cfg.dataset.format}, maxLength {cfg.dataset.max_length}, packing {cfg.dataset.packing}",
        f"- examples: {metrics.get('train_examples')} train, {metrics.get('eval_examples')} eval; "
        f"{metrics.get('truncated_examples')} truncated",
        "",
        "## Hyperparameters",
        "",
        f"- steps: {metrics.get('steps')} (epochs {t.epochs}, maxSteps {t.max_steps})",
        f"- learning rate {t.learning_rate} ({t.lr_scheduler}, warmup {t.warmup_ratio})",
        f"- batch size {t.batch_size} x accumulation {t.gradient_accumulation_steps} x "
        f"{metrics.get('world_size', 1)} processes = {metrics.get('global_batch_size')} sequences per step",
        f"- precision {metrics.get('precision')}, max grad norm {t.max_grad_norm}, seed {t.seed}",
        *_result_lines(metrics),
    ]
    return "\n".join(lines)


def _result_lines(metrics: dict[str, Any]) -> list[str]:
    base = metrics.get("base_eval_loss")
    return [
        "",
        "## Results",
        "",
        f"- final train loss: {_number(metrics.get('train_loss'))}",
        f"- eval loss: {_number(metrics.get('eval_loss'))}"
        + (f" (base model: {_number(base)})" if base is not None else ""),
        f"- perplexity: {_number(metrics.get('perplexity'))}",
        f"- trained tokens: {metrics.get('trained_tokens')}",
        f"- train time: {metrics.get('train_seconds')} s",
        "",
    ]
