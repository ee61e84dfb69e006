"""The fused head and loss (`kubetune_trainer.loss`) gives the model's own loss and gradients, keeps no
full-vocabulary tensor for backward, and stays out of the way where it would not be exact."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from kubetune_trainer import loss as loss_mod
from kubetune_trainer.data import IGNORE_INDEX, Collator, Example, pack


@pytest.fixture(scope="module")
def tokenizer():
    from kubetune_cli.tiny import build_tokenizer

    return build_tokenizer()


def _lora_pair(tokenizer):
    """The same LoRA model twice: the model's own forward, and the fused one."""
    from peft import LoraConfig, get_peft_model

    from kubetune_cli.tiny import build_model

    torch.manual_seed(0)
    base = build_model(tokenizer, initializer_range=0.2)
    with warnings.catch_warnings():  # peft reads transformers' deprecated gradient-checkpointing alias
        warnings.filterwarnings("ignore", r".*is_gradient_checkpointing.* is deprecated", FutureWarning)
        model = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        )
    fused = copy.deepcopy(model)
    assert loss_mod.fuse_head_and_loss(fused)
    return model, fused


def _batch(tokenizer):
    a = Example(list(range(5, 40)), [IGNORE_INDEX] * 6 + list(range(11, 40)))
    b = Example(list(range(50, 70)), [IGNORE_INDEX] * 3 + list(range(53, 70)))
    c = Example(list(range(80, 90)), [IGNORE_INDEX] * 10)  # nothing to learn
    return Collator(tokenizer.pad_token_id)(pack([a, b, c], 128))


def _loss_and_grads(model, batch, *, autocast: bool, num_items=None):
    model.zero_grad()
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("num_items", [None, 37], ids=["mean", "sum-over-items"])
def test_fused_loss_and_gradients_match_the_models_own(tokenizer, autocast: bool, num_items) -> None:
    model, fused = _lora_pair(tokenizer)
    batch = _batch(tokenizer)
    expected, expected_grads = _loss_and_grads(model, batch, autocast=autocast, num_items=num_items)
    got, got_grads = _loss_and_grads(fused, batch, autocast=autocast, num_items=num_items)
    tolerance = 2e-2 if autocast else 1e-5
    assert got.item() == pytest.approx(expected.item(), rel=tolerance / 10)
    assert expected_grads.keys() == got_grads.keys() and expected_grads
    for name, grad in expected_grads.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        assert (got_grads[name] - grad).abs().max().item() <= tolerance * scale, name


def test_fused_loss_keeps_no_vocabulary_sized_tensor_for_backward(tokenizer) -> None:
    model, fused = _lora_pair(tokenizer)
    batch = _batch(tokenizer)
    positions = int(batch["logits_to_keep"].sum())
    vocabulary = model.get_output_embeddings().weight.shape[0]

    def largest_saved(m) -> int:
        sizes = [0]

        def pack_hook(t):
            if not isinstance(t, torch.nn.Parameter):
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            m(**batch).loss.backward()
        return max(sizes)

    assert largest_saved(model) >= positions * vocabulary  # the model's own path keeps the logits
    assert largest_saved(fused) < positions * vocabulary / 4


def test_evaluation_and_generation_keep_the_models_own_forward(tokenizer) -> None:
    model, fused = _lora_pair(tokenizer)
    batch = _batch(tokenizer)
    with torch.no_grad():
        own, mine = model(**batch), fused(**batch)
    assert mine.logits is not None  # evaluation gets logits, as before
    assert torch.allclose(own.logits, mine.logits) and torch.allclose(own.loss, mine.loss)


def test_a_trained_head_or_an_unknown_architecture_keeps_the_models_own_path(tokenizer) -> None:
    from kubetune_cli.tiny import build_model

    full = build_model(tokenizer)  # full fine-tuning: the head trains
    assert loss_mod.fuse_head_and_loss(full)
    batch = _batch(tokenizer)
    out = full(**batch)
    assert out.logits is not None  # the model's own forward ran
    out.loss.backward()
    assert full.lm_head.weight.grad is not None and full.lm_head.weight.grad.abs().sum() > 0

    other = build_model(tokenizer)
    other.config.model_type = "gemma2"  # logit soft-capping: not a plain head
    assert not loss_mod.fuse_head_and_loss(other)
