"""``vllm-fse bench profile --prefill-tokens N``: where a large prefill step's time goes, per operator,
in engines of several arms in one process.

``vllm-fse bench engine-groups --prefill-tokens`` shows *that* an arm's prefill step is slower
than FSE off; this shows *where*. One engine per arm (``NAME=VLLM_FSE[,VAR=VALUE...]``, as in
engine-groups; ``--compilation-config NAME=JSON`` per arm); in rotation, ``--rounds`` prefill
steps on each under the torch profiler (after one unprofiled warm-up round). The report gives per
arm the wall time and minor page faults per step (how freed and re-mapped buffers show up, see
``vllm_fse/patches.py``), self CPU time per operator category, and the operators whose self CPU
time differs most from the first arm's. Inductor's generated CPU kernels are named in the trace
(``cpp.enable_kernel_profile``, set for every arm, so the arms are compiled alike).
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

from vllm_fse.bench import engines as eng
from vllm_fse.bench.op_categories import category

DEFAULT_ARMS = ["off=0", "auto=auto"]

# Inductor's generated kernels carry a graph number and a graph-local number
# (graph_1_cpp_fused_add_3): one name per kind, whichever graph (or torch.cond branch) holds it.
_GRAPH_PREFIX = re.compile(r"^graph_\d+_")
_KERNEL_NUMBER = re.compile(r"_\d+$")


def op_key(name: str) -> str:
    return _KERNEL_NUMBER.sub("_N", _GRAPH_PREFIX.sub("", name))


def add_prefill_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prefill steps (with --prefill-tokens; engines in this process)")
    group.add_argument("--prefill-tokens", type=int, default=None,
                       help="profile prefill steps of this many tokens instead of decode steps")
    group.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help="NAME=VLLM_FSE[,VAR=VALUE...]; first: baseline")
    group.add_argument("--compilation-config", nargs="*", default=[], metavar="NAME=JSON")
    group.add_argument("--top", type=int, default=25, help="operators shown (largest differences)")


def report_lines(names: list[str], tokens: int, rounds: int, wall: dict, faults: dict,
                 per_step: dict[str, dict[str, float]], calls: dict[str, dict[str, float]], top: int) -> list[str]:  # fmt: skip
    """The text report from per-arm self CPU ms and calls per step, by operator."""
    base = names[0]
    lines = [f"prefill step of {tokens} tokens ({rounds} profiled rounds per arm, median wall ms): "
             + ", ".join(f"{n} {statistics.median(wall[n]):.1f}" for n in names),
             "minor page faults per step (median): " + ", ".join(f"{n} {statistics.median(faults[n]):.0f}" for n in names),
             "", "self CPU ms per step by category:"]  # fmt: skip
    by_category = {n: defaultdict(float) for n in names}
    for n in names:
        for op, ms in per_step[n].items():
            by_category[n][category(op)] += ms
    for cat in sorted(set().union(*by_category.values()), key=lambda c: -by_category[base].get(c, 0.0)):
        lines.append(f"  {cat:24s} " + "  ".join(f"{n} {by_category[n].get(cat, 0.0):9.2f}" for n in names))
    keys = set().union(*per_step.values())
    for other in names[1:]:
        diff = sorted(keys, key=lambda k: abs(per_step[other].get(k, 0) - per_step[base].get(k, 0)), reverse=True)
        lines += ["", f"{other} - {base}, self CPU ms per step (calls per step):"]
        for k in diff[:top]:
            a, b = per_step[base].get(k, 0.0), per_step[other].get(k, 0.0)
            ca, cb = calls[base].get(k, 0), calls[other].get(k, 0)
            lines.append(f"  {b - a:+9.2f}  {base} {a:9.2f} ({ca:g})  {other} {b:9.2f} ({cb:g})  {k}")
        total = sum(per_step[other].values()) - sum(per_step[base].values())
        lines.append(f"  total self CPU difference: {total:+.1f} ms per step")
    return lines


def run_prefill_profile(args: argparse.Namespace) -> str:
    from torch.profiler import ProfilerActivity, profile

    from vllm_fse.bench.arms import resolve_model
    from vllm_fse.bench.machine import command_line, describe_machine, machine_line

    arms = [eng.parse_engine_arm(a) for a in args.arms]
    names = [arm.name for arm in arms]
    compilation = eng.parse_compilation_configs(args.compilation_config, names)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    shape = eng.EngineShape(decode_batch=[1], prefill_tokens=[2048, args.prefill_tokens], eager=args.eager, decode_tokens=8)
    model, dtype = resolve_model(args.model, args.preset, args.dtype)
    engines = {}
    for arm in arms:
        config = dict(compilation.get(arm.name, {}))
        inductor = dict(config.get("inductor_compile_config", {}))
        inductor.setdefault("cpp.enable_kernel_profile", True)
        config["inductor_compile_config"] = inductor
        with mock.patch.dict(os.environ, {**dict(args.env), **arm.env}):
            engines[arm.name] = eng.Requests(eng.build_engine(shape, model, dtype, arm.fse, config))
        print(f"built engine: {arm.name}", flush=True)

    wall: dict[str, list[float]] = defaultdict(list)
    faults: dict[str, list[int]] = defaultdict(list)
    self_us: dict[str, dict[str, float]] = {name: defaultdict(float) for name in names}
    calls: dict[str, dict[str, int]] = {name: defaultdict(int) for name in names}
    for cycle in range(args.rounds + 1):  # round 0 warms up, unprofiled
        for name in eng.rotation(names, cycle):
            reqs = engines[name]
            ids = reqs.add_prefill(args.prefill_tokens, shape.prefill_request_len)
            if not cycle:
                reqs.timed_step()
                reqs.drain(ids)
                continue
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                f0, t0 = eng.minor_faults(), time.perf_counter()
                reqs.engine.step()
                wall[name].append((time.perf_counter() - t0) * 1e3)
                faults[name].append(eng.minor_faults() - f0)
            reqs.drain(ids)
            for e in prof.key_averages():
                self_us[name][op_key(e.key)] += e.self_cpu_time_total
                calls[name][op_key(e.key)] += e.count
    per_step = {name: {k: v / args.rounds / 1e3 for k, v in ops.items()} for name, ops in self_us.items()}
    calls_per_step = {n: {k: v / args.rounds for k, v in c.items()} for n, c in calls.items()}
    machine = describe_machine()
    text = "\n".join(report_lines(names, args.prefill_tokens, args.rounds, wall, faults, per_step, calls_per_step,
                                  args.top) + [machine_line(machine)])  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": command_line(), "machine": machine, "model": model, "arms": args.arms,
              "compilation_configs": compilation, "prefill_tokens": args.prefill_tokens, "rounds": args.rounds,
              "wall_ms": wall, "minor_faults": faults, "self_cpu_ms_per_step": per_step,
              "calls_per_step": calls_per_step}  # fmt: skip
    (out / "prefill-profile.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "prefill-profile.txt").write_text(text + "\n")
    return text
