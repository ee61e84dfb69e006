"""The output head and the cross-entropy as one chunked step: no full-vocabulary logits kept for backward.

A causal LM's training step projects every labelled position onto the whole vocabulary, upcasts those
logits to fp32 for the loss, and autograd keeps the fp32 copy (and builds two more of the same size in
backward). With SmolLM2-135M's 49,152-token vocabulary that is ~1 GB for one 2,048-token row - more than
the model itself (`bench/trainer/memory.py`). Liger Kernel's and Apple's Cut Cross-Entropy fuse the head
with the loss on GPUs (Triton kernels only); this is the same idea in plain torch, so it serves CPUs and
GPUs alike: the head is applied a chunk of positions at a time, and each chunk's gradient with respect to
the hidden states is computed at once in the forward pass (softmax minus the one-hot target), so only a
[positions, hidden] gradient is kept. The matmuls are the ones the model would run (the head forward and
the hidden-state gradient), in the same dtypes, so the loss and gradients match the unfused path to
rounding (tests/trainer/test_loss.py).

It applies where it is exact: a frozen, bias-free linear head (every LoRA/QLoRA run; full fine-tuning trains
the head and keeps the model's own path), model types whose forward is just decoder -> head -> loss (no
logit soft-capping or scaling, no router loss), and training steps with labels. Everything else - evaluation,
generation, DPO's own log-probabilities - runs the model's own forward unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MB in fp32 (85 positions of a 49k vocabulary, 32 of a 128k one)
# Causal LMs whose forward is `decoder -> lm_head -> self.loss_function` and nothing more.
PLAIN_HEADS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma", "smollm3"})


class _HeadCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) * scale, with the hidden-state gradient computed in
    forward, chunk by chunk; targets equal to IGNORE_INDEX count for nothing."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        chunk = chunk_rows(weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            target = targets[start : start + chunk]
            logits = torch.nn.functional.linear(hidden[start : start + chunk], weight).float()
            log_norm = logits.logsumexp(-1)
            counted = target != IGNORE_INDEX
            index = target.clamp(min=0)[:, None]
            total += ((log_norm - logits.gather(1, index).squeeze(1)) * counted).sum()
            if grad is not None:
                probs = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place of the logits
                probs.scatter_add_(1, index, -torch.ones_like(index, dtype=probs.dtype))
                probs.mul_((counted * scale)[:, None])
                grad[start : start + chunk] = torch.nn.functional.linear(probs.to(weight.dtype), weight.t())
        ctx.save_for_backward(grad)
        return total * scale

    @staticmethod
    def backward(ctx: Any, out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * out.to(grad.dtype)), None, None, None


def chunk_rows(vocabulary: int) -> int:
    """Positions whose logits are computed at once."""
    return max(1, CHUNK_ELEMENTS // vocabulary)


def head_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_items: Any = None
) -> torch.Tensor:
    """The causal-LM loss of `hidden` ([N, H]) through the frozen head `weight` ([V, H]) against `targets`
    ([N], IGNORE_INDEX for none), reduced as transformers does: a sum over `num_items` (the Trainer's token
    count for gradient accumulation) when given, else a mean over the counted targets."""
    count = num_items if num_items is not None else (targets != IGNORE_INDEX).sum()
    scale = 1.0 / torch.as_tensor(count, dtype=torch.float32, device=hidden.device)
    return _HeadCrossEntropy.apply(hidden, weight, targets, scale)


def _fused_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """A causal LM's forward whose training loss goes through `head_cross_entropy` (see `fuse_head_and_loss`)."""
    head = self.lm_head
    if args or kwargs.get("labels") is None or not torch.is_grad_enabled() or head.weight.requires_grad:
        return type(self).forward(self, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.modeling_utils import slice_logits_to_keep

    labels = kwargs.pop("labels")
    keep = kwargs.pop("logits_to_keep", 0)
    targets = kwargs.get("shift_labels")
    outputs = self.model(**kwargs)
    hidden = slice_logits_to_keep(outputs.last_hidden_state, keep)
    if targets is None:  # no collator's targets: the model's own shift
        targets = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    loss = head_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), kwargs.get("num_items_in_batch")
    )
    return CausalLMOutputWithPast(loss=loss, logits=None)


def causal_lm_with_plain_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The causal LM inside `model` (a peft wrapper or the model itself) if its forward is decoder -> a
    bias-free linear head -> loss, else None."""
    for module in model.modules():
        head = module._modules.get("lm_head")  # its own child (peft's wrappers only delegate to it)
        if head is None or "model" not in module._modules:
            continue
        plain = type(head) is torch.nn.Linear and head.bias is None
        return module if plain and getattr(module.config, "model_type", None) in PLAIN_HEADS else None
    return None


def fuse_head_and_loss(model: torch.nn.Module) -> bool:
    """Give the causal LM inside `model` `_fused_forward` where it is exact (see the module's docstring);
    returns whether it did. A head that trains (full fine-tuning) keeps the model's own path at run time."""
    causal_lm = causal_lm_with_plain_head(model)
    if causal_lm is not None:
        causal_lm.forward = types.MethodType(_fused_forward, causal_lm)
    return causal_lm is not None
