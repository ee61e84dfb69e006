"""The trainer's fast paths give the results of the plain ones: segment attention over packed rows, the
flattening collator, shared LoRA dropout, the fused LoRA update, and a warm-up whose first step learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubetune_trainer import runtime
from kubetune_trainer.data import IGNORE_INDEX, Collator, Example, pack


@pytest.fixture(scope="module")
def tokenizer():
    from kubetune_cli.tiny import build_tokenizer

    return build_tokenizer()


def _model(tokenizer, attn: str):
    from kubetune_cli.tiny import build_model

    model = build_model(tokenizer, initializer_range=0.2)
    model.set_attn_implementation(attn)
    return model


def test_collator_flattens_packed_rows_into_one_row_with_boundaries() -> None:
    rows = pack([Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [IGNORE_INDEX, 5]), Example([6], [6])], 3)
    batch = Collator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (1, 6)  # no padding at all
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6] and batch["max_length_q"] == 3
    # no example's first token is a label: in the row, the previous example's last token would predict it
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]
    assert "attention_mask" not in batch


def test_segment_attention_is_selected_and_a_packed_example_scores_as_alone(tokenizer, monkeypatch) -> None:
    """A packed example's loss (and gradient) equals the example's alone, through the per-example path."""
    from kubetune_trainer import attention

    name = attention.register()
    segmented = _model(tokenizer, name)
    assert segmented.config._attn_implementation == name
    a = Example(list(range(5, 17)), [IGNORE_INDEX] * 4 + list(range(9, 17)))
    b = Example(list(range(20, 27)), [IGNORE_INDEX] * 2 + list(range(22, 27)))
    c = Example(list(range(30, 39)), [IGNORE_INDEX] * 9)  # no labels: contributes nothing
    batch = Collator(tokenizer.pad_token_id)(pack([a, b, c], 64))
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    packed = segmented(**batch)
    # one sdpa call per example per layer, each the example's length: no score outside an example
    assert sorted(calls) == sorted([12, 9, 7] * segmented.config.num_hidden_layers)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", real)
    packed.loss.backward()
    packed_grad = segmented.model.layers[0].self_attn.q_proj.weight.grad.clone()

    alone = _model(tokenizer, "sdpa")
    total, weight = 0.0, 0
    for ex in (a, b):
        out = alone(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]))
        n = sum(label != IGNORE_INDEX for label in ex.labels[1:])
        (out.loss * n).backward()
        total += out.loss.item() * n
        weight += n
    torch.testing.assert_close(packed.loss.item(), total / weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_grad, alone.model.layers[0].self_attn.q_proj.weight.grad / weight)


def test_segment_attention_matches_the_masked_row_and_leaves_padded_batches_to_sdpa(tokenizer) -> None:
    from kubetune_trainer import attention

    segmented, masked = _model(tokenizer, attention.register()), _model(tokenizer, "sdpa")
    rows = pack([Example(list(range(5, 5 + n)), list(range(5, 5 + n))) for n in (30, 17, 9, 4)], 64)
    flat = _all_logits(Collator(tokenizer.pad_token_id)(rows))
    with torch.no_grad():
        # position_ids alone and no cache: transformers builds the block-diagonal mask for sdpa
        reference = masked(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False).logits
        torch.testing.assert_close(segmented(**flat).logits, reference, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(  # without cu_seq_lens the boundaries come from position_ids
            segmented(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits, reference
        )
        padded = Collator(tokenizer.pad_token_id)([{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]},
                                                   {"input_ids": [9, 10], "labels": [9, 10]}])  # fmt: skip
        padded = _all_logits(padded)
        torch.testing.assert_close(segmented(**padded).logits, masked(**padded).logits)


def _all_logits(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("logits_to_keep", "shift_labels")}


def _lora_model(tmp_path: Path, dropout: float, method: str = "lora", compute: str = "fp32"):
    """The tiny model with adapters on all linear layers, as `load_model` prepares it for training."""
    from kubetune_cli.tiny import write_tiny_model
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.model import load_model

    model_dir = write_tiny_model(tmp_path / "model")
    cfg = TrainerConfig.model_validate(
        {
            "model": {"source": str(model_dir)},
            "dataset": {"train": "/d.jsonl"},
            "method": {"type": method, "lora": {"dropout": dropout, "targetModules": ["all-linear"]}},
            "output": {"destination": str(tmp_path / "out")},
        }
    )
    return load_model(model_dir, cfg, compute)


def test_speedups_off_leaves_peft_s_own_dropout_and_forward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KUBETUNE_SPEEDUPS_OFF turns the named speed-ups off: the model is peft's, unpatched."""
    from peft.tuners.lora import LoraLayer

    from kubetune_trainer import speedups

    monkeypatch.setenv(runtime.SPEEDUPS_OFF_ENV, "shared-dropout,fused-lora")
    model = _lora_model(tmp_path, 0.5)
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    assert layers
    assert all(type(module.lora_dropout["default"]) is torch.nn.Dropout for module in layers)
    assert all("forward" not in vars(module) for module in layers)  # the class's forward, not the fused one
    assert runtime.enabled("dropout-mask") and not runtime.enabled("fused-lora")

    monkeypatch.setenv(runtime.SPEEDUPS_OFF_ENV, "all")
    assert not any(runtime.enabled(name) for name in runtime.SPEEDUPS)
    assert speedups.return_freed_memory() is False

    monkeypatch.setenv(runtime.SPEEDUPS_OFF_ENV, "fused-lora,fast")
    with pytest.raises(ValueError, match=r"KUBETUNE_SPEEDUPS_OFF='fused-lora,fast': unknown fast; use 'all' or"):
        runtime.enabled("fused-lora")


