"""Where a kubetune training run spends its CPU time: torch.profiler over `Trainer.train` on the bench workload.

Runs one kubetune contender (`kubetune_run.py`'s variants and `--without` levers) on the same model and
examples as `run.py`, records self CPU time per operator during training only (model loading, saving and
evaluation are outside), and prints the top operators and the share of each group (attention, matmul,
casts, dropout, 4-bit/8-bit dequantization, elementwise, optimizer). The profiler's own per-op overhead
inflates small operators, so compare shares between configurations, not times with `run.py`.

Usage: python bench/trainer/op_profile.py [--data long] [--examples 64] [--variant defaults] [--without L ...]
       [--shapes] [--result FILE]   (FILE collects the profiles of several invocations)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from bench.trainer import kubetune_run
    from bench.trainer import workload as wl
    from bench.trainer.run import machine
except ModuleNotFoundError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "trainer"))
    from bench.trainer import kubetune_run
    from bench.trainer import workload as wl
    from bench.trainer.run import machine

# Operator name fragments -> group, first match wins (aten names as the CPU profiler records them).
GROUPS = (
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("attention", ("attention", "sdpa", "flash", "_efficient", "softmax")),
    ("dequantize", ("bitsandbytes", "dequant", "int8", "quant", "nf4")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("dropout", ("bernoulli", "dropout", "native_dropout", "aten::random_")),
    ("cast/copy", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous")),
    ("optimizer", ("_foreach", "adam", "Optimizer.step", "aten::addcdiv", "aten::lerp", "aten::sqrt")),
    ("norm", ("rsqrt", "aten::pow", "aten::mean", "rms_norm")),
    (
        "elementwise",
        (
            "aten::mul",
            "aten::add",
            "aten::silu",
            "aten::sub",
            "aten::div",
            "aten::neg",
            "aten::cat",
            "aten::sum",
            "aten::fill_",
            "aten::zero_",
            "aten::where",
            "aten::embedding",
        ),
    ),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, fragments in GROUPS:
        if any(fragment.lower() in lowered for fragment in fragments):
            return group
    return "other"


def profiled_train(
    variant: str, levers_off: list[str], model_dir: str, train_file: str, out: str, *, shapes: bool = False
) -> dict[str, Any]:
    """Train once under the profiler; returns the contender's result and the profile's operator rows."""
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    recorded: dict[str, Any] = {}
    original = transformers.Trainer.train

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:  # Trainer.train under the profiler
        started = time.monotonic()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
            result = original(self, *args, **kwargs)
        recorded["profiled_seconds"] = time.monotonic() - started
        recorded["events"] = prof.key_averages(group_by_input_shape=shapes)
        return result

    transformers.Trainer.train = train  # type: ignore[method-assign]
    result = kubetune_run.train(model_dir, train_file, out, variant=variant, levers_off=levers_off)
    events = recorded["events"]
    total = sum(e.self_cpu_time_total for e in events)
    ops = sorted(
        (
            {
                "name": e.key,
                **({"shapes": str(e.input_shapes)} if shapes else {}),
                "group": group_of(e.key),
                "calls": e.count,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
            }
            for e in events
            if e.self_cpu_time_total > 0
        ),
        key=lambda op: -op["self_cpu_ms"],
    )
    groups: dict[str, float] = {}
    for op in ops:
        groups[op["group"]] = groups.get(op["group"], 0.0) + op["self_cpu_ms"]
    torch_threads = torch.get_num_threads()
    return {
        "contender": result["contender"],
        "real_tokens": result["real_tokens"],
        "optimizer_steps": result["optimizer_steps"],
        "profiled_seconds": round(recorded["profiled_seconds"], 2),
        "torch_threads": torch_threads,
        "self_cpu_ms_total": round(total / 1e3, 1),
        "groups": {
            g: {"self_cpu_ms": round(ms, 1), "share": round(ms * 1e3 / total, 4)}
            for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])
        },
        "top_ops": [
            {**op, "self_cpu_ms": round(op["self_cpu_ms"], 1), "share": round(op["self_cpu_ms"] * 1e3 / total, 4)}
            for op in ops[:30]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(wl.DATA_SETS), default="alpaca")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--variant", choices=sorted(kubetune_run.VARIANTS), default="defaults")
    parser.add_argument("--without", action="append", default=[], choices=kubetune_run.LEVERS)
    parser.add_argument("--work", type=Path, default=wl.WORK)
    parser.add_argument("--shapes", action="store_true", help="one row per operator and input shapes")
    parser.add_argument("--result", type=Path, help="write the profile as JSON here")
    args = parser.parse_args(argv)
    workload = wl.prepare(args.work, wl.ModelSize(), wl.DATA_SETS[args.data])
    train_file = workload.train_subset(args.examples)
    with tempfile.TemporaryDirectory() as out:
        report = profiled_train(
            args.variant, args.without, str(workload.model_dir), str(train_file), out, shapes=args.shapes
        )
    report["data_set"], report["examples"] = args.data, args.examples
    print(
        f"{report['contender']} on {args.data} ({args.examples} examples, {report['real_tokens']} real tokens): "
        f"{report['profiled_seconds']} s profiled, {report['self_cpu_ms_total']:.0f} ms self CPU"
    )
    for group, row in report["groups"].items():
        print(f"  {group:12s} {row['share'] * 100:5.1f} %  {row['self_cpu_ms']:9.1f} ms")
    for op in report["top_ops"][:20]:
        shape = f"  {op['shapes'][:70]}" if args.shapes else ""
        print(f"    {op['name'][:48]:48s} {op['group']:12s} {op['share'] * 100:5.1f} %  {op['calls']:7d} calls{shape}")
    if args.result:  # one file holds several profiles, one list entry per run, in the order they ran
        args.result.parent.mkdir(parents=True, exist_ok=True)
        profiles = json.loads(args.result.read_text())["profiles"] if args.result.exists() else []
        command = " ".join(["python bench/trainer/op_profile.py", *(argv if argv is not None else sys.argv[1:])])
        report = {"command": command, "date": dt.date.today().isoformat(), "load_average": os.getloadavg(), **report}
        args.result.write_text(json.dumps({"machine": machine(), "profiles": [*profiles, report]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
