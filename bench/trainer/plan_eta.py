"""`kubetune plan`'s ETA on a CPU against real runs: the plan's range, then the same config trained and timed.

    python bench/trainer/plan_eta.py                       # SmolLM2-135M-Instruct, every case, 6 steps each
    python bench/trainer/plan_eta.py --result bench/results/plan-cpu-eta-DATE.json
    python bench/trainer/plan_eta.py --model DIR --steps 2 # another model directory

For each case (the CRD's method defaults, then one change each), in a fresh process: the plan is made exactly as
`kubetune plan` makes it for a CPU run (`plan_target`: this CPU's GEMM rate measured at the run's compute dtype,
`make_plan`), then the trainer trains the same config for `--steps` optimizer steps, each one packed row of
1,024 tokens (`--max-length`; the bench's Alpaca-shaped rows), and `trainer.train()` is timed (model loading and
data preparation are not in the ETA). The result gives, per case, the plan's fastest and slowest time, the
measured time, and the utilisation that time implies (`plan.CPU_UTILISATION` is set from these).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "trainer"), str(REPO / "cli"), str(REPO / "operator")]

from bench.trainer import workload as wl  # noqa: E402

THREADS = 2
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # method, training (over the CRD's defaults)
    "qlora-defaults": ({}, {}),
    "qlora-checkpointing": ({}, {"gradientCheckpointing": True}),
    "lora": ({"type": "lora"}, {}),
    "full": ({"type": "full"}, {"learningRate": 1e-5}),
}


def measure(case: str, steps: int, model_dir: Path, work: Path, max_length: int = 1024) -> dict[str, Any]:
    """One case: the plan's ETA for `steps` steps on this CPU, and the time `trainer.train()` takes for them."""
    import torch
    from transformers import AutoConfig

    from kubetune_cli.plan import plan_target
    from kubetune_operator.api import FineTuneJob
    from kubetune_trainer import plan
    from kubetune_trainer import train as train_mod
    from kubetune_trainer.checkpoints import StopRequest
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.server import Telemetry
    from kubetune_trainer.storage import Storage

    torch.set_num_threads(THREADS)
    data = wl.prepare_pretrained(model_dir, work)
    method, training = CASES[case]
    spec = {
        "model": {"source": str(model_dir)},
        "dataset": {"train": str(data.train_file), "maxLength": max_length, "evalSplit": 0},
        "method": method,
        "training": {
            "maxSteps": steps,
            "gradientAccumulationSteps": 1,
            "logEverySteps": 1,
            "checkpointEverySteps": 1000,
            **training,
        },
        "output": {"destination": str(work / "out" / case)},
        "resources": {"gpus": 0},
    }
    job = FineTuneJob.model_validate({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
                                      "metadata": {"name": case}, "spec": spec})  # fmt: skip
    cfg = TrainerConfig.model_validate({key: spec[key] for key in ("model", "dataset", "method", "training", "output")})
    with tempfile.TemporaryDirectory(prefix="plan-eta-") as scratch:
        ctx = train_mod.Context(
            cfg, Path(scratch), Storage(cfg.storage), Telemetry(), StopRequest(), train_mod.Distributed()
        )
        prepared = train_mod.setup(ctx)
        target = plan_target(job, cfg, plan, None, None)
        rows = train_mod.data_mod.train_eval_rows(ctx.storage, cfg.dataset, cfg.training.seed, ctx.workdir)
        made = plan.make_plan(cfg, *rows, prepared.tokenizer, AutoConfig.from_pretrained(model_dir), target)
        start = time.perf_counter()
        prepared.trainer.train()
        seconds = time.perf_counter() - start
        state = prepared.trainer.state
    eta = made.eta
    assert eta is not None and made.schedule is not None
    assert state.global_step == made.schedule.total_steps, (state.global_step, made.schedule.total_steps)
    return {
        "case": case,
        "max_length": max_length,
        "steps": state.global_step,
        "precision": made.memory.precision if made.memory else None,
        "gradient_checkpointing": made.memory.gradient_checkpointing if made.memory else None,
        "cpu": {"threads": target.cpu.threads, "dtype": target.cpu.dtype, "gemm_flops": target.cpu.flops},
        "plan_tokens": eta.tokens,
        "trained_tokens": int(state.num_input_tokens_seen),
        "flops_per_token": eta.flops_per_token,
        "plan_seconds": list(eta.seconds),
        "plan_utilisation": list(eta.utilisation),
        "measured_seconds": round(seconds, 2),
        "implied_utilisation": round(eta.flops_per_token * eta.tokens / (seconds * eta.peak_flops), 4),
        "within": eta.seconds[0] <= seconds <= eta.seconds[1],
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: all")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per case (default 6)")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens in a packed row (default 1024)")
    parser.add_argument("--model", type=Path, help="a model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--work", type=Path, default=wl.WORK)
    parser.add_argument("--result", type=Path)
    parser.add_argument("--one", choices=sorted(CASES), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.model is None:
        from kubetune_cli.pretrained import smollm2_dir

        args.model = smollm2_dir()
    if args.one:
        from kubetune_trainer import runtime

        runtime.preload_allocator([sys.executable, *sys.argv])  # as the trainer's entry point does
        runtime.configure(os.environ)
        print(json.dumps(measure(args.one, args.steps, args.model, args.work, args.max_length)))
        return 0
    results = []
    for case in args.case or list(CASES):
        child = [sys.executable, __file__, "--one", case, "--steps", str(args.steps), "--model", str(args.model)]
        child += ["--work", str(args.work), "--max-length", str(args.max_length)]
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
        out = subprocess.run(child, check=True, capture_output=True, text=True, env=env, cwd=REPO).stdout
        result = json.loads(out.strip().splitlines()[-1])
        results.append(result)
        low, high = result["plan_seconds"]
        print(f"{case}: plan {low:.0f}-{high:.0f} s, measured {result['measured_seconds']:.0f} s "
              f"(utilisation {result['implied_utilisation']:.1%}; within: {result['within']})", flush=True)  # fmt: skip
    if args.result:
        document = {"command": " ".join(sys.argv), "model": str(args.model.name), "cases": results}
        args.result.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
