"""FSE on vs off across several engines per arm: how much of an ``x/off`` ratio is the engine?

``vllm-fse bench crossover --confirm-off`` compares one FSE engine with one FSE-off engine. Two
engines of the *same* configuration already differ by a few percent at decode batch 1 (see
``engine_order_aa.py``), so one engine per arm cannot tell a 3% effect from the engine it ran
on. This builds ``--engines-per-arm`` engines of every arm in one process (built in turn:
arm 1, arm 2, ..., arm 1, ...), steps all of them one decode step at a time (the order rotating
every cycle) and takes one value per engine: the median of its step times. An arm's ratio to
the first arm is the ratio of the engines' geometric means, with a Welch 95% interval over the
engines (:func:`vllm_fse.bench.stats.group_ratio`), so engine-to-engine spread is inside it.

Arms are ``NAME=VLLM_FSE[,VAR=VALUE...]``. The default compares FSE off, every step fused, and
every step split (the unfused computation inside FSE's MoE layer). ``--prefill-tokens`` adds
prefill steps of those sizes, ``--prefill-rounds`` per engine in the same rotation.
``--compilation-config NAME=JSON`` gives one arm its own vLLM compilation config (e.g. the off
arm compiled with the Inductor option FSE sets, to see what that option costs):

    .venv/bin/python benchmarks/engine_groups.py --out benchmarks/results/engine-groups-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
from pathlib import Path
from unittest import mock

DEFAULT_ARMS = ["off=0", "fused=1", "split=auto,VLLM_FSE_FUSED_MAX_TOKENS=0"]


def parse_arm(text: str) -> tuple[str, str, dict[str, str]]:
    name, _, spec = text.partition("=")
    fse, *extra = spec.split(",")
    if not name or not fse:
        raise argparse.ArgumentTypeError(f"--arms: expected NAME=VLLM_FSE[,VAR=VALUE...], got {text!r}")
    env = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--arms: expected VAR=VALUE in {text!r}, got {item!r}")
        env[key] = value
    return name, fse, env


def minor_faults() -> int:
    """Pages this process touched for the first time so far (fresh memory the allocator mapped
    or got back from the OS: what a step that frees and reallocates large buffers pays)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def parse_compilation_configs(items: list[str], arm_names: list[str]) -> dict[str, dict]:
    configs = {}
    for text in items:
        name, sep, spec = text.partition("=")
        if not sep or name not in arm_names:
            raise SystemExit(f"--compilation-config: expected NAME=JSON with NAME one of {arm_names}, got {text!r}")
        try:
            configs[name] = json.loads(spec)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--compilation-config {name}: not JSON ({e}): {spec!r}") from None
        if not isinstance(configs[name], dict):
            raise SystemExit(f"--compilation-config {name}: expected a JSON object, got {spec!r}")
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help="NAME=VLLM_FSE[,VAR=VALUE...]; first: baseline")
    parser.add_argument("--engines-per-arm", type=int, default=3)
    parser.add_argument("--decode-batch", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=48, help="timed decode steps per engine and batch size")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, nargs="*", default=[],
                        help="also time prefill steps of these token counts (requests of at most 2048 tokens)")
    parser.add_argument("--prefill-rounds", type=int, default=5, help="timed prefill steps per engine and size")
    parser.add_argument("--compilation-config", nargs="*", default=[], metavar="NAME=JSON",
                        help="an arm's vLLM compilation config, e.g. "
                             "'off_same={\"inductor_compile_config\": {\"reorder_for_peak_memory\": false}}'")
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    arms = [parse_arm(a) for a in args.arms]
    compilation = parse_compilation_configs(args.compilation_config, [name for name, _, _ in arms])

    from vllm_fse.bench import crossover
    from vllm_fse.bench.arms import resolve_model
    from vllm_fse.bench.machine import command_line, describe_machine, machine_line
    from vllm_fse.bench.stats import group_ratio

    # Many engines share the machine's memory: a small KV cache each (the requests need little).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine_args = argparse.Namespace(decode_batch=args.decode_batch, prefill_tokens=[2048, *args.prefill_tokens],
                                     prefill_request_len=2048, input_len=args.input_len, steps=args.steps,
                                     eager=False)  # fmt: skip
    model, dtype = resolve_model(None, args.preset, None)
    engines: list[tuple[str, object]] = []  # (arm name, requests of one engine), in build order
    for _ in range(args.engines_per_arm):
        for name, fse, env in arms:
            with mock.patch.dict(os.environ, env):  # restored (or removed) after the build
                llm = crossover._build_engine(engine_args, model, dtype, fse, compilation.get(name))
                engines.append((name, crossover._Requests(llm)))
            print(f"built engine {len(engines)}: {name}", flush=True)
    rows = []
    n = len(engines)

    def rotation(cycle: int) -> list[int]:
        return list(range(n))[cycle % n:] + list(range(n))[: cycle % n]

    def timed(i: int) -> tuple[float, int]:
        """One step of engine ``i``: its wall ms and the minor page faults it took."""
        f0 = minor_faults()
        ms = engines[i][1].timed_step() * 1e3
        return ms, minor_faults() - f0

    def decode_steps(batch: int) -> list[list[tuple[float, int]]]:
        ids = [reqs.add(batch, args.input_len, args.steps + 16) for _, reqs in engines]
        for _, reqs in engines:
            for _ in range(5):  # prefill and warm-up
                reqs.engine.step()
        steps: list[list[tuple[float, int]]] = [[] for _ in engines]
        for cycle in range(args.steps):
            for i in rotation(cycle):
                steps[i].append(timed(i))
        for (_, reqs), rids in zip(engines, ids):
            reqs.drain(rids)
        return steps

    def prefill_steps(tokens: int) -> list[list[tuple[float, int]]]:
        lengths = crossover.prefill_lengths(tokens, engine_args.prefill_request_len)
        steps: list[list[tuple[float, int]]] = [[] for _ in engines]
        for cycle in range(args.prefill_rounds + 1):  # round 0 warms up
            for i in rotation(cycle):
                reqs = engines[i][1]
                ids = [rid for length in lengths for rid in reqs.add(1, length, 1)]
                step = timed(i)
                reqs.drain(ids)
                if cycle:
                    steps[i].append(step)
        return steps

    def by_arm(per_engine: list[float]) -> dict[str, list[float]]:
        return {name: [v for (arm, _), v in zip(engines, per_engine) if arm == name] for name, _, _ in arms}

    sizes = [("batch", b, args.steps, decode_steps) for b in args.decode_batch]
    sizes += [("prefill_tokens", t, args.prefill_rounds, prefill_steps) for t in args.prefill_tokens]
    for kind, size, count, measure in sizes:
        steps = measure(size)
        per_arm = by_arm([statistics.median(ms for ms, _ in s) for s in steps])
        faults_per_arm = by_arm([statistics.median(f for _, f in s) for s in steps])
        base = arms[0][0]
        row = {kind: size, "steps": count, "engine_median_ms": per_arm, "minor_faults_per_step": faults_per_arm,
               "ratios": {}}  # fmt: skip
        label = f"batch {size}" if kind == "batch" else f"prefill {size} tokens"
        line = [f"{label}: {base} {statistics.median(per_arm[base]):.2f} ms"]
        names = [name for name, _, _ in arms]
        pairs = [(base, b) for b in names[1:]] + [(a, b) for i, a in enumerate(names[1:], 1) for b in names[i + 1:]]
        for a, b in pairs:
            g = group_ratio(per_arm[a], per_arm[b])
            row["ratios"][f"{b}/{a}"] = {"ratio": g.ratio, "ci": None if g.ci_low is None else [g.ci_low, g.ci_high],
                                         "significant": g.significant}  # fmt: skip
            line.append(f"{b}/{a} {g.ratio:.3f} {g.ci_text()}")
        spreads = {name: group_ratio(v, v).spread_a_pct for name, v in per_arm.items()}
        row["engine_spread_pct"] = spreads
        line.append("engine spread " + ", ".join(f"{k} {v:.1f}%" for k, v in spreads.items() if v is not None))
        line.append("minor faults per step " + ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in faults_per_arm.items()))
        rows.append(row)
        print("; ".join(line), flush=True)
    machine = describe_machine()
    print(machine_line(machine))
    if args.out:
        result = {"command": command_line(), "machine": machine, "model": model, "arms": args.arms,
                  "compilation_configs": compilation, "engines_per_arm": args.engines_per_arm,
                  "build_order": [name for name, _ in engines], "rows": rows}  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
