"""What a run will do, before it takes a GPU (`kubetune plan`): the data as the trainer reads it, the step
schedule, an estimate of peak GPU memory per GPU, and an ETA range.

The data side is the trainer's own code (`data.train_eval_rows`, `tokenize`, `as_features` with the
packed row budget, the `Collator` with its label positions, `TrainerConfig.micro_batch_size`), so the counts
and the micro-batches are the run's. The model is built on the meta device from its config alone (no weights
read, no memory used) to get every parameter's shape; the precision, gradient checkpointing and optimizer
defaults are the trainer's factories asked about the target GPU rather than this machine.

The memory estimate sums what a training step holds at its peak (the start of the backward pass):
- weights at their stored size: 4-bit NF4/FP4 linear layers with their quantization constants (bitsandbytes'
  block size 64; double quantization stores them in 8 bits with fp32 constants per 256 blocks), 8-bit
  layers with their row scales; every other parameter (embeddings, norms, the head) in the dtype
  `speedups.frozen_weights_dtype` gives it (fp32 after k-bit preparation, bf16 again for bf16 runs);
- trainable parameters (LoRA's A and B, in fp32; every weight for full fine-tuning), their gradients and
  the optimizer's state (AdamW: two fp32 moments; 8-bit AdamW: two 8-bit moments);
- activations saved for backward at the micro-batch of the run that needs the most (one packed row of up to
  training.batchTokens tokens with packing, batchSize padded sequences without), counted per decoder layer
  from the tensors autograd keeps for a Llama-style block (RMSNorm, attention, gated MLP, LoRA's low-rank
  intermediates and its dropout copies, one per distinct input as `speedups.share_lora_dropout` shares them);
  with gradient checkpointing only each layer's input is kept, plus one layer recomputed at a time;
- the logits and the loss at the label positions only (the collator's `logits_to_keep`): with a frozen plain
  head, one chunk of them at a time and the hidden states' gradient (`kubetune_trainer.loss`); otherwise the
  head's output, its fp32 copy and log-softmax, and their gradient.
Not counted: the CUDA context and the allocator's fragmentation, reported apart as a fixed reserve.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from kubetune_trainer import data as data_mod
from kubetune_trainer import loss as loss_mod
from kubetune_trainer import model as model_mod
from kubetune_trainer import speedups
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.train import optimizer_name

GIB = 1024**3
MIB = 1024**2
# Not in torch.cuda.max_memory_allocated: the CUDA context, cuBLAS/cuDNN workspaces and the caching
# allocator's fragmentation. About 1 GiB is what a CUDA 12 context takes on Hopper/Ampere GPUs.
CUDA_RESERVE_BYTES = 1 * GIB


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int  # as CUDA reports it (a little under the marketed size)
    bf16_tflops: float  # dense peak, no sparsity (fp16 on GPUs without bf16)
    bf16: bool = True


# Vendor data sheets: memory as nvidia-smi shows it (MiB), dense 16-bit tensor-core peak.
GPUS: dict[str, Gpu] = {
    gpu.name.lower(): gpu
    for gpu in (
        Gpu("H200-141GB", 143771 * MIB, 989),
        Gpu("H100-80GB", 81559 * MIB, 989),
        Gpu("H100-PCIe-80GB", 81559 * MIB, 756),
        Gpu("A100-80GB", 81920 * MIB, 312),
        Gpu("A100-40GB", 40960 * MIB, 312),
        Gpu("L40S-48GB", 46068 * MIB, 362),
        Gpu("A10G-24GB", 23028 * MIB, 70),
        Gpu("L4-24GB", 23034 * MIB, 121),
        Gpu("RTX4090-24GB", 24564 * MIB, 165),
        Gpu("V100-32GB", 32768 * MIB, 125, bf16=False),
        Gpu("T4-16GB", 15360 * MIB, 65, bf16=False),
    )
}

# Assumed model FLOPs utilisation (share of the GPU's peak a step achieves), low and high. QLoRA pays for
# dequantizing every weight in forward and backward; LoRA and full fine-tuning run plain 16-bit matmuls.
UTILISATION = {"qlora": (0.15, 0.35), "lora": (0.25, 0.45), "full": (0.30, 0.50)}
# On a CPU, the share of its measured GEMM rate (at the run's dtype) a step achieves, low and high. Measured on
# SmolLM2-135M, 2 cores with AVX512-BF16, nothing else running (bench/results/plan-cpu-eta-2026-12-07.json):
# 25-28 % for QLoRA, LoRA and full fine-tuning alike, with or without gradient checkpointing, at 1,024- and
# 2,048-token rows. The range reaches half that (a node shared with other work) and a third more.
CPU_UTILISATION = (0.12, 0.35)

_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(Ki|Mi|Gi|Ti|K|M|G|T|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_FACTORS = {
    None: 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
    "Ki": 1024, "KiB": 1024, "Mi": MIB, "MiB": MIB, "Gi": GIB, "GiB": GIB, "Ti": 1024**4, "TiB": 1024**4,
}  # fmt: skip


class PlanError(ValueError):
    """A plan option that is wrong; the message says what would be valid."""


def parse_memory(text: str) -> int:
    """Bytes of a memory size written as Kubernetes writes it (24Gi, 80G) or with a B (24GiB)."""
    match = _QUANTITY.match(text)
    if not match:
        raise PlanError(f"--gpu-memory {text!r}: expected a size such as 24Gi, 80G or 40GiB")
    return int(float(match.group(1)) * _FACTORS[match.group(2)])


def _squashed(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower()).removeprefix("nvidia")


def find_gpu(name: str) -> Gpu:
    """A GPU by the name people write: the table's (H100-80GB), its model alone in any case (l4, A100, H100,
    "nvidia h100"), or with its memory in another spelling (a100 40gb, A100-80G). A model sold with more than
    one memory size or form is planned on the smallest and slowest of them: a plan that fits there fits on all."""
    wanted = _squashed(name)
    matches = [
        gpu
        for gpu in GPUS.values()
        if wanted in (_squashed(gpu.name), _squashed(gpu.name).removesuffix("b"), _squashed(gpu.name.split("-")[0]))
    ]
    if not matches:
        known = ", ".join(g.name for g in GPUS.values())
        raise PlanError(f"--gpu {name!r}: not a GPU this table knows ({known}); or give --gpu-memory")
    return min(matches, key=lambda gpu: (gpu.memory_bytes, gpu.bf16_tflops))


# -- the data --------------------------------------------------------------------------------------


@dataclass
class Spread:
    min: int
    median: float
    p95: float
    max: int

    @classmethod
    def of(cls, values: list[int]) -> Spread:
        if not values:
            return cls(0, 0, 0, 0)
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        return cls(ordered[0], statistics.median(ordered), p95, ordered[-1])


@dataclass
class DataPlan:
    train_rows: int
    eval_rows: int
    packing: bool
    examples: int  # trained on, after dropping those truncated to nothing
    dropped: int
    truncated: int
    lost_response_tokens: int
    prompt_tokens: Spread  # before truncation; chat: every token not trained on
    response_tokens: Spread  # before truncation; the tokens trained on
    few_trained: int  # examples training fewer than data.FEW_TRAINED_TOKENS tokens (a template or mapping problem?)
    real_tokens: int  # per epoch, after truncation
    processed_tokens: int  # per epoch, padding included
    predicted_tokens: int  # per epoch: positions where the model computes logits (their next token is a label)
    sequences: int  # per epoch: packed rows or examples
    longest_sequence: int
    micro_batch_size: int  # sequences per micro-batch: 1 packed row with packing, else batchSize
    row_tokens: int | None  # with packing: the token budget of a packed row (training.batchTokens)
    example: list[dict[str, Any]] = field(default_factory=list)  # [{text, trained}] segments of one example

    @property
    def packing_efficiency(self) -> float:
        return self.real_tokens / self.processed_tokens if self.processed_tokens else 0.0


def rendered_example(example: data_mod.Example, tokenizer: Any) -> list[dict[str, Any]]:
    """One example as runs of text, each marked trained (its tokens carry labels) or not."""
    segments: list[dict[str, Any]] = []
    start = 0
    ids, trained = example.input_ids, [label != data_mod.IGNORE_INDEX for label in example.labels]
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            segments.append({"text": tokenizer.decode(ids[start:end]), "trained": trained[start]})
            start = end
    return segments


@dataclass(frozen=True)
class MicroBatch:
    """The shape of one micro-batch as the trainer's Collator makes it."""

    sequences: int
    tokens: int  # per sequence, padding included
    predicted: int  # positions whose logits the model computes: those whose next token is a label

    @property
    def processed(self) -> int:
        return self.sequences * self.tokens


