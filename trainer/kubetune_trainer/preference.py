"""Preference optimization (objective dpo): preference rows, their tokens, and TRL's DPOTrainer in the run.

The run's lifecycle is `train`'s (setup -> train -> save, checkpoints, SIGTERM, resume, artifacts); this module
supplies what differs for DPO: the `preference` dataset format, the pairs' tokens, the DPOConfig settings,
the trainer, and the reward metrics. The loss is TRL's (`DPOTrainer`), not ours.

Rows are checked and tokenized here rather than by TRL, so that a bad row fails with its file and line (exit 2)
and truncation is counted, as for SFT. Two forms are read:

- text: `prompt`, `chosen`, `rejected` strings; the answers get the EOS token;
- chat: `chosen` and `rejected` lists of {role, content} messages, with `prompt` a list of messages too, or
  absent when both conversations carry it (the messages they share from the start are the prompt).

The reference policy is the base model with the adapter disabled (the model reaches TRL unwrapped, with the
LoRA config, so TRL wraps it and disables the adapter for the reference pass: no second copy in memory), or
`objective.dpo.referenceModel` when given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune_trainer.config import DpoSpec, TrainerConfig
from kubetune_trainer.data import Row, bad_row
from kubetune_trainer.errors import InvalidInput
from kubetune_trainer.server import Telemetry

log = logging.getLogger("kubetune_trainer.train")

# DPOTrainer's log keys (train; evaluation prefixes them with eval_) and our names for them.
REWARD_KEYS = {
    "rewards/accuracies": "reward_accuracy",
    "rewards/margins": "reward_margin",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
}


@dataclass
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class PreferenceData:
    """Tokenized pairs; the counters mean what data.TokenizedData's do, per pair."""

    examples: list[Pair]
    conversational: bool
    truncated: int = 0  # pairs whose prompt or an answer was cut
    dropped: int = 0  # pairs whose answers became identical once cut: nothing to prefer
    tokens: int = 0  # tokens through the model per epoch (the prompt counts twice: once per answer)


# -- rows ------------------------------------------------------------------------------------------


def _bad(row: Row, what: str, message: str) -> InvalidInput:
    return bad_row(row, message, field=f"dataset.fields.{what}")


def _value(row: Row, name: str, what: str) -> Any:
    value = row.record.get(name)
    if value is None:
        present = ", ".join(sorted(row.record)) or "none"
        raise _bad(
            row,
            what,
            f"missing field {name!r} ({what}; fields present: {present}); set dataset.fields to map your column names",
        )
    return value


def _messages(row: Row, name: str, what: str, value: Any) -> list[dict[str, str]]:
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise _bad(row, what, f"field {name!r}: message {i} must be an object with string role and content")
    return list(value)


def _answer(row: Row, name: str, what: str) -> str | list[dict[str, str]]:
    value = _value(row, name, what)
    if isinstance(value, str):
        if not value.strip():
            raise _bad(row, what, f"field {name!r} is empty")
        return value
    if isinstance(value, list) and not isinstance(value, str):
        if not value:
            raise _bad(row, what, f"field {name!r} is an empty message list")
        return _messages(row, name, what, value)
    raise _bad(row, what, f"field {name!r} must be a string or a list of messages, got {type(value).__name__}")


@dataclass(frozen=True)
class PreferenceRow:
    """One checked row: text (strings) or chat (message lists), prompt split off."""

    prompt: str | list[dict[str, str]]
    chosen: str | list[dict[str, str]]
    rejected: str | list[dict[str, str]]

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


def check_row(row: Row, cfg: TrainerConfig) -> PreferenceRow:
    """The row's prompt, chosen and rejected answers; InvalidInput (file:line, field) when they are unusable."""
    fields = cfg.dataset.fields
    chosen = _answer(row, fields.chosen, "chosen")
    rejected = _answer(row, fields.rejected, "rejected")
    if type(chosen) is not type(rejected):
        raise _bad(
            row,
            "rejected",
            f"fields {fields.chosen!r} and {fields.rejected!r} must both be strings or both message lists",
        )
    if chosen == rejected:
        raise _bad(row, "rejected", f"fields {fields.chosen!r} and {fields.rejected!r} are identical: no preference")
    prompt: Any = row.record.get(fields.prompt)
    if isinstance(chosen, str):
        prompt = _value(row, fields.prompt, "prompt")
        if not isinstance(prompt, str):
            raise _bad(row, "prompt", f"field {fields.prompt!r} must be a string, got {type(prompt).__name__}")
        return PreferenceRow(prompt, chosen, rejected)
    assert isinstance(rejected, list)
    if prompt is None:  # implicit prompt: the messages both conversations start with
        shared = _common_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise _bad(
                row,
                "prompt",
                f"no field {fields.prompt!r}, and {fields.chosen!r} and {fields.rejected!r} share no first message "
                "to use as the prompt",
            )
        if not chosen or not rejected:
            raise _bad(row, "chosen" if not chosen else "rejected", "one answer is only the shared prompt")
    elif not isinstance(prompt, list) or not prompt:
        raise _bad(row, "prompt", f"field {fields.prompt!r} must be a non-empty list of messages in the chat form")
    else:
        prompt = _messages(row, fields.prompt, "prompt", prompt)
    return PreferenceRow(prompt, chosen, rejected)


