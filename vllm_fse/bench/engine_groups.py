"""``vllm-fse bench engine-groups``: arms compared across several engines each, in one process.

Two engines of the *same* configuration differ by a few percent at small decode batches, so one
engine per arm cannot tell a 3% effect from the engine it ran on. This builds
``--engines-per-arm`` engines of every arm in one process (built in turn: arm 1, arm 2, ...,
arm 1, ...), steps all of them one step at a time (the order rotating every cycle) and takes one
value per engine: the median of its step times. An arm's ratio to another is the ratio of the
engines' geometric means with a Welch 95% interval over the engines
(:func:`vllm_fse.bench.stats.group_ratio`), so the engine-to-engine spread is inside it. With one
engine per arm each ratio also pairs the two engines' steps of each cycle
(:func:`vllm_fse.bench.stats.paired_delta`).

Arms are ``NAME=VLLM_FSE[,VAR=VALUE...]`` (the first is the baseline). ``--aa-control`` adds an
arm ``aa`` built exactly as the baseline: ``aa/<baseline>`` is what two engines that compute the
same thing differ by, the yardstick for every other ratio. ``--prefill-tokens`` adds prefill
steps of those sizes, ``--prefill-rounds`` per engine in the same rotation.
``--compilation-config NAME=JSON`` gives one arm its own vLLM compilation config. Every step
also records the minor page faults it took (fresh memory the allocator had to map).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import replace
from pathlib import Path
from unittest import mock

from vllm_fse.bench.engines import (
    EngineArm,
    EngineShape,
    Requests,
    build_engine,
    minor_faults,
    parse_compilation_configs,
    parse_engine_arm,
    rotation,
)
from vllm_fse.bench.stats import group_ratio, paired_delta

DEFAULT_ARMS = ["off=0", "fused=1", "split=auto,VLLM_FSE_FUSED_MAX_TOKENS=0"]
AA = "aa"


def with_aa_control(arms: list[EngineArm]) -> list[EngineArm]:
    """The arms plus ``aa``: the baseline's settings under another name."""
    if any(arm.name == AA for arm in arms):
        raise SystemExit(f"--aa-control adds an arm named {AA!r}; --arms has one already")
    return [*arms, replace(arms[0], name=AA)]


def arm_pairs(names: list[str]) -> list[tuple[str, str]]:
    """Every other arm against the baseline, then each pair of the others."""
    base, others = names[0], names[1:]
    return [(base, b) for b in others] + [(a, b) for i, a in enumerate(others) for b in others[i + 1:]]


def _ratio_entry(r) -> dict:
    return {"ratio": r.ratio, "ci": None if r.ci_low is None else [r.ci_low, r.ci_high], "significant": r.significant}


def summarize(engine_arms: list[str], steps: list[list[tuple[float, int]]], arm_names: list[str]) -> dict:
    """One size's row: per arm the engines' median step ms and faults, every arm pair's ratio
    over the engines and, with one engine per arm, paired over the cycles.

    ``engine_arms[i]`` is the arm of engine ``i``; ``steps[i]`` its (ms, minor faults) per step,
    step ``c`` of every engine in the same rotation cycle."""
    per_arm: dict[str, list[float]] = {name: [] for name in arm_names}
    faults: dict[str, list[float]] = {name: [] for name in arm_names}
    steps_by_arm: dict[str, list[list[float]]] = {name: [] for name in arm_names}
    for arm, engine_steps in zip(engine_arms, steps):
        per_arm[arm].append(statistics.median(ms for ms, _ in engine_steps))
        faults[arm].append(statistics.median(f for _, f in engine_steps))
        steps_by_arm[arm].append([ms for ms, _ in engine_steps])
    row: dict = {"engine_median_ms": per_arm, "minor_faults_per_step": faults, "ratios": {}}
    for a, b in arm_pairs(arm_names):
        entry = _ratio_entry(group_ratio(per_arm[a], per_arm[b]))
        if len(steps_by_arm[a]) == 1 and len(steps_by_arm[b]) == 1:
            d = paired_delta(steps_by_arm[a][0], steps_by_arm[b][0])
            entry["paired"] = {"ratio": 1 + d.delta_pct / 100, "significant": d.significant,
                               "ci": None if d.ci_low_pct is None else [1 + d.ci_low_pct / 100, 1 + d.ci_high_pct / 100]}  # fmt: skip
        row["ratios"][f"{b}/{a}"] = entry
    row["engine_spread_pct"] = {name: group_ratio(v, v).spread_a_pct for name, v in per_arm.items()}
    return row