def micro_batches(cfg: TrainerConfig, features: list[dict[str, list[int]]]) -> list[MicroBatch]:
    """One epoch's micro-batches, collated by the trainer's Collator (packed rows concatenated, other
    sequences padded to the longest, logits kept at label positions), drawn in a seeded random order as the
    loop draws them (this is one such order: it matters only to which sequences are padded together)."""
    size = cfg.micro_batch_size()
    order = list(range(len(features)))
    random.Random(cfg.training.seed).shuffle(order)
    collate = data_mod.Collator(pad_token_id=0)  # shapes only: the pad id changes none
    shapes = []
    for start in range(0, len(order), size):
        batch = collate([features[i] for i in order[start : start + size]])
        sequences, tokens = batch["input_ids"].shape
        shapes.append(MicroBatch(sequences, tokens, int(batch["logits_to_keep"].sum())))
    return shapes


def plan_data(
    cfg: TrainerConfig, train_rows: list[data_mod.Row], eval_rows: list[data_mod.Row], tokenizer: Any
) -> tuple[DataPlan, data_mod.TokenizedData, list[MicroBatch]]:
    """The data as the trainer tokenizes, truncates, packs and collates it; raises the trainer's InvalidInput."""
    spec = cfg.dataset
    train = data_mod.tokenize(train_rows, spec, tokenizer, name="train")
    if eval_rows:
        data_mod.tokenize(eval_rows, spec, tokenizer, name="eval")  # the trainer rejects bad eval rows too
    features = data_mod.as_features(train.examples, cfg.packed_row_tokens(), spec.packing)
    batches = micro_batches(cfg, features)
    real = sum(len(e.input_ids) for e in train.examples)
    plan = DataPlan(
        train_rows=len(train_rows),
        eval_rows=len(eval_rows),
        packing=spec.packing,
        examples=len(train.examples),
        dropped=train.dropped,
        truncated=train.truncated,
        lost_response_tokens=train.lost_response_tokens,
        prompt_tokens=Spread.of([untrained for untrained, _ in train.lengths]),
        response_tokens=Spread.of([trained for _, trained in train.lengths]),
        few_trained=train.few_trained,
        real_tokens=real,
        processed_tokens=sum(b.processed for b in batches),
        predicted_tokens=sum(b.predicted for b in batches),
        sequences=len(features),
        longest_sequence=max(len(f["input_ids"]) for f in features),
        micro_batch_size=cfg.micro_batch_size(),
        row_tokens=cfg.packed_row_tokens() if spec.packing else None,
        example=rendered_example(train.examples[0], tokenizer),
    )
    return plan, train, batches