def test_speedups_are_on_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lora import LoraLayer

    monkeypatch.delenv(runtime.SPEEDUPS_OFF_ENV, raising=False)
    model = _lora_model(tmp_path, 0.5)
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    assert layers and all("forward" in vars(module) for module in layers)  # the fused forward


def _give_updates_weight(model) -> None:
    """LoRA's B starts at zero, so the update carries nothing; seeded random B's make it count."""
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)


def test_lora_dropout_draws_one_mask_per_shared_input(tmp_path: Path) -> None:
    from kubetune_trainer.speedups import SharedInputDropout

    model = _lora_model(tmp_path, 0.5)
    layer = model.get_base_model().model.layers[0]
    seen: dict[str, torch.Tensor] = {}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"):
        owner = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
        module = getattr(owner, name)
        assert isinstance(module.lora_dropout["default"], SharedInputDropout)
        module.lora_A["default"].register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0]))
    ids = torch.randint(5, 200, (1, 24))
    model.train()
    model(input_ids=ids)
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"]  # one dropped copy of the shared input
    assert seen["gate_proj"] is seen["up_proj"]
    assert seen["o_proj"] is not seen["q_proj"]
    zeros = (seen["q_proj"] == 0).float().mean().item()
    assert 0.4 < zeros < 0.6  # dropped at p = 0.5
    model.eval()
    model(input_ids=ids)
    assert (seen["q_proj"] != 0).all()  # no dropout in eval


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fused_lora_update_gives_peft_results(tmp_path: Path, method: str) -> None:
    """One addmm per LoRA layer gives peft's loss and adapter gradients: exactly in fp32, to bf16 rounding
    under autocast (4-bit base); disabled adapters still give the base model."""
    compute = "fp32" if method == "lora" else "bf16"
    model = _lora_model(tmp_path, 0.0, method, compute)
    model.train()
    fused = [m for m in model.modules() if "forward" in vars(m) and hasattr(m, "lora_A")]
    assert len(fused) == 7 * model.config.num_hidden_layers  # every adapted projection
    _give_updates_weight(model)
    ids = torch.randint(5, 200, (1, 40))

    def loss_and_grads() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    loss, grads = loss_and_grads()
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids, labels=ids).loss.item()
    for module in fused:
        del module.forward  # back to peft's own
    peft_loss, peft_grads = loss_and_grads()
    with torch.no_grad(), model.disable_adapter():
        peft_base = model(input_ids=ids, labels=ids).loss.item()
    assert base == peft_base and abs(loss - base) > 1e-3  # the update changes the loss; disabled, it is gone
    tolerance = {"rtol": 0, "atol": 0} if compute == "fp32" else {"rtol": 2e-3, "atol": 0}
    torch.testing.assert_close(loss, peft_loss, **tolerance)
    for mine, theirs in zip(grads, peft_grads, strict=True):
        scale = theirs.abs().max().item()
        assert (mine - theirs).abs().max().item() <= (0 if compute == "fp32" else 0.05 * scale)