def _ci(entry: dict) -> str:
    return "no CI" if entry["ci"] is None else f"[{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]"


def row_line(label: str, row: dict, base: str) -> str:
    line = [f"{label}: {base} {statistics.median(row['engine_median_ms'][base]):.2f} ms"]
    for name, entry in row["ratios"].items():
        text = f"{name} {entry['ratio']:.3f} {_ci(entry)}"
        if "paired" in entry:
            text += f" (paired over steps {entry['paired']['ratio']:.3f} {_ci(entry['paired'])})"
        if name == f"{AA}/{base}":
            text += " <- A/A control"
        line.append(text)
    spreads = [f"{k} {v:.1f}%" for k, v in row["engine_spread_pct"].items() if v is not None]
    if spreads:
        line.append("engine spread " + ", ".join(spreads))
    line.append("minor faults per step " + ", ".join(
        f"{k} {statistics.median(v):.0f}" for k, v in row["minor_faults_per_step"].items()))  # fmt: skip
    return "; ".join(line)


def add_engine_groups_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm_fse.bench.arms import add_model_arguments

    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help="NAME=VLLM_FSE[,VAR=VALUE...]; first: baseline")
    parser.add_argument("--aa-control", action="store_true",
                        help=f"add an arm {AA!r} built as the baseline: the engine-to-engine yardstick")
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
    parser.add_argument("--eager", action="store_true", help="enforce eager mode (default: vLLM's default)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    add_model_arguments(parser, preset="bench")


def run(args: argparse.Namespace) -> dict:
    from vllm_fse.bench.arms import resolve_model
    from vllm_fse.bench.machine import command_line, describe_machine, machine_line

    arms = [parse_engine_arm(a) for a in args.arms]
    if args.aa_control:
        arms = with_aa_control(arms)
    names = [arm.name for arm in arms]
    compilation = parse_compilation_configs(args.compilation_config, names)
    if AA in names and names[0] in compilation:
        compilation[AA] = compilation[names[0]]
    # Many engines share the machine's memory: a small KV cache each (the requests need little).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    shape = EngineShape(decode_batch=args.decode_batch, prefill_tokens=[2048, *args.prefill_tokens],
                        input_len=args.input_len, decode_tokens=args.steps + 24, eager=args.eager)  # fmt: skip
    model, dtype = resolve_model(args.model, args.preset, args.dtype)
    engines: list[tuple[str, Requests]] = []  # (arm name, requests of one engine), in build order
    for _ in range(args.engines_per_arm):
        for arm in arms:
            with mock.patch.dict(os.environ, arm.env):  # restored (or removed) after the build
                llm = build_engine(shape, model, dtype, arm.fse, compilation.get(arm.name))
                engines.append((arm.name, Requests(llm)))
            print(f"built engine {len(engines)}: {arm.name}", flush=True)
    order = list(range(len(engines)))

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
            for i in rotation(order, cycle):
                steps[i].append(timed(i))
        for (_, reqs), rids in zip(engines, ids):
            reqs.drain(rids)
        return steps

    def prefill_steps(tokens: int) -> list[list[tuple[float, int]]]:
        steps: list[list[tuple[float, int]]] = [[] for _ in engines]
        for cycle in range(args.prefill_rounds + 1):  # round 0 warms up
            for i in rotation(order, cycle):
                reqs = engines[i][1]
                ids = reqs.add_prefill(tokens, shape.prefill_request_len)
                step = timed(i)
                reqs.drain(ids)
                if cycle:
                    steps[i].append(step)
        return steps

    sizes = [("batch", b, args.steps, decode_steps) for b in args.decode_batch]
    sizes += [("prefill_tokens", t, args.prefill_rounds, prefill_steps) for t in args.prefill_tokens]
    rows = []
    for kind, size, count, measure in sizes:
        row = {kind: size, "steps": count, **summarize([name for name, _ in engines], measure(size), names)}
        rows.append(row)
        label = f"batch {size}" if kind == "batch" else f"prefill {size} tokens"
        print(row_line(label, row, names[0]), flush=True)
    machine = describe_machine()
    print(machine_line(machine))
    result = {"command": command_line(), "machine": machine, "model": model, "arms": args.arms,
              "aa_control": args.aa_control, "compilation_configs": compilation, "eager": args.eager,
              "engines_per_arm": args.engines_per_arm, "build_order": [name for name, _ in engines],
              "rows": rows}  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-fse bench engine-groups", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_engine_groups_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
