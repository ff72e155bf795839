"""Where a large prefill step's time goes, per operator, in engines of several arms (one process).

``engine_groups.py --prefill-tokens`` shows *that* an arm's prefill step is slower than FSE off;
this shows *where*. It builds one engine per arm (``NAME=VLLM_FSE[,VAR=VALUE...]``, as
``engine_groups.py``; ``--compilation-config NAME=JSON`` per arm), then in rotation runs
``--rounds`` prefill steps of ``--prefill-tokens`` tokens on each under the torch profiler, and
reports per arm the wall time and minor page faults per step (fresh memory the allocator mapped:
how the split path's freed buffers showed up, see vllm_fse/patches.py entry 10) and every
operator's self CPU time per step, with the difference to the first arm. Inductor's generated CPU kernels are named in the trace
(``cpp.enable_kernel_profile``, set for every arm, so the arms are compiled alike).

    .venv/bin/python benchmarks/prefill_profile.py --arms off=0 auto=auto --prefill-tokens 4096
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

from engine_groups import minor_faults, parse_arm, parse_compilation_configs

# Inductor's generated kernels carry a graph number and a graph-local number
# (graph_1_cpp_fused_add_3): one name per kind, whichever graph (or torch.cond branch) holds it.
_GRAPH_PREFIX = re.compile(r"^graph_\d+_")
_KERNEL_NUMBER = re.compile(r"_\d+$")


def op_key(name: str) -> str:
    return _KERNEL_NUMBER.sub("_N", _GRAPH_PREFIX.sub("", name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["off=0", "auto=auto"], help="NAME=VLLM_FSE[,VAR=VALUE...]")
    parser.add_argument("--compilation-config", nargs="*", default=[], metavar="NAME=JSON")
    parser.add_argument("--prefill-tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=4, help="profiled prefill steps per arm (after one warm-up)")
    parser.add_argument("--top", type=int, default=25, help="operators shown (largest differences)")
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    arms = [parse_arm(a) for a in args.arms]
    names = [name for name, _, _ in arms]
    compilation = parse_compilation_configs(args.compilation_config, names)

    from torch.profiler import ProfilerActivity, profile

    from vllm_fse.bench import crossover
    from vllm_fse.bench.arms import resolve_model
    from vllm_fse.bench.machine import command_line, describe_machine, machine_line

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine_args = argparse.Namespace(decode_batch=[1], prefill_tokens=[2048, args.prefill_tokens],
                                     prefill_request_len=2048, input_len=128, steps=1, eager=False)  # fmt: skip
    model, dtype = resolve_model(None, args.preset, None)
    engines = {}
    for name, fse, env in arms:
        config = dict(compilation.get(name, {}))
        inductor = dict(config.get("inductor_compile_config", {}))
        inductor.setdefault("cpp.enable_kernel_profile", True)
        config["inductor_compile_config"] = inductor
        with mock.patch.dict(os.environ, env):
            engines[name] = crossover._Requests(crossover._build_engine(engine_args, model, dtype, fse, config))
        print(f"built engine: {name}", flush=True)

    lengths = crossover.prefill_lengths(args.prefill_tokens, engine_args.prefill_request_len)
    wall: dict[str, list[float]] = defaultdict(list)
    faults: dict[str, list[int]] = defaultdict(list)
    self_us: dict[str, dict[str, float]] = {name: defaultdict(float) for name in names}
    calls: dict[str, dict[str, int]] = {name: defaultdict(int) for name in names}
    for cycle in range(args.rounds + 1):  # round 0 warms up, unprofiled
        for name in names[cycle % len(names):] + names[: cycle % len(names)]:
            reqs = engines[name]
            ids = [rid for length in lengths for rid in reqs.add(1, length, 1)]
            if not cycle:
                reqs.timed_step()
                reqs.drain(ids)
                continue
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                f0, t0 = minor_faults(), time.perf_counter()
                reqs.engine.step()
                wall[name].append((time.perf_counter() - t0) * 1e3)
                faults[name].append(minor_faults() - f0)
            reqs.drain(ids)
            for e in prof.key_averages():
                self_us[name][op_key(e.key)] += e.self_cpu_time_total
                calls[name][op_key(e.key)] += e.count
    per_step = {name: {k: v / args.rounds / 1e3 for k, v in ops.items()} for name, ops in self_us.items()}
    base = names[0]
    keys = set().union(*per_step.values())
    lines = [f"prefill step of {args.prefill_tokens} tokens ({args.rounds} profiled rounds per arm, median wall ms): "
             + ", ".join(f"{n} {statistics.median(wall[n]):.1f}" for n in names),
             "minor page faults per step (median): "
             + ", ".join(f"{n} {statistics.median(faults[n]):.0f}" for n in names)]  # fmt: skip
    for other in names[1:]:
        diff = sorted(keys, key=lambda k: abs(per_step[other].get(k, 0) - per_step[base].get(k, 0)), reverse=True)
        lines.append(f"\n{other} - {base}, self CPU ms per step (calls per step):")
        for k in diff[: args.top]:
            a, b = per_step[base].get(k, 0.0), per_step[other].get(k, 0.0)
            ca, cb = calls[base].get(k, 0) / args.rounds, calls[other].get(k, 0) / args.rounds
            lines.append(f"  {b - a:+9.2f}  {base} {a:9.2f} ({ca:g})  {other} {b:9.2f} ({cb:g})  {k}")
        total = sum(per_step[other].values()) - sum(per_step[base].values())
        lines.append(f"  total self CPU difference: {total:+.1f} ms per step")
    machine = describe_machine()
    print("\n".join(lines))
    print(machine_line(machine))
    if args.out:
        result = {"command": command_line(), "machine": machine, "model": model, "arms": args.arms,
                  "compilation_configs": compilation, "prefill_tokens": args.prefill_tokens, "rounds": args.rounds,
                  "wall_ms": wall, "minor_faults": faults, "self_cpu_ms_per_step": per_step,
                  "calls_per_step": {n: {k: v / args.rounds for k, v in c.items()} for n, c in calls.items()}}  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