def rejected_rows(rows: list[data_mod.Row], cfg: TrainerConfig, tokenizer: Any, limit: int) -> tuple[list[str], int]:
    """The trainer stops at the first bad row; this goes on: the first `limit` messages and how many."""
    from kubetune_trainer.errors import InvalidInput

    messages: list[str] = []
    count = 0
    for row in rows:
        try:
            data_mod.encode_row(row, cfg.dataset, tokenizer)
        except InvalidInput as exc:
            count += 1
            if len(messages) < limit:
                messages.append(exc.error.message)
    return messages, count


# -- the schedule ----------------------------------------------------------------------------------


@dataclass
class Schedule:
    world_size: int
    global_batch: int  # sequences (packed rows with packing) per optimizer step
    steps_per_epoch: int
    total_steps: int
    epochs: float
    warmup_steps: int
    evaluations: int
    checkpoints_written: int
    checkpoints_kept: int


def schedule(cfg: TrainerConfig, sequences: int, world_size: int, has_eval: bool) -> Schedule:
    """The loop's own arithmetic (transformers' Trainer): a distributed sampler gives each rank
    ceil(sequences / world) sequences, the loader ceil(that / micro-batch size) micro-batches (one packed row
    each with packing, batchSize sequences without), and an epoch is ceil(micro-batches /
    gradientAccumulationSteps) optimizer steps; warm-up is ceil(steps x warmupRatio)."""
    t = cfg.training
    per_rank = math.ceil(sequences / world_size)
    loader_batches = math.ceil(per_rank / cfg.micro_batch_size())
    per_epoch = max(math.ceil(loader_batches / t.gradient_accumulation_steps), 1)
    total = t.max_steps if t.max_steps is not None else math.ceil(t.effective_epochs() * per_epoch)
    written = total // t.checkpoint_every_steps
    return Schedule(
        world_size=world_size,
        global_batch=cfg.micro_batch_size() * t.gradient_accumulation_steps * world_size,
        steps_per_epoch=per_epoch,
        total_steps=total,
        epochs=round(total / per_epoch, 3),
        warmup_steps=math.ceil(total * t.warmup_ratio),
        evaluations=(total // t.eval_every_steps + (total % t.eval_every_steps > 0)) if has_eval else 0,
        checkpoints_written=written,
        checkpoints_kept=min(written, t.checkpoints_to_keep),
    )


# -- the model's shape -----------------------------------------------------------------------------


@dataclass
class ModelShape:
    """What the estimate needs of the model, read from a meta-device instance built from its config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    q_dim: int
    kv_dim: int
    vocab: int
    linear: list[tuple[str, int, int]]  # (leaf name, in, out) of every linear layer but the head
    head_params: int  # the output layer (stays unquantized)
    plain_head: bool  # `loss.causal_lm_with_plain_head`: a frozen head's loss may be fused with it
    other_params: int  # embeddings, norms: neither linear nor the head
    total_params: int

    @property
    def linear_params(self) -> int:
        return sum(i * o for _, i, o in self.linear)


def model_shape(model_config: Any, cfg: TrainerConfig | None = None) -> ModelShape:
    """With `cfg`, its LoRA target modules are checked against the model as the trainer checks them."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    if cfg is not None:
        model_mod.lora_config(cfg.method, model)  # InvalidInput for a target module the model lacks
    head = model.get_output_embeddings()
    linear = [
        (name.rsplit(".", 1)[-1], m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    ]
    total = sum(p.numel() for p in model.parameters())
    head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
    if getattr(model_config, "tie_word_embeddings", False):
        head_params = 0  # shared with the input embedding, counted there
    linear_params = sum(i * o for _, i, o in linear)
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        heads=heads,
        q_dim=heads * head_dim,
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        vocab=text.vocab_size,
        linear=linear,
        head_params=head_params,
        plain_head=loss_mod.causal_lm_with_plain_head(model) is not None,
        other_params=total - linear_params - head_params,
        total_params=total,
    )


# -- memory ----------------------------------------------------------------------------------------

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "paged_adamw_32bit": 8,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
}


