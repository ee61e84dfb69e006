"""The trainer's speed-ups: patches of glibc, peft and bitsandbytes behaviour that make a step cheaper.

`model.load_model` builds the model from plain factories and then hands it here (`after_kbit_preparation`,
`after_adapters`); `train` calls `return_freed_memory` at start and `for_generation` once training is over.
Each speed-up has a name; `KUBETUNE_SPEEDUPS_OFF` (a comma-separated list of those names, or `all`) turns the
named ones off for a run, to measure them or to rule them out when a result looks wrong. The figures are
from `bench/trainer` on 2-core CPUs (docs/performance.md; the runs in bench/results/):

- `tcmalloc` (in `runtime`: it takes effect before the process loads anything): tcmalloc preloaded where it is
  installed. SmolLM2-135M, CRD defaults, one pass of the bench's 128 rows: 498-516 against 269 tokens/s with
  `mmap-threshold` below, peak RSS 3.7 against 3.4 GiB (2026-12-07).
- `mmap-threshold` (only without tcmalloc): glibc's mmap threshold fixed at 128 KiB, so freed activation buffers
  go back to the system (at a cost: every buffer is fresh pages to fault in and zero). Peak RSS 1,838 -> 1,607
  MiB (seed's method, 128 rows, trainer-2026-12-02); without it peak RSS grew with the number of steps (+570 MiB
  between 32 and 128 examples).
- `bf16-weights`: the unquantized frozen weights (norms, embeddings, head) kept in bf16 after peft's k-bit
  preparation upcast them to fp32. `copy_` fell from 25 % to 13 % of a profile; 805 vs 112 tokens/s and
  -87 MiB peak RSS (CRD defaults, a loaded machine, trainer-2026-12-02).
- `input-cast`: peft's cast of every adapter input to fp32 skipped under autocast (autocast casts back at
  once). One copy less per adapted module; within noise on its own (a tiny model), and what lets modules
  share a dropped input.
- `shared-dropout`: one LoRA dropout mask per distinct input instead of one per adapted module (4 masks a
  Llama layer instead of 7 for all-linear targets). 805 vs 164 tokens/s, the same eval loss (8.6111 vs
  8.6113; trainer-2026-12-02).
- `dropout-mask`: on CPUs, dropout masks from 16-bit uniforms instead of one Bernoulli draw an element.
  Dropout's time in the profile 601 -> 175 ms (-71 %), 2.4 vs 4.6 ms forward + backward for a [2048, 256]
  bf16 activation (trainer-profile-2026-12-03, trainer-micro-2026-12-03).
- `fused-lora`: a LoRA layer's update and sum as one `addmm`. Elementwise work -337 ms, the step's self
  CPU time 6,273 -> 5,877 ms (-6 %; trainer-profile-2026-12-03).
- `fused-loss`: the output head and the cross-entropy as one chunked step (`kubetune_trainer.loss`), keeping
  no full-vocabulary logits for backward. Memory, not speed: SmolLM2-135M, CRD defaults, one 2,048-token row,
  peak RSS 4,556 -> 3,423 MiB; with gradient checkpointing 2,827 -> 1,728 MiB (trainer-memory-2026-12-06).

Not switchable, because it is a correctness fix: `keep_4bit_weights_differentiable` (bitsandbytes' CPU
inference repack has no backward; training after the first evaluation lost the gradient through the base).
`for_generation` allows the repack again for the samples: 48 greedy tokens of SmolLM2-135M took 6-11 s
against 31-53 s.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from kubetune_trainer import loss
from kubetune_trainer.config import MethodSpec
from kubetune_trainer.runtime import allocator, enabled

# -- host memory -----------------------------------------------------------------------------------

MMAP_THRESHOLD_BYTES = 128 * 1024


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 128 KiB (its initial value), so large host buffers are mapped on
    allocation and unmapped when freed. By default glibc raises the threshold to each freed mmapped buffer's
    size (up to 32 MiB): then activations of every new row length are carved from the heap, which
    fragments and is not given back. What `MALLOC_MMAP_THRESHOLD_=131072` in the environment does, set here
    so every launch gets it. False where it is off or the C library has no mallopt (not glibc)."""
    if not enabled("mmap-threshold") or allocator() == "tcmalloc":  # glibc's mallopt does not reach tcmalloc's heap
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # <malloc.h> M_MMAP_THRESHOLD
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES))


# -- what load_model applies -----------------------------------------------------------------------