def test_qlora_gradients_are_the_same_after_an_evaluation(tmp_path: Path) -> None:
    """An eval-mode pass (the Trainer's evaluation) must not change what training computes: bitsandbytes
    repacks 4-bit weights for CPU inference on AVX512-BF16/AMX CPUs into a layout without a backward."""
    model = _lora_model(tmp_path, 0.0, "qlora", "bf16")
    _give_updates_weight(model)
    ids = torch.randint(5, 200, (1, 40))

    def first_layer_grad() -> torch.Tensor:
        model.train()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        return model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad.clone()

    before = first_layer_grad()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    after = first_layer_grad()
    assert before.abs().sum() > 0
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_after_training_inference_may_use_the_packed_4bit_kernel_with_the_same_logits(tmp_path: Path) -> None:
    """Once training is over the trainer lets bitsandbytes repack 4-bit weights for CPU inference again (where
    the CPU has the kernel): what was turned off is turned back on, and the logits are the same."""
    from kubetune_trainer.speedups import keep_4bit_weights_differentiable

    model = _lora_model(tmp_path, 0.0, "qlora", "bf16")
    _give_updates_weight(model)
    four_bit = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert four_bit and not any(m.support_avx512bf16_for_cpu for m in four_bit)  # off for training
    packable = sum(getattr(m, "kubetune_packs_for_cpu_inference", False) for m in four_bit)
    ids = torch.randint(5, 200, (1, 12))
    model.eval()

    def logits() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids).logits.float()

    before = logits()
    assert keep_4bit_weights_differentiable(model, keep=False) == packable
    assert sum(m.support_avx512bf16_for_cpu for m in four_bit) == packable  # all of them on an AVX512-BF16 CPU
    after = logits()
    print("packed layers", packable, "largest logit difference", (after - before).abs().max().item())
    torch.testing.assert_close(after, before, rtol=0.02, atol=0.02)  # bf16 either way, summed in another order


def test_shared_dropout_keeps_the_expectation() -> None:
    from kubetune_trainer.speedups import SharedInputDropout

    torch.manual_seed(0)
    dropout = SharedInputDropout(0.05, {})
    x = torch.randn(64, 256)
    draws = torch.stack([dropout(x.clone()) for _ in range(400)])
    dropped = (draws == 0).float()
    for lane in range(4):  # each 16-bit quarter of a 64-bit draw drops at p (none is biased)
        assert (dropped.flatten(1)[:, lane::4].mean() - 0.05).abs() < 0.002
    # E[dropout(x)] = x: every element's mean of 400 draws within 6 standard errors (the drop count is a
    # skewed binomial: 5 is exceeded about once in 16k elements)
    stderr = x.abs() * (0.05 / 0.95) ** 0.5 / 400**0.5
    assert ((draws.mean(0) - x).abs() <= 6 * stderr + 1e-6).all()


def test_warm_up_first_step_learns() -> None:
    from transformers import get_scheduler

    from kubetune_trainer.objectives import warm_start

    def lrs(shift: bool) -> list[float]:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=3, num_training_steps=10)
        if shift:
            warm_start(scheduler, 3)
        out = []
        for _ in range(10):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    plain, shifted = lrs(False), lrs(True)
    assert plain[0] == 0.0  # transformers' warm-up: the first step changes nothing
    assert shifted[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert shifted[3:] == pytest.approx(plain[3:])  # the schedule after warm-up is unchanged


def test_trainer_applies_the_warm_start(tmp_path: Path, tokenizer) -> None:
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.objectives import sft_trainer_class
    from kubetune_trainer.train import training_arguments

    cfg = TrainerConfig.model_validate(
        {
            "model": {"source": "/m"},
            "dataset": {"train": "/d.jsonl"},
            "training": {"maxSteps": 4},
            "output": {"destination": str(tmp_path / "out")},
        }
    )
    args = training_arguments(cfg, tmp_path / "t", "fp32", has_eval=False)
    trainer = sft_trainer_class()(model=_model(tokenizer, "sdpa"), args=args, train_dataset=[{"input_ids": [1]}])
    trainer.create_optimizer_and_scheduler(num_training_steps=4)  # warm-up 3% of 4 steps: 1 step
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.training.learning_rate)


def test_loss_from_logits_at_labels_equals_the_full_loss(tokenizer) -> None:
    """The collator's logits_to_keep/shift_labels give the model's full-logits loss, packed and padded, and
    the Trainer's token count for the normalization."""
    from kubetune_trainer import attention

    model = _model(tokenizer, attention.register())
    examples = [Example(list(range(5, 25)), [IGNORE_INDEX] * 8 + list(range(13, 25))),
                Example(list(range(30, 41)), [IGNORE_INDEX] * 3 + list(range(33, 41)))]  # fmt: skip
    collate = Collator(tokenizer.pad_token_id)
    unpacked = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    for batch in (collate(pack(examples, 64)), collate(unpacked)):
        assert batch["shift_labels"].numel() == int(batch["logits_to_keep"].sum()) == 12 + 8
        with torch.no_grad():
            lean, reference = model(**batch), model(**_all_logits(batch))
        # the prompts got no logits
        assert lean.logits.shape[-2] == 20 and lean.logits.numel() < reference.logits.numel()
        torch.testing.assert_close(lean.loss, reference.loss)
