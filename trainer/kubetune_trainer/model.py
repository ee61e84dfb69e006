"""The model side of a run: precision, quantization and LoRA factories, and loading the base model.

Factories turn config into library objects and do nothing else; `load_model` applies them in the order
the libraries need (quantized load -> k-bit preparation -> adapters) and hands the model to `speedups`
after each of the last two (what those patches buy, and how to turn them off, is said there).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer import speedups
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


def require_bitsandbytes(method: MethodSpec) -> None:
    """InvalidInput (QuantizationUnavailable) when `method` quantizes and bitsandbytes cannot here."""
    if method.effective_quantization() is not None and (problem := bitsandbytes_problem()):
        raise InvalidInput(
            "QuantizationUnavailable",
            f"method.type qlora needs bitsandbytes: {problem}; use method.type lora instead",
            field="method.type",
        )


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
    method = cfg.method
    require_bitsandbytes(method)
    quant = quantization_config(method, compute)
    model = _from_pretrained(model_dir, cfg, compute, quant, device_index)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    gc = gradient_checkpointing(cfg.training)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        with _quiet_peft():
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        speedups.after_kbit_preparation(model, method, compute)
    if method.type == "full" or not with_adapter:
        return model
    from peft import get_peft_model

    lora = lora_config(method, model)
    if gc and quant is None:
        model.enable_input_require_grads()
    with _quiet_peft():
        model = get_peft_model(model, lora)
    speedups.after_adapters(model, compute)
    return model


def _from_pretrained(model_dir: Path, cfg: TrainerConfig, compute: str, quant: Any, device_index: int | None) -> Any:
    """transformers' model from `model_dir` as configured: dtype, quantization, attention; InvalidInput
    naming the field to change when it does not load."""
    from transformers import AutoModelForCausalLM

    # Full fine-tuning keeps fp32 master weights (mixed precision autocasts); adapters train on a
    # frozen base held in the compute dtype.
    dtype = torch.float32 if cfg.method.type == "full" else DTYPES[compute]
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.dataset.packing:
        from kubetune_trainer import attention

        kwargs["attn_implementation"] = attention.register()
    if quant is not None:
        kwargs["quantization_config"] = quant
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": device_index or 0}
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (ImportError, NotImplementedError) as exc:
        raise InvalidInput(
            "QuantizationUnavailable", f"cannot load {cfg.model.source} as configured: {exc}", field="method"
        ) from exc
    except (OSError, ValueError) as exc:
        raise InvalidInput("InvalidModel", f"cannot load {cfg.model.source}: {exc}", field="model.source") from exc


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