def after_kbit_preparation(model: torch.nn.Module, method: MethodSpec, compute: str) -> None:
    """On a quantized model after peft's k-bit preparation: frozen weights back in bf16 (`bf16-weights`),
    and 4-bit weights kept differentiable (always)."""
    if frozen_weights_dtype(method, compute) == "bf16":
        keep_frozen_weights_in(model, torch.bfloat16)
    keep_4bit_weights_differentiable(model)


def after_adapters(model: torch.nn.Module, compute: str) -> None:
    """On a model with LoRA adapters: `input-cast` (under autocast only), `shared-dropout`, `fused-lora`,
    `fused-loss`."""
    if compute != "fp32":
        keep_adapter_inputs_in_compute_dtype(model)
    share_lora_dropout(model)
    fuse_lora_update(model)
    if enabled("fused-loss"):
        loss.fuse_head_and_loss(model)


def for_generation(model: torch.nn.Module) -> None:
    """Once training is over, for generating samples outside autocast: adapters take their fp32 input again,
    and 4-bit weights may take bitsandbytes' CPU inference layout (no more gradients)."""
    keep_adapter_inputs_in_compute_dtype(model, keep=False)
    keep_4bit_weights_differentiable(model, keep=False)


# -- the frozen weights' dtype (bf16-weights) ------------------------------------------------------


def frozen_weights_dtype(method: MethodSpec, compute: str) -> str:
    """The dtype of the weights that are neither trained nor quantized (norms, embeddings, the head).

    Full fine-tuning trains them in fp32; lora loads the base in the compute dtype; qlora's k-bit preparation
    upcasts them to fp32, which bf16 runs undo (`keep_frozen_weights_in`, unless `bf16-weights` is off) and
    fp16 runs keep (fp16's range)."""
    if method.type == "full":
        return "fp32"
    if method.effective_quantization() is None:
        return compute
    return "bf16" if compute == "bf16" and enabled("bf16-weights") else "fp32"


def keep_frozen_weights_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Undo peft's k-bit preparation upcast of the unquantized weights (norms, embeddings, head) to fp32.

    With an fp32 embedding the residual stream is fp32, and under bf16 autocast every quantized matmul
    and adapter casts its input to bf16 again: the casts (`copy_`) were the largest item of a CPU profile.
    Kept in bf16 - as `lora` keeps them, and as fp16-free QLoRA needs no upcast for range - the stream
    stays bf16; RMSNorm still computes its statistics in fp32 inside, and the loss upcasts the logits."""
    for param in model.parameters():
        if param.dtype == torch.float32 and not param.requires_grad and type(param).__name__ == "Parameter":
            param.data = param.data.to(dtype)


# -- correctness: 4-bit weights stay differentiable ------------------------------------------------


def keep_4bit_weights_differentiable(model: torch.nn.Module, keep: bool = True) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the layers changed.

    On CPUs with AVX512-BF16 (or AMX) an eval-mode forward without gradients - the Trainer's evaluation -
    converts each `Linear4bit` weight, for good, to a layout only `gemv_4bit` reads, and that op has no
    backward: every training step after the first evaluation silently lost the gradient through the frozen
    base layers (layer 0's adapter gradient fell by ~30 % in a check). Evaluation keeps the differentiable
    dequantize-and-matmul path instead. Once training is over, `keep=False` allows the repack again for the
    layers this turned off: generating samples token by token through the packed kernel instead of
    dequantizing every weight for every token took SmolLM2-135M's samples from minutes to seconds."""
    changed = 0
    for module in model.modules():
        if keep and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            module.kubetune_packs_for_cpu_inference = True
            changed += 1
        elif not keep and getattr(module, "kubetune_packs_for_cpu_inference", False):
            module.support_avx512bf16_for_cpu = True
            changed += 1
    return changed


# -- adapter inputs (input-cast) -------------------------------------------------------------------


def keep_adapter_inputs_in_compute_dtype(model: torch.nn.Module, keep: bool = True) -> None:
    """Under autocast the adapters' matmuls run in the compute dtype whatever their input's: peft's cast of
    every adapter input to the fp32 adapter weights is a copy that autocast undoes at once. Off for
    training (`keep`, unless `input-cast` is off); back on (`keep=False`) for generating outside autocast."""
    if keep and not enabled("input-cast"):
        return
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = not keep


# -- LoRA dropout (shared-dropout, dropout-mask) ---------------------------------------------------


