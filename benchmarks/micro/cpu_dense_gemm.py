"""What vLLM's dense GEMM costs on this CPU, bf16 against fp32 (the unfused shared expert's cost).

Where oneDNN cannot build a bf16 matmul (x86 without AVX-512), vLLM's CPU linear layers fall back
to ``torch.nn.functional.linear`` (``dispatch_cpu_unquantized_gemm``); the unfused shared expert
MLP runs there. This times that call in bf16 and, for reference, in fp32 (weights converted
once), on the bench model's shared-expert shapes (gate_up 1024 -> 512, down 256 -> 1024), at a
ladder of token counts, and prints and saves the medians.

    .venv/bin/python benchmarks/micro/cpu_dense_gemm.py --out cpu-dense-gemm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _median_us(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from vllm import _custom_ops as ops

    from vllm_fse.bench.machine import describe_machine, machine_line

    try:  # what vLLM tries first for a bf16 linear layer on x86
        ops.create_onednn_mm(torch.zeros(1024, 512, dtype=torch.bfloat16), 32)
        onednn_bf16 = True
    except (RuntimeError, AttributeError):
        onednn_bf16 = False
    gen = torch.Generator().manual_seed(0)
    shapes = {"gate_up 1024->512": (512, 1024), "down 256->1024": (1024, 256)}
    rows = []
    for name, (n, k) in shapes.items():
        w16 = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        w32 = w16.float()
        for tokens in args.tokens:
            x16 = torch.randn(tokens, k, generator=gen).to(torch.bfloat16)
            x32 = x16.float()
            bf16 = _median_us(lambda: F.linear(x16, w16), args.reps)
            fp32 = _median_us(lambda: F.linear(x32, w32), args.reps)
            rows.append({"gemm": name, "tokens": tokens, "bf16_us": bf16, "fp32_us": fp32})
            print(f"{name:18s} {tokens:5d} tokens: bf16 {bf16:9.1f} us  fp32 {fp32:9.1f} us  ({bf16 / fp32:.1f}x)",
                  flush=True)
    machine = describe_machine()
    print(f"{machine_line(machine)}; oneDNN bf16 matmul: {'yes' if onednn_bf16 else 'no'}; "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    if args.out:
        result = {"machine": machine, "threads": torch.get_num_threads(), "onednn_bf16": onednn_bf16, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
