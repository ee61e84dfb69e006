"""The model side of a run: precision, quantization and LoRA factories, and loading the base model.

Factories turn config into library objects and do nothing else; `load_model` applies them in the order
the libraries need (quantized load -> k-bit preparation -> adapters).
"""

from __future__ import annotations

import logging
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer import loss
from kubetune_trainer.config import MethodSpec, TrainerConfig, TrainingSpec
from kubetune_trainer.errors import InvalidInput

log = logging.getLogger(__name__)


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 still calls transformers 5's deprecated gradient-checkpointing aliases; nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN emulates bf16
    and fp32 is as fast; here bf16 matmuls measured 2.5-4x fp32's rate."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision(spec: TrainingSpec, *, cuda: bool | None = None, bf16_supported: bool | None = None) -> str:
    """auto: bf16 on GPUs that support it, fp16 on other GPUs; bf16 on CPUs with native bf16, else fp32.
    `cuda` and `bf16_supported` name another machine than this one (`kubetune plan` for a GPU)."""
    if spec.precision != "auto":
        return spec.precision
    if torch.cuda.is_available() if cuda is None else cuda:
        supported = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        return "bf16" if supported else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def gradient_checkpointing(spec: TrainingSpec, *, cuda: bool | None = None) -> bool:
    """Unset: on with CUDA (it trades ~1/3 more compute for much less GPU memory), off on CPU (RAM is
    rarely the limit there, and the recomputed forward pass measured ~25-50% of a step's time)."""
    if spec.gradient_checkpointing is not None:
        return spec.gradient_checkpointing
    return torch.cuda.is_available() if cuda is None else cuda


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot quantize here, or None when it can."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a native library that fails to load
        return f"bitsandbytes is not usable here ({type(exc).__name__}: {exc})"
    return None