# -- tokens ----------------------------------------------------------------------------------------


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
    )
    return list(out["input_ids"])


def _common_prefix(a: list[Any], b: list[Any]) -> int:
    """How many items `a` and `b` share from the start."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(row: Row, checked: PreferenceRow, tokenizer: Any) -> Pair:
    """Prompt tokens and each answer's tokens (what the loss scores), as TRL's own preparation splits them."""
    eos = tokenizer.eos_token_id
    if not checked.conversational:
        assert isinstance(checked.prompt, str) and isinstance(checked.chosen, str)
        assert isinstance(checked.rejected, str)
        prompt_ids = tokenizer(checked.prompt, add_special_tokens=True)["input_ids"]
        if prompt_ids and prompt_ids[-1] == eos:  # tokenizers that append EOS themselves
            prompt_ids = prompt_ids[:-1]
        chosen = [*tokenizer(checked.chosen, add_special_tokens=False)["input_ids"], eos]
        rejected = [*tokenizer(checked.rejected, add_special_tokens=False)["input_ids"], eos]
        return Pair(list(prompt_ids), chosen, rejected)
    assert isinstance(checked.prompt, list) and isinstance(checked.chosen, list)
    assert isinstance(checked.rejected, list)
    try:
        prompt_ids = _chat_ids(tokenizer, checked.prompt, generation_prompt=True)
        with_chosen = _chat_ids(tokenizer, checked.prompt + checked.chosen)
        with_rejected = _chat_ids(tokenizer, checked.prompt + checked.rejected)
    except Exception as exc:  # the template raised (unknown role, ...)
        raise bad_row(row, f"chat template failed: {exc}") from exc
    # Templates may render the prompt differently once an answer follows; the shared tokens are the prompt.
    n = min(len(prompt_ids), _common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
    return Pair(prompt_ids[:n], with_chosen[n:], with_rejected[n:])


def _one_form(checked: list[tuple[Row, PreferenceRow]], tokenizer: Any) -> bool:
    """Whether the rows are conversational (message lists); InvalidInput when they mix the two forms, or when
    message lists meet a tokenizer without a chat template."""
    forms = {c.conversational for _, c in checked}
    if len(forms) > 1:
        row = next(r for r, c in checked if c.conversational != checked[0][1].conversational)
        raise _bad(row, "chosen", "rows mix strings and message lists; use one form in a dataset")
    conversational = forms.pop()
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise InvalidInput(
            "InvalidDataset",
            "the preference rows are message lists, which need a tokenizer with a chat template, and this "
            "model's has none; give prompt, chosen and rejected as strings",
            field="dataset.fields.chosen",
        )
    return conversational


def tokenize(rows: list[Row], cfg: TrainerConfig, tokenizer: Any, *, name: str = "train") -> PreferenceData:
    """Check and encode every row; keep the end of long prompts and the start of long answers; count both."""
    if not rows:
        raise InvalidInput("EmptyDataset", f"the {name} dataset has no rows", field=f"dataset.{name}")
    dpo = cfg.objective.effective_dpo() or DpoSpec()
    max_length = cfg.dataset.max_length
    max_prompt = dpo.effective_max_prompt_length(max_length)
    checked = [(row, check_row(row, cfg)) for row in rows]
    out = PreferenceData([], _one_form(checked, tokenizer))
    for row, pair_row in checked:
        pair = encode_pair(row, pair_row, tokenizer)
        prompt = pair.prompt_ids[-max_prompt:]
        room = max_length - len(prompt)
        chosen, rejected = pair.chosen_ids[:room], pair.rejected_ids[:room]
        if len(prompt) < len(pair.prompt_ids) or max(len(pair.chosen_ids), len(pair.rejected_ids)) > room:
            out.truncated += 1
        if chosen == rejected:
            out.dropped += 1
            continue
        out.examples.append(Pair(list(prompt), chosen, rejected))
        out.tokens += 2 * len(prompt) + len(chosen) + len(rejected)
    if out.truncated:
        log.warning(
            "%s data: %d of %d pairs truncated (prompts to maxPromptLength %d, sequences to maxLength %d); "
            "%d left with identical answers, dropped",
            name,
            out.truncated,
            len(rows),
            max_prompt,
            max_length,
            out.dropped,
        )
    if not out.examples:
        raise InvalidInput(
            "InvalidDataset",
            f"every {name} pair was cut until its answers were identical: raise dataset.maxLength or lower "
            "objective.dpo.maxPromptLength",
            field="dataset.maxLength",
        )
    return out


def features(data: PreferenceData) -> Any:
    """The pairs as the `datasets.Dataset` DPOTrainer's collator reads (prompt_ids, chosen_ids, rejected_ids)."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
            for p in data.examples
        ]
    )


# -- the trainer -----------------------------------------------------------------------------------


