"""The GPU bench: kubetune's QLoRA (nf4, bf16 compute) on a ~1B-parameter Llama, and the seed recipe.

    python bench/gpu/run.py --out DIR          # on an NVIDIA GPU; ~6 minutes; writes DIR/gpu-bench.json
    python bench/gpu/run.py --out DIR --dry-run  # tiny sizes, on the CPU: checks the script works

No network: the model (random, seeded weights) is built from a config and the tokenizer trained locally,
as in the CPU bench (`bench/trainer/workload.py`). Steps:
1. bitsandbytes' CUDA path: nf4 quantize + `matmul_4bit` on the device, checked against a bf16 matmul.
2. kubetune's trainer with its defaults (QLoRA nf4 + double quant, bf16, LoRA r 16 all-linear,
   gradient checkpointing, paged 8-bit AdamW) on sequences packed to 2048 - one row of batchTokens
   (default: maxLength) a micro-batch, attention within each example by torch's varlen flash attention -
   for a fixed number of steps (`--batch-tokens` to set a larger micro-batch, `--without LEVER` to undo
   one of the trainer's fast paths, as in `bench/trainer/kubetune_run.py`):
   real tokens/s, model FLOPs utilization (6 x parameters per token over the GPU's dense bf16 peak),
   peak GPU memory (torch.cuda.max_memory_allocated), beside `kubetune plan`'s estimate of it.
3. The seed recipe (8-bit, r 8 on q/v, padded to 512) on the same GPU and data: real tokens/s, and the ratio.
Also a 2-process all-reduce through torchrun (NCCL on a machine with two GPUs, gloo on the CPU), the collective
multi-node runs depend on; a one-GPU machine records why NCCL was not run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "trainer")]

from bench.trainer import kubetune_run, seed_recipe  # noqa: E402
from bench.trainer import workload as wl  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets; matched by substring.
BF16_PEAK = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 756e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
}
# ~1.0B parameters: TinyLlama's shape (22 layers, 2048 hidden, GQA 32/4) with the local tokenizer's vocabulary.
GPU_MODEL = wl.ModelSize(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=8000,
    max_position_embeddings=4096,
)
GPU_DATA = wl.DataSpec(train_rows=6000, eval_rows=8)


def peak_flops(name: str) -> float | None:
    for key, value in BF16_PEAK.items():  # most specific first
        if key.lower() in name.lower():
            return value
    return None


def bnb_check(device: str) -> dict[str, Any]:
    """nf4 quantize and matmul_4bit on `device`, against the unquantized matmul."""
    import bitsandbytes as bnb
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    weight = torch.randn(1024, 1024, device=device, dtype=dtype) / 32
    x = torch.randn(16, 1024, device=device, dtype=dtype)
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    out = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    ref = x @ weight.t()
    error = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    return {
        "device": str(out.device),
        "packed_device": str(packed.device),
        "relative_error": error,
        "ok": out.device.type == device and error < 0.15,
        "bitsandbytes": bnb.__version__,
    }


ALL_REDUCE_SCRIPT = """
import json, os, time
import torch
import torch.distributed as dist