def quantization_config(method: MethodSpec, compute: str) -> Any:
    """BitsAndBytesConfig for qlora (4-bit nf4/fp4 with optional double quant, or 8-bit); None otherwise."""
    quant = method.effective_quantization()
    if quant is None:
        return None
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute],
    )


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers (plain or bitsandbytes) that adapters can target, without the head."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}:
            names.add(name.rsplit(".", 1)[-1])
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is output:
            names.discard(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(method: MethodSpec, model: torch.nn.Module | None = None) -> Any:
    """LoraConfig for qlora/lora. With `model`, named target modules are checked against its linear layers."""
    from peft import LoraConfig, TaskType

    spec = method.effective_lora()
    if spec is None:
        return None
    targets: Any = "all-linear" if "all-linear" in spec.target_modules else list(spec.target_modules)
    if model is not None and targets != "all-linear":
        available = linear_module_names(model)
        unknown = [name for name in targets if name not in available]
        if unknown:
            raise InvalidInput(
                "UnknownTargetModule",
                f"method.lora.targetModules {unknown} not in the model; its linear modules are: "
                f"{', '.join(available)} (or use all-linear)",
                field="method.lora.targetModules",
            )
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def load_tokenizer(model_dir: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise InvalidInput("InvalidModel", f"the tokenizer in {model_dir} has no EOS token", field="model.source")
    if tokenizer.pad_token_id is None:
        # Labels never come from padding here, so pad == eos would be harmless for the loss; a distinct
        # pad still keeps token counts honest, and unk is the one every tokenizer has.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def check_model_dir(model_dir: Path, source: str) -> None:
    if not (model_dir / "config.json").is_file():
        present = sorted(p.name for p in model_dir.iterdir())[:20] if model_dir.is_dir() else []
        raise InvalidInput(
            "InvalidModel",
            f"{source} has no config.json (found: {', '.join(present) or 'nothing'}); "
            "model.source must point at a Hugging Face model directory",
            field="model.source",
        )


def load_model(
    model_dir: Path, cfg: TrainerConfig, compute: str, *, device_index: int | None = None, with_adapter: bool = True
) -> Any:
    """The model ready to train: quantized and prepared for k-bit training, with LoRA adapters (unless
    `with_adapter` is False: the caller's trainer adds them), or full."""
    from transformers import AutoModelForCausalLM

    method = cfg.method
    quant = quantization_config(method, compute)
    if quant is not None:
        problem = bitsandbytes_problem()
        if problem:
            raise InvalidInput(
                "QuantizationUnavailable",
                f"method.type qlora needs bitsandbytes: {problem}; use method.type lora instead",
                field="method.type",
            )
    # Full fine-tuning keeps fp32 master weights (mixed precision autocasts); adapters train on a
    # frozen base held in the compute dtype.
    dtype = torch.float32 if method.type == "full" else DTYPES[compute]
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.dataset.packing:
        from kubetune_trainer import attention

        kwargs["attn_implementation"] = attention.register()
    if quant is not None:
        kwargs["quantization_config"] = quant
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": device_index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (ImportError, NotImplementedError) as exc:
        raise InvalidInput(
            "QuantizationUnavailable", f"cannot load {cfg.model.source} as configured: {exc}", field="method"
        ) from exc
    except (OSError, ValueError) as exc:
        raise InvalidInput("InvalidModel", f"cannot load {cfg.model.source}: {exc}", field="model.source") from exc
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    gc = gradient_checkpointing(cfg.training)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        with _quiet_peft():
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        frozen = frozen_weights_dtype(method, compute)
        if frozen != "fp32":
            keep_frozen_weights_in(model, DTYPES[frozen])
        keep_4bit_weights_differentiable(model)
    if method.type == "full" or not with_adapter:
        return model
    from peft import get_peft_model

    lora = lora_config(method, model)
    if gc and quant is None:
        model.enable_input_require_grads()
    with _quiet_peft():
        model = get_peft_model(model, lora)
    if compute != "fp32":
        keep_adapter_inputs_in_compute_dtype(model)
    share_lora_dropout(model)
    fuse_lora_update(model)
    loss.fuse_head_and_loss(model)
    return model


def frozen_weights_dtype(method: MethodSpec, compute: str) -> str:
    """The dtype of the weights that are neither trained nor quantized (norms, embeddings, the head).

    Full fine-tuning trains them in fp32; lora loads the base in the compute dtype; qlora's k-bit preparation
    upcasts them to fp32, which bf16 runs undo (`keep_frozen_weights_in`) and fp16 runs keep (fp16's range)."""
    if method.type == "full":
        return "fp32"
    if method.effective_quantization() is None:
        return compute
    return "bf16" if compute == "bf16" else "fp32"


def keep_frozen_weights_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Undo peft's k-bit preparation upcast of the unquantized weights (norms, embeddings, head) to fp32.

    With an fp32 embedding the residual stream is fp32, and under bf16 autocast every quantized matmul
    and adapter casts its input to bf16 again: the casts (`copy_`) were the largest item of a CPU profile.
    Kept in bf16 - as `lora` keeps them, and as fp16-free QLoRA needs no upcast for range - the stream
    stays bf16; RMSNorm still computes its statistics in fp32 inside, and the loss upcasts the logits."""
    for param in model.parameters():
        if param.dtype == torch.float32 and not param.requires_grad and type(param).__name__ == "Parameter":
            param.data = param.data.to(dtype)


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


def keep_adapter_inputs_in_compute_dtype(model: torch.nn.Module, keep: bool = True) -> None:
    """Under autocast the adapters' matmuls run in the compute dtype whatever their input's: peft's cast of
    every adapter input to the fp32 adapter weights is a copy that autocast undoes at once. Off for
    training (`keep`); back on (`keep=False`) for generating outside autocast after it."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = not keep


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        last = self.last
        if last.get("input") is not x or last.get("p") != self.p:
            # Holding the input keeps its id from being reused by a new tensor while it is cached.
            last.update(input=x, p=self.p, output=dropout(x, self.p))
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
    """Replace peft's per-module LoRA dropout by `SharedInputDropout`; returns the modules changed."""
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
    DoRA, to peft); returns the layers changed."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and "Linear" in type(module).__name__:
            module.forward = types.MethodType(_fused_lora_forward, module)
            changed += 1
    return changed


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
