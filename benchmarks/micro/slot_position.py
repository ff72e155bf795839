"""Shared slot first or last in vLLM's CPU MoE kernel: which is faster on this machine?

vLLM's CPU kernel (``_C::cpu_fused_moe``) works through the experts in index order. Appended
last (index ``n_routed``, what vllm-fse does), the all-token shared slot is the last and largest
piece of work; stored first (index 0, routed ids shifted by one), it starts first. Both orders run
the same arithmetic. This times the two, interleaved call by call in one process, on the bench
model's MoE shape (hidden 1024, moe_intermediate 256, 64 routed + 1 shared, top-8) with
prepacked random weights and random routing, and prints medians per token count.

    .venv/bin/python benchmarks/micro/slot_position.py --out slot-position.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--routed", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

    from vllm_fse.bench.machine import describe_machine, machine_line

    dtype = getattr(torch, args.dtype)
    experts = args.routed + 1
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(experts, 2 * args.inter, args.hidden, generator=gen) * 0.02).to(dtype)
    w2 = (torch.randn(experts, args.hidden, args.inter, generator=gen) * 0.02).to(dtype)
    # Last: shared expert at index `routed`. First: the same weights rolled so it sits at 0.
    packed = {
        "last": (cpu_prepack_moe_weight(w13, "vec"), cpu_prepack_moe_weight(w2, "vec")),
        "first": (cpu_prepack_moe_weight(w13.roll(1, 0), "vec"), cpu_prepack_moe_weight(w2.roll(1, 0), "vec")),
    }
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden, generator=gen).to(dtype)
        routed = torch.rand(tokens, args.routed, generator=gen).topk(args.top_k, dim=-1).indices.int()
        weights = torch.rand(tokens, args.top_k + 1, generator=gen)
        ids = {
            "last": torch.cat([routed, torch.full((tokens, 1), args.routed, dtype=torch.int32)], 1).contiguous(),
            "first": torch.cat([routed + 1, torch.zeros(tokens, 1, dtype=torch.int32)], 1).contiguous(),
        }
        outs, times = {}, {"last": [], "first": []}
        for rep in range(args.reps + 2):
            for order in (("last", "first") if rep % 2 else ("first", "last")):
                out = torch.empty_like(x)
                t0 = time.perf_counter()
                cpu_fused_moe(out, x, *packed[order], None, None, weights, ids[order], "silu", "vec")
                if rep >= 2:
                    times[order].append((time.perf_counter() - t0) * 1e6)
                outs[order] = out
        same = torch.equal(outs["first"], outs["last"])
        row = {"tokens": tokens, "last_us": statistics.median(times["last"]),
               "first_us": statistics.median(times["first"]), "bitwise_equal": same}  # fmt: skip
        rows.append(row)
        print(f"T={tokens:5d}  last {row['last_us']:9.0f} us  first {row['first_us']:9.0f} us  "
              f"first/last {row['first_us'] / row['last_us']:.3f}  equal={same}", flush=True)  # fmt: skip
    result = {"machine": describe_machine(), "args": vars(args), "rows": rows}
    print(machine_line(result["machine"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
