"""The training objectives (objective.type): what SFT and DPO each bring to a run, behind one interface.

A run's stages (`train`) are the same for both; an `Objective` supplies what differs: how rows become
tokens (`tokenize`) and the loop's inputs (`features`), the TrainingArguments class and its extra settings
(`arguments`), whether the model is loaded with its adapter (`adapter_in_model`), the loop itself
(`trainer`), and its part of metrics.json (`metrics`). `objective_for` picks one from the config.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer import data as data_mod
from kubetune_trainer import model as model_mod
from kubetune_trainer.config import TrainerConfig

log = logging.getLogger("kubetune_trainer.train")


@dataclass(frozen=True)
class LoopParts:
    """What an objective's trainer is made of; `fetch_model(source, name)` makes a model source a local
    directory (for DPO's reference model)."""

    args: Any
    model: Any
    tokenizer: Any
    train_features: Any
    eval_features: Any
    run_callbacks: list[Any]  # callbacks.RunCallbacks.in_order()
    trackers: list[Any]  # tracking.Trackers.callbacks: last, they log what the others add
    precision: str
    telemetry: Any
    dist: Any
    fetch_model: Callable[[str, str], Path]


class Objective(ABC):
    """The interface; `Sft` and `Dpo` are the two objectives."""

    unit = "examples"  # what a row becomes, for the log
    adapter_in_model = True  # False: the trainer adds the adapter itself
    language_model_loss = True  # the eval loss is a language-model loss (a perplexity, a base-model loss)

    def __init__(self, cfg: TrainerConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def tokenize(self, rows: list[data_mod.Row], tokenizer: Any, name: str) -> Any:
        """The rows as tokens; bad rows fail with file:line."""

    @abstractmethod
    def features(self, data: Any) -> Any:
        """The tokens as the loop's dataset."""

    def layout(self) -> str:
        """How the features hold the data, for the log line ('' when there is nothing to say)."""
        return ""

    def arguments(self) -> tuple[type, dict[str, Any]]:
        """The TrainingArguments class and the settings it adds to the shared ones."""
        from transformers import TrainingArguments

        return TrainingArguments, {}

    @abstractmethod
    def trainer(self, parts: LoopParts) -> Any:
        """The loop, with the run's callbacks."""

    def metrics(self, log_history: list[dict[str, Any]]) -> dict[str, Any]:
        """This objective's part of metrics.json."""
        return {}


class Sft(Objective):
    """Supervised fine-tuning: rows tokenized and masked by `data`, packed into rows; transformers' Trainer."""

    def tokenize(self, rows: list[data_mod.Row], tokenizer: Any, name: str) -> data_mod.TokenizedData:
        return data_mod.tokenize(rows, self.cfg.dataset, tokenizer, name=name)

    def features(self, data: data_mod.TokenizedData) -> Any:
        return data_mod.as_features(data.examples, self.cfg.packed_row_tokens(), self.cfg.dataset.packing)

    def layout(self) -> str:
        return f" (packed, <= {self.cfg.packed_row_tokens()} tokens each)" if self.cfg.dataset.packing else ""

    def trainer(self, parts: LoopParts) -> Any:
        return sft_trainer_class()(
            model=parts.model,
            args=parts.args,
            train_dataset=parts.train_features,
            eval_dataset=parts.eval_features,
            data_collator=data_mod.Collator(parts.tokenizer.pad_token_id),
            processing_class=parts.tokenizer,
            callbacks=[*parts.run_callbacks, *parts.trackers],
        )


class Dpo(Objective):
    """Preference optimization: pairs tokenized by `preference`, TRL's DPOTrainer, the reward metrics."""

    unit = "pairs"
    language_model_loss = False  # the DPO loss is no language-model loss; its base is the reference policy

    def __init__(self, cfg: TrainerConfig) -> None:
        super().__init__(cfg)
        dpo = cfg.objective.effective_dpo()
        assert dpo is not None
        self.spec = dpo
        # With LoRA, TRL adds the adapter itself, so that the reference pass is the base with it disabled.
        self.adapter_in_model = cfg.method.type == "full"

    def tokenize(self, rows: list[data_mod.Row], tokenizer: Any, name: str) -> Any:
        from kubetune_trainer import preference

        return preference.tokenize(rows, self.cfg, tokenizer, name=name)

    def features(self, data: Any) -> Any:
        from kubetune_trainer import preference

        return preference.features(data)

    def arguments(self) -> tuple[type, dict[str, Any]]:
        from kubetune_trainer.preference import dpo_arguments

        return dpo_arguments(self.cfg)

    def trainer(self, parts: LoopParts) -> Any:
        """TRL's DPOTrainer with the run's callbacks, its reference policy as configured."""
        from kubetune_trainer import preference

        cfg, dpo = self.cfg, self.spec
        reference = None
        if dpo.reference_model is not None:
            reference_dir = parts.fetch_model(dpo.reference_model.source, "reference-model")
            reference = preference.load_reference_model(reference_dir, cfg, parts.precision, parts.dist.local_rank)
        elif cfg.method.type == "full":
            _, total = model_mod.trainable_parameters(parts.model)
            log.warning(
                "objective dpo with method full: the reference is a frozen copy of the base, %.2f GB more memory "
                "(set objective.dpo.referenceModel, or use lora/qlora, whose reference is the base with the "
                "adapter disabled)",
                total * next(parts.model.parameters()).element_size() / 1e9,
            )
        log.info(
            "objective dpo: loss %s, beta %g, reference %s",
            dpo.loss,
            dpo.beta,
            dpo.reference_model.source if dpo.reference_model else "the base model",
        )
        return preference.preference_trainer_class()(
            model=parts.model,
            ref_model=reference,
            args=parts.args,
            train_dataset=parts.train_features,
            eval_dataset=parts.eval_features,
            processing_class=parts.tokenizer,
            peft_config=model_mod.lora_config(cfg.method, parts.model),  # TRL adds the adapter: None for full
            callbacks=[*parts.run_callbacks, preference.RewardReport(parts.telemetry, parts.dist), *parts.trackers],
        )

    def metrics(self, log_history: list[dict[str, Any]]) -> dict[str, Any]:
        from kubetune_trainer.preference import preference_metrics

        return preference_metrics(log_history, self.cfg)


def objective_for(cfg: TrainerConfig) -> Objective:
    """objective.type's Objective."""
    return Dpo(cfg) if cfg.objective.effective_dpo() is not None else Sft(cfg)


# -- SFT's loop: transformers' Trainer with a warm-up that starts above 0 --------------------------


def warm_start(scheduler: Any, warmup_steps: int) -> Any:
    """Shift the warm-up by one step: step s < warmup_steps runs at (s + 1) / warmup_steps of the peak, so the
    first optimizer step learns (transformers' warm-up starts at 0: with 3% warm-up a 30-step run's first
    step, and a very short run's only warm-up step, would change nothing). After warm-up the schedule is
    unchanged, so its end is too."""
    scheduler.lr_lambdas = [
        (lambda step, f=f: f(step + 1) if step < warmup_steps else f(step)) for f in scheduler.lr_lambdas
    ]
    # LambdaLR set the first learning rate from the unshifted lambdas when it was made; set it again.
    for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * f(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return scheduler


def sft_trainer_class() -> Any:
    from transformers import Trainer

    class WarmStartTrainer(Trainer):  # type: ignore[misc]
        """transformers' Trainer whose warm-up starts above 0 (`warm_start`)."""

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            fresh = self.lr_scheduler is None
            scheduler = super().create_scheduler(num_training_steps, optimizer)
            warmup = self.args.get_warmup_steps(num_training_steps)
            if fresh and warmup > 0 and hasattr(scheduler, "lr_lambdas"):
                warm_start(scheduler, warmup)
            return scheduler

    return WarmStartTrainer