@dataclass(frozen=True)
class Cpu:
    """This machine's CPU as a training run would use it: `flops` is the GEMM rate measured at the run's compute
    dtype on `threads` threads (`measure_cpu`), the peak an ETA on it is a share of."""

    threads: int
    dtype: str  # "bf16" or "fp32"
    flops: float


def gemm_flops(dtype: str = "fp32", seconds: float = 1.0, n: int = 1024, threads: int | None = None) -> float:
    """GEMM FLOP/s on this CPU: the best of timed n x n matmuls over `seconds` (torch's thread count unless
    `threads` is given). The bench's compute-bound limit uses it too."""
    import time

    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=kind), torch.randn(n, n, dtype=kind)
    a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def measure_cpu(dtype: str, seconds: float = 1.0) -> Cpu:
    """This CPU at `dtype` ("bf16" or "fp32"), on the threads torch would train with."""
    import torch

    return Cpu(torch.get_num_threads(), dtype, gemm_flops(dtype, seconds))


@dataclass
class Target:
    """The machine a plan is for: a GPU (by name, or memory alone) or this CPU (`cpu`: measured, for an ETA)."""

    cuda: bool
    memory_bytes: int | None
    gpu: Gpu | None = None
    cpu: Cpu | None = None

    @property
    def bf16(self) -> bool:
        return self.gpu.bf16 if self.gpu is not None else True


@dataclass
class MemoryEstimate:
    precision: str
    gradient_checkpointing: bool
    optimizer: str
    batch_shape: tuple[int, int]  # (sequences, tokens) of the micro-batch at the peak
    predicted_positions: int  # of that micro-batch: where the model computes logits (label positions)
    parts: dict[str, int]  # bytes per component

    @property
    def peak_bytes(self) -> int:
        """What torch allocates at the peak (torch.cuda.max_memory_allocated)."""
        return sum(self.parts.values())


def _lora_modules(cfg: TrainerConfig, shape: ModelShape) -> list[tuple[str, int, int]]:
    """The linear layers that get adapters (all-linear: every one but the head, as PEFT does)."""
    lora = cfg.method.effective_lora()
    if lora is None:
        return []
    targets = None if "all-linear" in lora.target_modules else set(lora.target_modules)
    return [(n, i, o) for n, i, o in shape.linear if targets is None or n in targets]


# The linear layers of a Llama-style block that read the same tensor: `speedups.share_lora_dropout` gives
# adapters on them one dropped copy of it (o_proj and down_proj each read their own input).
SAME_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


def _adapter_inputs(modules: list[tuple[str, int, int]]) -> list[int]:
    """Fan-in of each distinct input among one layer's adapted modules (one dropout copy each)."""
    inputs: dict[Any, int] = {}
    for name, fan_in, _ in modules:
        group = next((i for i, names in enumerate(SAME_INPUT) if name in names), name)
        inputs[group] = fan_in
    return list(inputs.values())


def estimated_trainable_parameters(cfg: TrainerConfig, shape: ModelShape) -> int:
    """The parameters training updates, counted from the model's shape (the adapters' with LoRA): no model is
    loaded. `model.trainable_parameters` counts them on a loaded model."""
    lora = cfg.method.effective_lora()
    if lora is None:
        return shape.total_params
    return sum(lora.r * (i + o) for _, i, o in _lora_modules(cfg, shape))


