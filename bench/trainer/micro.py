"""Micro-benchmarks of two CPU choices of the trainer, on this machine.

- attention: forward + backward of one causal example ([1, 4 heads, L, 64], the bench model's heads) with
  torch's CPU sdpa, in bf16 (flash and math backends) and in fp32 with the casts from and to bf16
  included. Alone fp32 wins for short examples; inside the model it did not (`op_profile.py`, 2026-12-03:
  +7 % self CPU), so segment attention stays in the compute dtype - rerun this where the kernels differ
  (AMX, a newer torch);
- dropout: torch's dropout (`bernoulli_` mask) against `speedups.dropout` (16-bit uniforms from 64-bit draws)
  on a [2048, 256] bf16 activation, forward + backward.

Each figure is the median of `--reps` timings of `--inner` calls. Usage:
python bench/trainer/micro.py [--result bench/results/trainer-micro-DATE.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "trainer"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LENGTHS = (32, 64, 128, 192, 256, 320, 384, 512, 768, 1024, 2048)


def milliseconds(fn: Callable[[], Any], reps: int, inner: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - started) / inner * 1e3)
    return round(statistics.median(times), 4)


def attention(reps: int, inner: int) -> list[dict[str, Any]]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for length in LENGTHS:
        # the model's layout: projections viewed as [1, L, heads, 64] and transposed
        q, k, v = (torch.randn(1, length, 4, 64, dtype=torch.bfloat16).transpose(1, 2).requires_grad_() for _ in "qkv")

        def bf16(q: Any = q, k: Any = k, v: Any = v) -> None:
            sdpa(q, k, v, is_causal=True).sum().backward()

        def fp32(q: Any = q, k: Any = k, v: Any = v) -> None:
            sdpa(q.float(), k.float(), v.float(), is_causal=True).to(torch.bfloat16).sum().backward()

        def math(q: Any = q, k: Any = k, v: Any = v) -> None:
            with sdpa_kernel(SDPBackend.MATH):
                sdpa(q, k, v, is_causal=True).sum().backward()

        timed = {"bf16_ms": bf16, "fp32_ms": fp32, "bf16_math_backend_ms": math}
        rows.append({"tokens": length, **{name: milliseconds(fn, reps, inner) for name, fn in timed.items()}})
    return rows


def dropout(reps: int, inner: int) -> dict[str, Any]:
    import torch

    from kubetune_trainer.speedups import dropout as cheap

    x = torch.randn(2048, 256, dtype=torch.bfloat16, requires_grad=True)
    return {
        "shape": [2048, 256],
        "torch_ms": milliseconds(lambda: torch.nn.functional.dropout(x, 0.05, True).sum().backward(), reps, inner),
        "kubetune_ms": milliseconds(lambda: cheap(x, 0.05).sum().backward(), reps, inner),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench.trainer.run import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--result", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    report = {
        "command": " ".join(["python bench/trainer/micro.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "attention_forward_backward": attention(args.reps, args.inner),
        "dropout_forward_backward": dropout(args.reps, args.inner),
    }
    for row in report["attention_forward_backward"]:
        print(
            f"attention {row['tokens']:5d} tokens: bf16 {row['bf16_ms']:8.3f} ms, fp32 {row['fp32_ms']:8.3f} ms, "
            f"bf16 math backend {row['bf16_math_backend_ms']:8.3f} ms"
        )
    print(f"dropout: {report['dropout_forward_backward']}")
    result = args.result or Path(__file__).resolve().parents[1] / "results" / f"trainer-micro-{report['date']}.json"
    result.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