def dpo_arguments(cfg: TrainerConfig) -> tuple[type, dict[str, Any]]:
    """DPOConfig and its DPO settings, for `train.training_arguments` to add to the shared ones."""
    from trl import DPOConfig

    dpo = cfg.objective.effective_dpo()
    assert dpo is not None
    losses = [dpo.loss, "sft"] if dpo.sft_weight > 0 else [dpo.loss]
    return DPOConfig, {
        "beta": dpo.beta,
        "loss_type": losses,
        "loss_weights": [1.0, dpo.sft_weight] if dpo.sft_weight > 0 else None,
        "label_smoothing": dpo.effective_label_smoothing(),
        "max_length": cfg.dataset.max_length,  # the pairs are cut already; the collator's cut is a no-op
        "precompute_ref_log_probs": False,
    }


def load_reference_model(model_dir: Path, cfg: TrainerConfig, compute: str, device_index: int | None) -> Any:
    """objective.dpo.referenceModel, frozen, loaded as the base is (quantized for qlora), without an adapter."""
    from kubetune_trainer import model as model_mod

    dpo = cfg.objective.effective_dpo()
    assert dpo is not None and dpo.reference_model is not None
    as_base = cfg.model_copy(update={"model": dpo.reference_model})
    try:
        reference = model_mod.load_model(model_dir, as_base, compute, device_index=device_index, with_adapter=False)
    except InvalidInput as exc:
        if exc.error.field == "model.source":  # the failure is the reference model's, not model.source's
            exc.error.field = "objective.dpo.referenceModel.source"
        raise
    reference.eval()
    reference.requires_grad_(False)
    return reference


class _PreferenceTrainer:  # the DPOTrainer subclass is made on first use: importing trl costs seconds
    cls: type | None = None


def preference_trainer_class() -> type:
    """DPOTrainer that takes the pairs as tokenized here (TRL's own preparation would tokenize them again)."""
    if _PreferenceTrainer.cls is None:
        from trl import DPOTrainer

        class PreferenceTrainer(DPOTrainer):  # type: ignore[misc]
            def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
                return dataset

        _PreferenceTrainer.cls = PreferenceTrainer
    return _PreferenceTrainer.cls


class RewardReport(TrainerCallback):  # type: ignore[misc]
    """The reward metrics of each logging interval and evaluation: /progress, Prometheus, one log line."""

    def __init__(self, telemetry: Telemetry, dist: Any) -> None:
        self.telemetry = telemetry
        self.dist = dist

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        logs = logs or {}
        if "rewards/accuracies" in logs:
            values = {ours: float(logs[key]) for key, ours in REWARD_KEYS.items() if key in logs}
            self.telemetry.update(**values)
            where = "train"
        elif "eval_rewards/accuracies" in logs:
            self.telemetry.update(
                eval_reward_accuracy=float(logs["eval_rewards/accuracies"]),
                eval_reward_margin=float(logs.get("eval_rewards/margins", 0.0)),
            )
            self.telemetry.evaluated(
                state.global_step,
                reward_accuracy=float(logs["eval_rewards/accuracies"]),
                reward_margin=float(logs.get("eval_rewards/margins", 0.0)),
            )
            values = {ours: float(logs["eval_" + key]) for key, ours in REWARD_KEYS.items() if "eval_" + key in logs}
            where = "eval"
        else:
            return
        if self.dist.is_main:
            log.info(
                "%s step %d rewards: accuracy %.3f margin %.4f chosen %.4f rejected %.4f",
                where,
                state.global_step,
                values.get("reward_accuracy", 0.0),
                values.get("reward_margin", 0.0),
                values.get("reward_chosen", 0.0),
                values.get("reward_rejected", 0.0),
            )


def reward_history(log_history: list[dict[str, Any]], prefix: str = "") -> list[dict[str, Any]]:
    """The reward metrics at each logged step (prefix eval_ for the evaluations)."""
    out = []
    for entry in log_history:
        if prefix + "rewards/accuracies" in entry:
            point = {"step": entry["step"]}
            point.update({ours: entry.get(prefix + key) for key, ours in REWARD_KEYS.items()})
            out.append(point)
    return out


def preference_metrics(log_history: list[dict[str, Any]], cfg: TrainerConfig) -> dict[str, Any]:
    """metrics.json's DPO part: settings, reward trajectories, and the final accuracy and margin."""
    dpo = cfg.objective.effective_dpo()
    assert dpo is not None
    train, evals = reward_history(log_history), reward_history(log_history, "eval_")
    final = evals[-1] if evals else (train[-1] if train else {})
    if dpo.reference_model is not None:
        reference = dpo.reference_model.source
    else:
        reference = "frozen copy of the base model" if cfg.method.type == "full" else "base model, adapter disabled"
    return {
        "dpo": {
            "beta": dpo.beta,
            "loss": dpo.loss,
            "label_smoothing": dpo.effective_label_smoothing(),
            "max_prompt_length": dpo.effective_max_prompt_length(cfg.dataset.max_length),
            "sft_weight": dpo.sft_weight,
            "reference_model": reference,
        },
        "reward_accuracy": final.get("reward_accuracy"),
        "reward_margin": final.get("reward_margin"),
        "reward_history": train,
        "eval_reward_history": evals,
    }