def weight_bytes(cfg: TrainerConfig, shape: ModelShape, precision: str) -> int:
    quant = cfg.method.effective_quantization()
    # Norms, embeddings and the head: fp32 for full fine-tuning and after k-bit preparation, unless a bf16
    # run keeps them in bf16; lora's frozen base is held in the compute dtype.
    unquantized = (shape.other_params + shape.head_params) * DTYPE_BYTES[
        speedups.frozen_weights_dtype(cfg.method, precision)
    ]
    if quant is None:
        per = 4 if cfg.method.type == "full" else DTYPE_BYTES[precision]
        return shape.linear_params * per + unquantized
    if quant.bits == 8:
        quantized = shape.linear_params + sum(4 * o for _, _, o in shape.linear)  # int8 + fp32 row scales
    else:
        blocks = shape.linear_params / 64
        constants = blocks * 1 + blocks / 256 * 4 if quant.double_quant else blocks * 4
        quantized = int(shape.linear_params / 2 + constants)
    return quantized + unquantized


def activation_bytes(
    cfg: TrainerConfig, shape: ModelShape, precision: str, checkpointing: bool, batch: MicroBatch, cuda: bool
) -> dict[str, int]:
    """Saved activations and the loss's tensors for one micro-batch."""
    e = DTYPE_BYTES[precision]  # activations are in the compute dtype (autocast for full fine-tuning)
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    n, m = batch.processed, batch.predicted
    # The residual stream has the embedding's dtype; where that is not the compute dtype (full fine-tuning and
    # fp16 QLoRA keep fp32 weights) each linear layer fed from it (q, k, v, gate, up) keeps its own input cast
    # to the compute dtype.
    stream = DTYPE_BYTES[speedups.frozen_weights_dtype(cfg.method, precision)]
    casts = 5 * e * h if stream != e else 0
    # Under autocast, RMSNorm keeps its fp32 input (and its normalized output where its weight trains), and a
    # frozen base layer keeps no input: its weight needs no gradient, and an adapter's input is counted with the
    # adapter. Without autocast (fp32) both keep them (measured: tests/trainer/test_plan.py's cases and
    # SmolLM2-135M; the rule for frozen bases alone took the fp32 QLoRA case from -6 % to -21 %).
    frozen = cfg.method.type != "full" and precision != "fp32"
    norm = 4 * h + (0 if frozen else stream * h)
    attention = e * (3 * q + 2 * kv)  # q, k, v after RoPE for attention; its output twice (sdpa, o_proj input)
    mlp = e * (3 if frozen else 4) * i  # gate (SiLU input), SiLU output, up; their product (down_proj's input)
    lora = cfg.method.effective_lora()
    adapters = 0
    if lora is not None:
        modules = _lora_modules(cfg, shape)
        per_layer = modules[: max(1, len(modules) // max(shape.layers, 1))]  # one decoder layer's adapters
        adapters = sum(e * lora.r for _ in per_layer)  # A's output (autocast's dtype), the input of B
        if lora.dropout > 0:  # one dropped copy and its mask per distinct input (shared dropout)
            adapters += sum((e + 1) * fan_in for fan_in in _adapter_inputs(per_layer))
    layer = 2 * norm + attention + mlp + adapters + casts
    # Attention over padded sequences (a mask) on the CPU materializes one layer's fp32 scores at a time, in the
    # forward pass (they are not kept for backward), when the loss's tensors do not exist yet: the peak is the
    # larger of the two. Segment attention over packed rows and CUDA's kernels never materialize them.
    scores = 0 if cuda or cfg.dataset.packing else batch.sequences * shape.heads * batch.tokens**2 * 4
    # The final norm; the head's input is taken at the predicted positions, and kept only when the head trains.
    head = n * norm + (m * stream * h if cfg.method.type == "full" else 0)
    logits = logit_bytes(cfg, shape, m, e)
    if checkpointing:
        # Each layer's input is kept; backward recomputes one layer at a time, after the loss's tensors are
        # freed, so the peak is the larger of the two.
        inputs = n * shape.layers * stream * h
        return {"activations": inputs + head + max(0, n * layer + scores - logits), "logits": logits}
    return {"activations": n * shape.layers * layer + head + max(0, scores - logits), "logits": logits}


def logit_bytes(cfg: TrainerConfig, shape: ModelShape, predicted: int, e: int) -> int:
    """The loss's tensors at the predicted positions. Fused with a frozen plain head (`kubetune_trainer.loss`):
    one chunk of logits at a time (the head's output, its fp32 copy, the softmax cast back) and the hidden-state
    gradient kept for backward. Otherwise the head's output, the loss's fp32 copy of it (unless it is fp32
    already) and log-softmax's output kept for backward, whose first gradient is as large."""
    casts = 2 * e if e != 4 else 0
    lora = cfg.method.effective_lora()
    trains_head = lora is None or "lm_head" in lora.target_modules
    if shape.plain_head and not trains_head:
        chunk = min(predicted, loss_mod.chunk_rows(shape.vocab))
        return chunk * shape.vocab * (4 + casts) + predicted * shape.hidden * e
    return predicted * shape.vocab * (8 + casts // 2)


def estimate_memory(
    cfg: TrainerConfig,
    shape: ModelShape,
    target: Target,
    batches: list[MicroBatch],
    world_size: int = 1,
    *,
    checkpointing: bool | None = None,
) -> MemoryEstimate:
    """The peak over the run's micro-batches (the one with the most tokens, or the most label positions)."""
    precision = model_mod.precision(cfg.training, cuda=target.cuda, bf16_supported=target.bf16)
    gc = model_mod.gradient_checkpointing(cfg.training, cuda=target.cuda) if checkpointing is None else checkpointing
    optimizer = optimizer_name(cfg, cuda=target.cuda)
    trainable = estimated_trainable_parameters(cfg, shape)
    parts = {"weights": weight_bytes(cfg, shape, precision)}
    if cfg.method.type != "full":
        parts["adapter"] = trainable * 4  # LoRA's A and B stay fp32
    parts["gradients"] = trainable * 4
    parts["optimizer"] = trainable * OPTIMIZER_STATE_BYTES.get(optimizer, 8)
    if world_size > 1:
        parts["ddp buckets"] = trainable * 4  # DDP's flat copy of the gradients for all-reduce
    per_batch = {b: activation_bytes(cfg, shape, precision, gc, b, target.cuda) for b in set(batches)}
    batch = max(per_batch, key=lambda b: (sum(per_batch[b].values()), b.processed))
    parts.update(per_batch[batch])
    return MemoryEstimate(precision, gc, optimizer, (batch.sequences, batch.tokens), batch.predicted, parts)


@dataclass
class Fit:
    memory_bytes: int
    needed_bytes: int  # the estimate plus the CUDA reserve
    fits: bool
    verdict: str


def _smaller_micro_batches(
    cfg: TrainerConfig, examples: list[data_mod.Example]
) -> Iterator[tuple[str, list[MicroBatch]]]:
    """Advice and the micro-batches it would make: halving training.batchTokens (packing: the rows repacked
    as the trainer would pack them) or batchSize (gradientAccumulationSteps raised to keep the global batch)."""
    t = cfg.training
    if cfg.dataset.packing:
        budget, longest = cfg.packed_row_tokens(), max(len(e.input_ids) for e in examples)
        for smaller in (budget // 2**k for k in range(1, 13)):
            if smaller < longest:  # an example longer than the budget gets a row of its own anyway
                return
            keep = math.ceil(t.gradient_accumulation_steps * budget / smaller)
            trial = cfg.model_copy(update={"training": t.model_copy(update={"batch_tokens": smaller})})
            features = data_mod.as_features(examples, smaller, packing=True)
            yield (
                f"lower training.batchTokens to {smaller} (gradientAccumulationSteps {keep} keeps the tokens per step)",
                micro_batches(trial, features),
            )
        return
    features = data_mod.as_features(examples, cfg.packed_row_tokens(), packing=False)
    for smaller in (t.batch_size // 2**k for k in range(1, 13)):
        if smaller < 1:
            return
        keep = t.gradient_accumulation_steps * t.batch_size // smaller
        trial = cfg.model_copy(update={"training": t.model_copy(update={"batch_size": smaller})})
        yield (
            f"lower batchSize to {smaller} (gradientAccumulationSteps {keep} keeps the global batch)",
            micro_batches(trial, features),
        )


def fit(
    cfg: TrainerConfig,
    shape: ModelShape,
    target: Target,
    estimate: MemoryEstimate,
    world_size: int,
    examples: list[data_mod.Example],
    batches: list[MicroBatch],
) -> Fit | None:
    if target.memory_bytes is None:
        return None
    reserve = CUDA_RESERVE_BYTES if target.cuda else 0
    needed = estimate.peak_bytes + reserve
    spare = target.memory_bytes - needed
    if spare >= 0:
        return Fit(target.memory_bytes, needed, True, f"fits with {spare / GIB:.1f} GiB to spare")
    advice = []
    for text, smaller in _smaller_micro_batches(cfg, examples):
        trial = estimate_memory(cfg, shape, target, smaller, world_size, checkpointing=estimate.gradient_checkpointing)
        if trial.peak_bytes + reserve <= target.memory_bytes:
            advice.append(text)
            break
    if not estimate.gradient_checkpointing:
        trial = estimate_memory(cfg, shape, target, batches, world_size, checkpointing=True)
        if trial.peak_bytes + reserve <= target.memory_bytes:
            advice.append("turn on gradientCheckpointing")
    if cfg.method.type != "qlora":
        advice.append("use method.type qlora")
    fixed = estimate.peak_bytes - estimate.parts["activations"] - estimate.parts["logits"] + reserve
    if fixed > target.memory_bytes:  # no batch shape helps
        advice.append(f"use a GPU with more memory (weights and training state alone take {fixed / GIB:.1f} GiB)")
    elif not advice:
        advice.append("lower dataset.maxLength, or use a GPU with more memory")
    short = -spare / GIB
    return Fit(target.memory_bytes, needed, False, f"does not fit ({short:.1f} GiB short): {' or '.join(advice)}")


# -- local disk ------------------------------------------------------------------------------------

# A stored weight's bytes by the config's dtype (safetensors keep it); fp32 where the config names none.
STORED_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
DISK_HEADROOM_BYTES = 2 * GIB  # the data files, the tokenizer, logs, Python's caches


@dataclass
class DiskEstimate:
    """What one trainer pod writes to its local disk at the peak (the model download, the resume copy of a
    checkpoint and two local checkpoints while one uploads, the outputs)."""

    parts: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())


def stored_dtype_bytes(model_config: Any) -> int:
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    return STORED_DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 4)


def estimate_disk(cfg: TrainerConfig, shape: ModelShape, model_config: Any, optimizer: str) -> DiskEstimate:
    trainable = estimated_trainable_parameters(cfg, shape)
    state = OPTIMIZER_STATE_BYTES.get(optimizer, 8)
    # A checkpoint: the trained weights (an adapter in fp32, or the whole model) and the optimizer's state.
    checkpoint = trainable * (4 + state) if cfg.method.type != "full" else shape.total_params * (2 + state)
    parts = {
        "model download": shape.total_params * stored_dtype_bytes(model_config),
        # the Trainer keeps two local checkpoints (save_total_limit 2); a resumed run also holds the one it read
        "checkpoints": 3 * checkpoint,
        "adapter" if cfg.method.type != "full" else "model": (
            trainable * 4 if cfg.method.type != "full" else shape.total_params * 2
        ),
    }
    if cfg.output.merge_adapter:
        parts["merged model"] = shape.total_params * 2  # a 16-bit copy of the base with the adapter merged
    parts["headroom"] = DISK_HEADROOM_BYTES
    return DiskEstimate(parts)


# transformers loads safetensors one shard at a time; Hugging Face's default shard is 5 GB.
SHARD_BYTES = 5 * 10**9
# Python, torch, CUDA's host side, the tokenizer and the dataset in memory: measured runs sit at 2-4 GiB.
HOST_RUNTIME_BYTES = 4 * GIB


@dataclass
class HostMemoryEstimate:
    """The pod's memory (not the GPU's) at its peak: loading the base a shard at a time, or, with
    output.mergeAdapter, the whole base in 16 bits on the host to merge the adapter into it (`artifacts`)."""

    parts: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())


def estimate_host_memory(cfg: TrainerConfig, shape: ModelShape, model_config: Any) -> HostMemoryEstimate:
    stored = shape.total_params * stored_dtype_bytes(model_config)
    peak = {"model load (a shard)": min(stored, SHARD_BYTES)}
    if cfg.output.merge_adapter and cfg.method.type != "full":
        peak = {"merge (16-bit base)": shape.total_params * 2}
    return HostMemoryEstimate({**peak, "runtime and data": HOST_RUNTIME_BYTES})


# -- time ------------------------------------------------------------------------------------------


@dataclass
class Eta:
    flops_per_token: float
    tokens: int  # processed over the whole run, padding included
    utilisation: tuple[float, float]
    seconds: tuple[float, float]  # fastest, slowest
    peak_flops: float  # of all the run's GPUs, or of this CPU at the run's dtype
    device: str  # what the peak is of: "the GPU's bf16 peak", "this CPU's measured bf16 GEMM rate"


def eta(cfg: TrainerConfig, shape: ModelShape, target: Target, run: Schedule, data: DataPlan, precision: str,
        checkpointing: bool) -> Eta | None:  # fmt: skip
    """Training FLOPs over the GPUs' peak (or this CPU's measured GEMM rate) at an assumed utilisation; None for
    a target without either (a GPU known by its memory alone). A forward pass costs 2 FLOPs per weight per token
    (the head's only at the positions whose logits are computed; plus attention, 4 x layers x q_dim x the mean
    context within an example); backward costs twice that for full fine-tuning, about once for (Q)LoRA
    (gradients of the activations only, the base is frozen); gradient checkpointing adds one more forward."""
    if target.gpu is not None:
        peak = target.gpu.bf16_tflops * 1e12 * run.world_size
        utilisation, device = UTILISATION[cfg.method.type], f"the GPU's {precision} peak"
    elif target.cpu is not None:
        peak = target.cpu.flops * run.world_size
        utilisation = CPU_UTILISATION
        device = f"this CPU's measured {target.cpu.dtype} GEMM rate ({target.cpu.flops / 1e9:.0f} GFLOP/s)"
    else:
        return None
    head = (shape.head_params or shape.vocab * shape.hidden) * data.predicted_tokens / max(data.processed_tokens, 1)
    context = data.real_tokens / max(data.examples, 1) / 2  # causal: a token attends to half its example
    forward = 2 * (shape.linear_params + head) + 4 * shape.layers * shape.q_dim * context
    passes = (3 if cfg.method.type == "full" else 2) + (1 if checkpointing else 0)
    per_token = forward * passes
    # An epoch processes every sequence once, in steps_per_epoch steps (fewer micro-batches than a global batch
    # when the data is small: the last step of an epoch takes what is left).
    tokens = int(data.processed_tokens * run.total_steps / run.steps_per_epoch)
    low, high = utilisation
    work = per_token * tokens
    return Eta(per_token, tokens, utilisation, (work / (peak * high), work / (peak * low)), peak, device)


def as_json(value: Any) -> Any:
    """Dataclasses to plain JSON values."""
    if is_dataclass(value) and not isinstance(value, type):
        out = {f.name: as_json(getattr(value, f.name)) for f in fields(value)}
        for name in dir(type(value)):  # derived numbers too (packing efficiency, peak bytes)
            if isinstance(getattr(type(value), name, None), property):
                out[name] = as_json(getattr(value, name))
        return out
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    return value


# -- the whole plan --------------------------------------------------------------------------------


@dataclass
class Plan:
    target: Target
    data: DataPlan | None
    rejected: list[str]  # the trainer's messages for the first bad rows (the run would stop at the first)
    rejected_count: int
    schedule: Schedule | None = None
    parameters: dict[str, int] = field(default_factory=dict)
    memory: MemoryEstimate | None = None
    fit: Fit | None = None
    eta: Eta | None = None
    disk: DiskEstimate | None = None
    host_memory: HostMemoryEstimate | None = None

    @property
    def ok(self) -> bool:
        return self.rejected_count == 0


REJECTED_SHOWN = 5


def refuse_unplannable(cfg: TrainerConfig) -> None:
    """PlanError for a run this module does not model, rather than a plan that would be wrong."""
    if cfg.objective.effective_dpo() is not None:
        # DPO reads preference pairs (`preference.tokenize`), trains on a chosen and a rejected sequence per
        # pair with a reference forward pass, and TRL computes its logits over every position: none of which
        # the data plan, the schedule or the memory estimate here describe, and no run has measured them.
        raise PlanError(
            "objective dpo: kubetune plan estimates supervised fine-tuning (objective sft) only; for a DPO job "
            "it has no data plan, schedule or memory estimate yet (`kubetune run --max-steps` on a small slice "
            "measures one)"
        )


def make_plan(
    cfg: TrainerConfig,
    train_rows: list[data_mod.Row],
    eval_rows: list[data_mod.Row],
    tokenizer: Any,
    model_config: Any,
    target: Target,
    world_size: int = 1,
) -> Plan:
    """Everything `kubetune plan` reports. Bad rows give a plan with `rejected` set and nothing else."""
    from kubetune_trainer.errors import InvalidInput

    refuse_unplannable(cfg)
    try:
        data, train, batches = plan_data(cfg, train_rows, eval_rows, tokenizer)
    except InvalidInput as exc:
        if exc.error.line is None:  # not a row's fault (empty data, no chat template, maxLength): as it is
            return Plan(target, None, [exc.error.message], 1)
        shown, count = rejected_rows([*train_rows, *eval_rows], cfg, tokenizer, REJECTED_SHOWN)
        return Plan(target, None, shown or [exc.error.message], max(count, 1))
    run = schedule(cfg, data.sequences, world_size, has_eval=bool(eval_rows))
    try:
        shape = model_shape(model_config, cfg)
    except InvalidInput as exc:
        return Plan(target, data, [exc.error.message], 1)
    estimate = estimate_memory(cfg, shape, target, batches, world_size)
    return Plan(
        target,
        data,
        [],
        0,
        run,
        {"total": shape.total_params, "trainable": estimated_trainable_parameters(cfg, shape)},
        estimate,
        fit(cfg, shape, target, estimate, world_size, train.examples, batches),
        eta(cfg, shape, target, run, data, estimate.precision, estimate.gradient_checkpointing),
        estimate_disk(cfg, shape, model_config, estimate.optimizer),
        estimate_host_memory(cfg, shape, model_config),
    )
