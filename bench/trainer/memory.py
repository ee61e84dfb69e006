"""Where a training step's memory goes: one micro-batch through kubetune's model, measured by kind.

    python bench/trainer/memory.py                         # SmolLM2-135M-Instruct, CRD defaults, one 2,048-token row
    python bench/trainer/memory.py --tokens 1024           # a shorter row
    python bench/trainer/memory.py --result bench/results/trainer-memory-DATE.json
    python bench/trainer/memory.py --model DIR             # another model directory

Loads the model exactly as the trainer does (`kubetune_trainer.model.load_model` with the CRD's defaults: QLoRA
nf4, bf16, LoRA r 16 on every linear layer, packing), packs real rows of the bench's Alpaca-shaped data into one
row, and runs one forward and backward. Measured:

- the model's own bytes (quantized weights, unquantized weights, adapters);
- every tensor autograd saves for the backward pass, attributed to the innermost module that saved it
  (`torch.autograd.graph.saved_tensors_hooks`), grouped by kind: attention, LoRA inputs, MLP, norms,
  the output head and loss;
- the process's RSS before, after the forward pass and at the end, and its peak (`ru_maxrss`).

Each configuration runs in a fresh process (`--variant`), so peaks do not mix.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "trainer")]

from bench.trainer import workload as wl  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "without-fused-loss": {},  # the model's own head and loss (KUBETUNE_SPEEDUPS_OFF=fused-loss)
    "gradient-checkpointing": {"gradientCheckpointing": True},
}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kind(module_name: str, causal_lm: str) -> str:
    """The group a module's saved tensors count under."""
    parts = module_name.split(".")
    if "lora_A" in parts or "lora_B" in parts or "lora_dropout" in parts:
        return "LoRA adapters (dropped inputs, rank-r activations)"
    if "self_attn" in parts:
        return "attention (q/k/v/o projections, scores)"
    if "mlp" in parts:
        return "MLP (gate/up/down projections, activation)"
    if any(p.endswith("norm") for p in parts):
        return "RMSNorm"
    if "lm_head" in parts:
        return "output head (logits)"
    if parts[-1].isdigit():
        return "decoder layers' inputs (the checkpoints, with gradient checkpointing)"
    if module_name == causal_lm:
        return "the causal LM's loss (fp32 logits, log-softmax)"
    return "other (" + (parts[-1] if parts[-1] else "top") + ")"


def measure(
    tokens: int,
    training: dict[str, Any],
    without_fused_loss: bool = False,
    model_dir: Path | None = None,
    work: Path = wl.WORK,
) -> dict[str, Any]:
    """One forward and backward of the largest packed row of at most `tokens` tokens (model: SmolLM2 unless
    `model_dir`)."""
    import torch

    from kubetune_cli.pretrained import smollm2_dir
    from kubetune_trainer import data as data_mod
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.model import load_model, load_tokenizer

    torch.set_num_threads(2)
    if without_fused_loss:
        from kubetune_trainer import runtime

        os.environ[runtime.SPEEDUPS_OFF_ENV] = "fused-loss"
    model_dir = model_dir or smollm2_dir()
    data = wl.prepare_pretrained(model_dir, work)
    cfg = TrainerConfig.model_validate(
        {
            "model": {"source": str(model_dir)},
            "dataset": {"train": str(data.train_file), "maxLength": tokens},  # 2,048 is the CRD's default
            "output": {"destination": "/nonexistent"},
            "training": training,
        }
    )
    start = rss()
    tokenizer = load_tokenizer(model_dir, False)
    model = load_model(model_dir, cfg, "bf16")
    model.train()
    loaded = rss()
    weights: collections.Counter[str] = collections.Counter()
    for tensor in [*model.parameters(), *model.buffers()]:
        group = "adapters (trainable)" if tensor.requires_grad else f"frozen {str(tensor.dtype).replace('torch.', '')}"
        weights[group] += tensor.numel() * tensor.element_size()

    # The trainer's own path: rows -> examples -> packed rows (the largest first) -> its collator's batch,
    # which keeps logits at the label positions only (`logits_to_keep`).
    rows = [data_mod.Row(r, "train.jsonl", i + 1) for i, r in enumerate(wl.read_jsonl(data.train_file))]
    examples = data_mod.tokenize(rows, cfg.dataset, tokenizer).examples
    feature = max(data_mod.pack(examples, tokens), key=lambda f: len(f["input_ids"]))
    batch = data_mod.Collator(tokenizer.pad_token_id)([feature])
    ids = feature["input_ids"]

    saved: collections.Counter[str] = collections.Counter()
    seen: set[int] = set()
    current = ["<top>"]
    names = {module: name for name, module in model.named_modules()}
    causal_lm = next(name for name, module in model.named_modules() if "lm_head" in module._modules)

    def enter(module: Any, _args: Any) -> None:
        current.append(names.get(module, "?"))

    def leave(module: Any, _args: Any, _out: Any) -> None:
        current.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and not isinstance(tensor, torch.nn.Parameter):
            seen.add(key)
            saved[kind(current[-1], causal_lm)] += storage.nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    forward = rss()
    loss_logits = 0 if out.logits is None else out.logits.numel() * out.logits.element_size()
    out.loss.backward()
    for hook in hooks:
        hook.remove()
    return {
        "tokens": len(ids),
        "label_positions": int(batch["logits_to_keep"].sum()),
        "rss_before_load_bytes": start,
        "rss_model_loaded_bytes": loaded,
        "rss_after_forward_bytes": forward,
        "rss_after_backward_bytes": rss(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "model_bytes": dict(weights),
        "saved_for_backward_bytes": dict(saved.most_common()),
        "saved_for_backward_total_bytes": sum(saved.values()),
        "logits_bytes": loss_logits,
    }


def report(name: str, r: dict[str, Any]) -> str:
    mib = 2**20
    lines = [f"## {name}: one row of {r['tokens']} tokens ({r['label_positions']} with a label)"]
    lines.append(f"peak RSS {r['peak_rss_bytes'] / mib:.0f} MiB")
    lines.append(
        f"RSS: start {r['rss_before_load_bytes'] / mib:.0f}, "
        f"model loaded {r['rss_model_loaded_bytes'] / mib:.0f}, "
        f"after forward {r['rss_after_forward_bytes'] / mib:.0f}, "
        f"after backward {r['rss_after_backward_bytes'] / mib:.0f} MiB"
    )
    for group, size in r["model_bytes"].items():
        lines.append(f"  model: {group:<60} {size / mib:8.0f} MiB")
    for group, size in r["saved_for_backward_bytes"].items():
        lines.append(f"  saved: {group:<60} {size / mib:8.0f} MiB")
    lines.append(f"  saved for backward in all: {r['saved_for_backward_total_bytes'] / mib:.0f} MiB")
    lines.append(f"  the logits tensor the model returns: {r['logits_bytes'] / mib:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens in the packed row (default 2048)")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="default: all")
    parser.add_argument("--one", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--model", type=Path, help="a model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--result", type=Path)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.tokens, VARIANTS[args.one], args.one == "without-fused-loss", args.model)))
        return 0
    results = {}
    for name in args.variant or list(VARIANTS):
        child = [sys.executable, __file__, "--one", name, "--tokens", str(args.tokens)]
        child += ["--model", str(args.model)] if args.model else []
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        out = subprocess.run(child, check=True, capture_output=True, text=True, env=env, cwd=REPO).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(report(name, results[name]), flush=True)
    if args.result:
        args.result.write_text(json.dumps({"command": " ".join(sys.argv), "variants": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