backend = os.environ["BENCH_BACKEND"]
dist.init_process_group(backend)
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
tensor = torch.full((64 * 1024 * 1024 // 4,), float(rank + 1), device=device)  # 64 MiB of fp32
dist.all_reduce(tensor)  # warm-up
if backend == "nccl":
    torch.cuda.synchronize()
started = time.perf_counter()
for _ in range(5):
    dist.all_reduce(tensor)
if backend == "nccl":
    torch.cuda.synchronize()
seconds = (time.perf_counter() - started) / 5
if rank == 0:
    print("ALLREDUCE " + json.dumps({"backend": backend, "world_size": world, "value": tensor[0].item(),
                                     "bytes": tensor.numel() * 4, "seconds_per_all_reduce": seconds}), flush=True)
dist.destroy_process_group()
"""


def distributed_check(cuda: bool, work: Path) -> dict[str, Any]:
    """A 2-process all-reduce through torchrun: NCCL with one GPU per process where the machine has two GPUs,
    gloo on the CPU otherwise (what multi-node runs use without GPUs). NCCL cannot put two ranks on one GPU,
    so a one-GPU machine records why the NCCL check did not run."""
    import torch

    gpus = torch.cuda.device_count() if cuda else 0
    if cuda and gpus < 2:
        return {"ok": None, "backend": "nccl", "not_run": f"NCCL needs one GPU per process; this machine has {gpus}"}
    backend = "nccl" if cuda else "gloo"
    script = work / "all_reduce.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(ALL_REDUCE_SCRIPT)
    env = {**os.environ, "BENCH_BACKEND": backend, "OMP_NUM_THREADS": "1"}
    if not cuda:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("ALLREDUCE ")]
    if done.returncode != 0 or not lines:
        return {"ok": False, "backend": backend, "exit_code": done.returncode, "log": done.stderr[-2000:]}
    result = json.loads(lines[-1].removeprefix("ALLREDUCE "))
    # Rank r starts with r + 1: the warm-up sums (1, 2) to 3, and each of the 5 timed all-reduces doubles it.
    result["ok"] = result["value"] == 3 * 2**5
    result["bus_gbytes_per_second"] = result["bytes"] / result["seconds_per_all_reduce"] / 1e9
    return result


def planned_memory(run: dict[str, Any], model_dir: Path, device: str, cuda: bool) -> dict[str, Any]:
    """`kubetune plan`'s estimate of the run's peak GPU memory, beside the peak it measured
    (torch.cuda.max_memory_allocated): the estimate's error on a real GPU."""
    from transformers import AutoConfig

    from kubetune_trainer import plan
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.data import train_eval_rows
    from kubetune_trainer.model import load_tokenizer
    from kubetune_trainer.storage import Storage

    cfg = TrainerConfig.model_validate(run["config"])
    rows = train_eval_rows(Storage(cfg.storage), cfg.dataset, cfg.training.seed, model_dir.parent)
    target = plan.Target(
        cuda=cuda, memory_bytes=None, gpu=next((g for g in plan.GPUS.values() if g.name.split("-")[0] in device), None)
    )
    result = plan.make_plan(cfg, *rows, load_tokenizer(model_dir, False), AutoConfig.from_pretrained(model_dir), target)
    assert result.memory is not None, result.rejected
    estimate, measured = result.memory.peak_bytes, run.get("peak_gpu_memory_bytes")
    return {
        "estimated_peak_bytes": estimate,
        "measured_peak_bytes": measured,
        "error": round(estimate / measured - 1, 4) if measured else None,
        "parts": result.memory.parts,
        "precision": result.memory.precision,
        "gradient_checkpointing": result.memory.gradient_checkpointing,
        "optimizer": result.memory.optimizer,
        "batch_shape": result.memory.batch_shape,
        "planned_steps": result.schedule.total_steps if result.schedule else None,
    }


def reset_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu-bench.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, few steps, CPU allowed")
    parser.add_argument("--steps", type=int, help="kubetune optimizer steps (default 30; dry run 2)")
    parser.add_argument("--seed-examples", type=int, help="examples for the seed recipe (default 256; dry run 8)")
    parser.add_argument("--work", type=Path, help="work directory (default: OUT/work)")
    parser.add_argument("--batch-tokens", type=int, help="training.batchTokens for kubetune (default: unset)")
    parser.add_argument("--without", action="append", default=[], choices=kubetune_run.LEVERS,
                        help="undo one of kubetune's fast paths (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        parser.error("no CUDA device; use --dry-run to check the script on a CPU")
    device = "cuda" if cuda else "cpu"
    steps = args.steps or (2 if args.dry_run else 30)
    seed_examples = args.seed_examples or (8 if args.dry_run else 256)
    size, data = (wl.SMOKE_MODEL, wl.SMOKE_DATA) if args.dry_run else (GPU_MODEL, GPU_DATA)
    max_length = 256 if args.dry_run else 2048
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    started = time.monotonic()
    report: dict[str, Any] = {
        "command": "python bench/gpu/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    peak = peak_flops(report["device"]) if cuda else None
    report["bf16_peak_flops"] = peak
    report["bitsandbytes_check"] = bnb_check(device)
    print("bitsandbytes:", report["bitsandbytes_check"], flush=True)
    report["distributed_check"] = distributed_check(cuda, args.work or args.out / "work")
    print("distributed:", report["distributed_check"], flush=True)

    workload = wl.prepare(work, size, data)
    params = wl.parameter_counts(workload.model_dir)
    report["model"] = {"config": size.__dict__, "parameters": params}
    print(f"model: {params['total'] / 1e9:.3f}B parameters; setup {time.monotonic() - started:.0f} s", flush=True)

    # kubetune: defaults, packed to 2048, a fixed number of steps over (more than) enough rows.
    reset_gpu()
    kubetune = kubetune_run.train(
        str(workload.model_dir),
        str(workload.train_file),
        str(args.out / "kubetune"),
        variant="defaults",
        max_length=max_length,
        max_steps=steps,
        levers_off=args.without,
        training={"batchTokens": args.batch_tokens} if args.batch_tokens else None,
    )
    kubetune["real_tokens_per_second"] = kubetune["real_tokens"] / kubetune["train_seconds"]
    if peak:
        kubetune["mfu"] = kubetune["real_tokens_per_second"] * 6 * params["matmul"] / peak
    kubetune["plan"] = planned_memory(kubetune, workload.model_dir, report["device"], cuda)
    report["kubetune"] = kubetune
    from kubetune_trainer import attention

    report["kubetune_attention"] = (
        "sdpa over whole rows (--without segments)"
        if "segments" in args.without
        else "torch varlen flash attention"
        if attention._varlen_available(torch.empty(1, device=device))
        else "sdpa per example"
    )
    print("kubetune:", {k: kubetune.get(k) for k in ("real_tokens_per_second", "mfu", "peak_gpu_memory_bytes")})
    print("plan:", kubetune["plan"], flush=True)

    # The seed recipe on the same GPU (8-bit, r 8 q/v, 512-padded), on fewer examples: it is slower.
    reset_gpu()
    seed = seed_recipe.train(
        str(workload.model_dir), str(workload.train_subset(seed_examples)), str(args.out / "seed"), use_cpu=not cuda
    )
    seed["real_tokens_per_second"] = seed["real_tokens"] / seed["train_seconds"]
    if cuda:
        seed["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    if peak:
        seed["mfu"] = seed["real_tokens_per_second"] * 6 * params["matmul"] / peak
    report["seed"] = seed
    report["ratio_kubetune_vs_seed"] = kubetune["real_tokens_per_second"] / seed["real_tokens_per_second"]
    report["seconds"] = round(time.monotonic() - started, 1)
    (args.out / "gpu-bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(
        f"ratio kubetune/seed {report['ratio_kubetune_vs_seed']:.2f}x; {report['seconds']:.0f} s; "
        f"{args.out / 'gpu-bench.json'}"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
