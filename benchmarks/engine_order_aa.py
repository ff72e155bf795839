"""A/A control for ``vllm-fse bench crossover --confirm-off``: how far apart are two engines that
run the same computation?

``--confirm-off`` compares an FSE engine against a ``VLLM_FSE=0`` engine built before it in the
same process. Any difference between two engines that is not the computation (build order,
memory placement, which engine's step follows which) goes into those ratios. This builds two
engines of the same arm (default: both FSE off) exactly as the crossover tool does, interleaves
their decode steps one by one (order alternating) and reports second/first per batch size with
the same paired statistics. A ratio of 1 within its interval means the crossover's ``x/off``
ratios carry no engine bias beyond their own intervals.

    .venv/bin/python benchmarks/engine_order_aa.py --out benchmarks/results/engine-order-aa-cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fse", default="0", help="VLLM_FSE of both engines")
    parser.add_argument("--decode-batch", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=96, help="timed decode steps per engine and batch size")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from vllm_fse.bench import crossover
    from vllm_fse.bench.arms import resolve_model
    from vllm_fse.bench.machine import command_line, describe_machine, machine_line
    from vllm_fse.bench.stats import paired_delta

    # The engine settings of the crossover tool (its prefill sizes only set max_num_batched_tokens).
    engine_args = argparse.Namespace(decode_batch=args.decode_batch, prefill_tokens=[2048], prefill_request_len=2048,
                                     input_len=args.input_len, steps=args.steps, eager=False)  # fmt: skip
    model, dtype = resolve_model(None, "bench", None)
    engines = [crossover._Requests(crossover._build_engine(engine_args, model, dtype, args.fse)) for _ in range(2)]
    rows = []
    for batch in args.decode_batch:
        ids = [reqs.add(batch, args.input_len, 2 * args.steps + 16) for reqs in engines]
        for reqs in engines:
            for _ in range(5):  # prefill and warm-up
                reqs.engine.step()
        times: list[list[float]] = [[], []]
        for step in range(args.steps):
            for which in (0, 1) if step % 2 == 0 else (1, 0):
                times[which].append(engines[which].timed_step() * 1e3)
        for reqs, rids in zip(engines, ids):
            reqs.drain(rids)
        d = paired_delta(times[0], times[1])
        row = {"batch": batch, "steps": args.steps, "first_ms": d.median_a, "second_ms": d.median_b,
               "second/first": 1 + d.delta_pct / 100,
               "ci": None if d.ci_low_pct is None else [1 + d.ci_low_pct / 100, 1 + d.ci_high_pct / 100],
               "significant": d.significant}  # fmt: skip
        rows.append(row)
        print(f"batch {batch}: second/first {row['second/first']:.3f} {d.ci_text()} (first {d.median_a:.2f} ms)",
              flush=True)
    machine = describe_machine()
    print(machine_line(machine))
    if args.out:
        result = {"command": command_line(), "machine": machine, "model": model, "fse": args.fse, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