class SharedInputDropout(torch.nn.Module):
    """LoRA dropout that draws one mask per distinct input, not one per adapted module.

    peft drops each adapted module's input on its own: q/k/v_proj (and gate/up_proj) read the same
    hidden states, so a layer draws 7 full-size masks for all-linear targets. Here modules that read the
    same tensor get the same dropped tensor (4 masks a layer, and one saved activation instead of three
    or two). Each module still sees its input dropped with probability p and scaled by 1/(1-p) - the
    same expectation and the same marginal as peft's; only the masks of q/k/v (gate/up) are no longer
    independent of each other."""

    def __init__(self, p: float, last: dict[str, Any]):
        super().__init__()
        self.p = p
        self.last = last  # shared by every SharedInputDropout of a model: {"input", "p", "output"}
        self.cheap_mask = enabled("dropout-mask")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        last = self.last
        if last.get("input") is not x or last.get("p") != self.p:
            # Holding the input keeps its id from being reused by a new tensor while it is cached.
            output = dropout(x, self.p) if self.cheap_mask else torch.nn.functional.dropout(x, self.p, training=True)
            last.update(input=x, p=self.p, output=output)
        return last["output"]


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout, with a cheaper mask on CPUs (elsewhere torch's fused dropout).

    torch's CPU dropout draws one Bernoulli sample per element (`bernoulli_`, ~7 ns each: 9.5 % of a
    default run's CPU time). Here one 64-bit draw gives four 16-bit uniforms, and an element is dropped
    when its uniform falls in the lowest round(p * 65536) of the 65536 values: with probability p rounded to
    a multiple of 1/65536 (0.05 -> 0.0500031). Kept elements are scaled by exactly 1 / (1 - that
    probability), so the expectation is the input's."""
    if x.device.type != "cpu" or p <= 0:
        return torch.nn.functional.dropout(x, p, training=True)
    dropped = round(p * 65536)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= dropped - 32768
    return torch.where(keep, x, 0).mul_(65536 / (65536 - dropped))


def share_lora_dropout(model: torch.nn.Module) -> int:
    """Replace peft's per-module LoRA dropout by `SharedInputDropout`; returns the modules changed (0 with
    `shared-dropout` off)."""
    if not enabled("shared-dropout"):
        return 0
    last: dict[str, Any] = {}
    changed = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                shared = SharedInputDropout(dropout.p, last)
                shared.train(dropout.training)
                dropouts[name] = shared
                changed += 1
    if changed:  # nothing outlives a forward pass (a recomputing backward draws again, as peft's would)
        model.register_forward_hook(lambda *_: last.clear())
    return changed


# -- the LoRA update as one matmul (fused-lora) ----------------------------------------------------


def _fused_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A LoRA layer's forward as one `addmm`: base(x) + scaling * lora_A(dropout(x)) @ lora_B^T.

    peft's vanilla path computes `result.clone()` (4-bit only), `lora_B(...)`, `* scaling` and `result + ...`:
    three or four full `[tokens, out_features]` tensors a module, and as many elementwise passes backward.
    Here the update, its scaling and the sum are one matmul that accumulates into the base output (its
    backward scales the rank-r gradient, not the full one). Anything else - merged or disabled adapters,
    several active adapters, variants such as DoRA, a LoRA bias, mixed-adapter batches, adapter and base
    dtypes that only peft's casts reconcile - goes through peft's own forward."""
    active = self.active_adapters
    adapter = active[0] if len(active) == 1 else None
    if (
        adapter is None
        or self.disable_adapters
        or self.merged
        or kwargs.get("adapter_names") is not None
        or adapter not in self.lora_A
        or adapter in self.lora_variant
        or self.lora_B[adapter].bias is not None
        or not (torch.is_autocast_enabled(x.device.type) or x.dtype == self.lora_A[adapter].weight.dtype)
    ):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    low_rank = self.lora_A[adapter](self.lora_dropout[adapter](x))
    scaling = self.scaling[adapter]
    if result.dtype != low_rank.dtype:  # outside autocast, a base that computes in another dtype
        return result + (self.lora_B[adapter](low_rank) * scaling).to(result.dtype)
    flat = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        low_rank.reshape(-1, low_rank.shape[-1]),
        self.lora_B[adapter].weight.t(),
        alpha=scaling,
    )
    return flat.view(result.shape)


def fuse_lora_update(model: torch.nn.Module) -> int:
    """Give every LoRA linear layer `_fused_lora_forward` (which itself leaves what it cannot fuse, such as
    DoRA, to peft); returns the layers changed (0 with `fused-lora` off)."""
    if not enabled("fused-lora"):
        return 0
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and "Linear" in type(module).__name__:
            module.forward = types.MethodType(_fused_lora_forward, module)
            changed += 1
    return changed
