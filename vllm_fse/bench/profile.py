"""``vllm-fse bench profile``: where decode time goes with FSE off and on, per MoE layer; with
``--prefill-tokens N``, where a prefill step's time goes in engines of any arms
(:mod:`vllm_fse.bench.profile_prefill`).

Decode: each arm runs in its own process: an in-process vLLM engine (``LLM`` with the ``uni`` executor,
no engine-core process) on the same model, ``B`` requests of ``ISL`` prompt tokens decoding in
lockstep. After prefill and warm-up steps the tool

1. times ``--steps`` decode steps one by one (wall clock, no profiler): the engine's decode step
   time per batch size, free of the HTTP server and benchmark client;
2. profiles ``--profile-steps`` more with the torch profiler, and splits every MoE layer call
   (vLLM's ``moe_forward`` / ``moe_forward_shared`` custom op, which wraps routing, the expert
   kernel and, unfused, the shared-expert MLP) into: the fused-experts kernel, the shared-expert
   MLP (GEMMs and activation inside the op, FSE off only) and the rest (routing, reductions).

The report gives, per batch size: decode step time off/on, the MoE layer time per call off/on
split as above, what FSE saves per MoE layer and per step, and each arm's top operators.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from vllm_fse.bench.arms import (
    ARM_ENV,
    ARM_NAMES,
    add_model_arguments,
    arm_order,
    parse_env,
    resolve_model,
)
from vllm_fse.bench.op_categories import category
from vllm_fse.bench.profile_prefill import add_prefill_arguments, run_prefill_profile

# The operators that are one GEMM call each (aten::linear and aten::matmul wrap one of these).
GEMM_CALL_OPS = ("_C::onednn_mm", "aten::mm", "aten::addmm")


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="results directory")
    add_model_arguments(parser, preset="bench")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], help="decode batch sizes")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per batch size")
    parser.add_argument("--profile-steps", type=int, default=16, help="profiled decode steps per batch size")
    parser.add_argument("--warmup-steps", type=int, default=8, help="decode steps before timing")
    parser.add_argument("--rounds", type=int, default=3,
                        help="decode: alternating rounds of (off, on) child processes, timings pooled; "
                             "prefill: profiled steps per arm")
    parser.add_argument("--eager", action="store_true", help="enforce eager mode (default: vLLM's default)")
    parser.add_argument("--env", type=parse_env, action="append", default=[], metavar="KEY=VALUE", help="for both arms")
    add_prefill_arguments(parser)


# -- child: one arm ---------------------------------------------------------------------------


def _categories(prof, steps: int) -> dict:
    """Self CPU ms per decode step by category, and GEMM calls per step."""
    per_step: dict[str, float] = defaultdict(float)
    gemm_calls = 0
    for e in prof.key_averages():
        per_step[category(e.key)] += e.self_cpu_time_total / 1e3 / steps
        if e.key in GEMM_CALL_OPS:
            gemm_calls += e.count
    return {"ms_per_step": dict(per_step), "gemm_calls_per_step": gemm_calls / steps}


def _top_ops(prof, steps: int, limit: int = 15) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
    return [
        {"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps}
        for e in rows
    ]


def run_child(args: argparse.Namespace) -> dict:
    """One arm (environment already set by the parent): all batch sizes in one engine."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    from vllm_fse.introspect import describe_model

    max_batch = max(args.batch)
    total_steps = args.warmup_steps + args.steps + args.profile_steps + 8
    llm = LLM(
        model=args.model,
        dtype=args.dtype or "auto",
        max_model_len=args.input_len + total_steps + 16,
        max_num_seqs=max_batch,
        max_num_batched_tokens=max(2048, args.input_len * max_batch),  # prefill in one step
        enforce_eager=args.eager,
        enable_prefix_caching=False,
        distributed_executor_backend="uni",
        seed=0,
    )
    [described] = llm.apply_model(describe_model)
    engine = llm.llm_engine
    vocab = llm.llm_engine.model_config.get_vocab_size()
    result = {"model": described, "batches": {}}
    for batch in args.batch:
        params = SamplingParams(max_tokens=total_steps, temperature=0.0, ignore_eos=True)
        for i in range(batch):
            ids = [(17 * i + 31 * j + 7) % (vocab - 16) + 16 for j in range(args.input_len)]
            engine.add_request(f"b{batch}-{i}", {"prompt_token_ids": ids}, params)
        engine.step()  # prefill (one step: max_num_batched_tokens covers it)
        for _ in range(args.warmup_steps):
            engine.step()
        step_ms = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.step()
            step_ms.append((time.perf_counter() - t0) * 1e3)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                engine.step()
        categories = _categories(prof, args.profile_steps)
        while engine.has_unfinished_requests():  # drain before the next batch size
            engine.step()
        result["batches"][batch] = {
            "step_ms": step_ms,
            "categories": categories,
            "profile_steps": args.profile_steps,
            "top_ops": _top_ops(prof, args.profile_steps),
            "threads": torch.get_num_threads(),
        }
    return result


# -- parent: both arms, alternating ---------------------------------------------------------------


def _child_command(args: argparse.Namespace, model: str, dtype: str | None, out_json: Path) -> list[str]:
    cmd = [sys.executable, "-m", "vllm_fse.bench.profile", "--child", str(out_json), "--out", str(args.out),
           "--model", model, "--input-len", str(args.input_len), "--steps", str(args.steps),
           "--profile-steps", str(args.profile_steps), "--warmup-steps", str(args.warmup_steps),
           "--batch", *map(str, args.batch)]  # fmt: skip
    if dtype:
        cmd += ["--dtype", dtype]
    if args.eager:
        cmd.append("--eager")
    return cmd


def _summarize(rounds: dict[str, list[dict]], batches: list[int]) -> dict:
    from vllm_fse.bench.stats import paired_delta

    moe_layers = len(rounds["on"][0]["model"].get("moe_layers") or []) or 1
    summary = {"moe_layers": moe_layers, "batches": {}}
    for batch in batches:
        key = str(batch)
        row: dict = {}
        for arm in ARM_NAMES:
            results = [r["batches"][key] for r in rounds[arm]]
            steps = [ms for b in results for ms in b["step_ms"]]
            names = {n for b in results for n in b["categories"]["ms_per_step"]}
            row[arm] = {
                "step_ms_median": statistics.median(steps),
                "step_ms_p10": statistics.quantiles(steps, n=10)[0],
                "step_ms_p90": statistics.quantiles(steps, n=10)[-1],
                "round_medians": [statistics.median(b["step_ms"]) for b in results],
                "category_ms_per_step": {
                    n: statistics.fmean(b["categories"]["ms_per_step"].get(n, 0.0) for b in results) for n in names
                },
                "gemm_calls_per_step": statistics.fmean(b["categories"]["gemm_calls_per_step"] for b in results),
                "top_ops": results[-1]["top_ops"],
            }
        delta = paired_delta(row["off"]["round_medians"], row["on"]["round_medians"])
        row["step_delta"] = {"delta_pct": delta.delta_pct, "ci": [delta.ci_low_pct, delta.ci_high_pct],
                             "verdict": delta.verdict(lower_is_better=True),
                             "ms": delta.median_b - delta.median_a}  # fmt: skip
        names = sorted(set(row["off"]["category_ms_per_step"]) | set(row["on"]["category_ms_per_step"]))
        row["category_delta_ms_per_step"] = {
            n: row["on"]["category_ms_per_step"].get(n, 0.0) - row["off"]["category_ms_per_step"].get(n, 0.0)
            for n in names
        }
        summary["batches"][key] = row
    return summary


def render_markdown(summary: dict, meta: dict) -> str:
    from vllm_fse.bench.machine import machine_line

    layers = summary["moe_layers"]
    lines = [
        f"# Decode profile, FSE off vs on: {Path(meta['model']).name}",
        "",
        f"- Machine: {machine_line(meta['machine'])}",
        f"- In-process engine (`uni` executor), {'eager' if meta['eager'] else 'vLLM default (compiled graph)'}, "
        f"ISL {meta['input_len']}, {meta['rounds']} alternating rounds of one process per arm, each "
        f"{meta['steps']} timed and {meta['profile_steps']} profiled decode steps per batch size; "
        f"{layers} MoE layers",
        f"- Command: `{meta['command']}`",
        "",
        "## Decode step (wall clock, no profiler)",
        "",
        "| batch | FSE off (ms) [p10-p90] | FSE on (ms) [p10-p90] | Δ, 95% CI over round medians | verdict | "
        "Δ per MoE layer (us) |",
        "|--:|--:|--:|--:|:--|--:|",
    ]
    for batch, row in summary["batches"].items():
        off, on, d = row["off"], row["on"], row["step_delta"]
        ci = "n/a" if d["ci"][0] is None else f"[{d['ci'][0]:+.1f}%, {d['ci'][1]:+.1f}%]"
        lines.append(
            f"| {batch} | {off['step_ms_median']:.2f} [{off['step_ms_p10']:.2f}-{off['step_ms_p90']:.2f}] | "
            f"{on['step_ms_median']:.2f} [{on['step_ms_p10']:.2f}-{on['step_ms_p90']:.2f}] | "
            f"{d['delta_pct']:+.1f}% {ci} | {d['verdict']} | {1e3 * d['ms'] / layers:+.0f} |"
        )
    for batch, row in summary["batches"].items():
        lines += [
            "",
            f"## Where a decode step goes, batch {batch} (torch profiler, self CPU ms per step)",
            "",
            "| category | FSE off | FSE on | Δ | Δ per MoE layer (us) |",
            "|:--|--:|--:|--:|--:|",
        ]
        cats = row["category_delta_ms_per_step"]
        order = sorted(cats, key=lambda n: -row["off"]["category_ms_per_step"].get(n, 0.0))
        for n in order:
            a = row["off"]["category_ms_per_step"].get(n, 0.0)
            b = row["on"]["category_ms_per_step"].get(n, 0.0)
            lines.append(f"| {n} | {a:.3f} | {b:.3f} | {b - a:+.3f} | {1e3 * (b - a) / layers:+.0f} |")
        total_a = sum(row["off"]["category_ms_per_step"].values())
        total_b = sum(row["on"]["category_ms_per_step"].values())
        lines.append(f"| **total** | {total_a:.3f} | {total_b:.3f} | {total_b - total_a:+.3f} | "
                     f"{1e3 * (total_b - total_a) / layers:+.0f} |")  # fmt: skip
        lines.append(f"| GEMM calls per step | {row['off']['gemm_calls_per_step']:.0f} | "
                     f"{row['on']['gemm_calls_per_step']:.0f} | | |")  # fmt: skip
        lines += ["", f"Top operators, batch {batch} (self CPU ms per step):", "",
                  "| FSE off | ms | FSE on | ms |", "|:--|--:|:--|--:|"]  # fmt: skip
        for a, b in zip(row["off"]["top_ops"][:8], row["on"]["top_ops"][:8]):
            lines.append(f"| `{a['op']}` | {a['self_ms_per_step']:.3f} | `{b['op']}` | {b['self_ms_per_step']:.3f} |")
    return "\n".join(lines) + "\n"


def run_profile(args: argparse.Namespace) -> Path:
    from vllm_fse.bench.machine import command_line, describe_machine

    model, dtype = resolve_model(args.model, args.preset, args.dtype)
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    extra_env = dict(args.env)
    rounds: dict[str, list[dict]] = {arm: [] for arm in ARM_NAMES}
    for rnd in range(args.rounds):
        for arm in arm_order(rnd):
            raw = out / "raw" / f"{arm}-round{rnd}.json"
            if not raw.exists():
                env = {**os.environ, **extra_env, **ARM_ENV[arm], "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                       "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}  # fmt: skip
                t0 = time.monotonic()
                print(f"[round {rnd + 1}/{args.rounds}] FSE {arm}: profiling batches {args.batch}", flush=True)
                with open(out / "raw" / f"{arm}-round{rnd}.log", "w") as log:
                    proc = subprocess.run(_child_command(args, model, dtype, raw), env=env, stdout=log,
                                          stderr=subprocess.STDOUT, check=False)  # fmt: skip
                if proc.returncode != 0 or not raw.exists():
                    raise RuntimeError(f"profile child for FSE {arm} failed ({proc.returncode}); see {log.name}")
                print(f"[round {rnd + 1}/{args.rounds}] FSE {arm}: done in {time.monotonic() - t0:.0f}s", flush=True)
            rounds[arm].append(json.loads(raw.read_text()))
    for arm in ARM_NAMES:
        path = rounds[arm][0]["model"].get("fse_path")  # checked on the live model, not a log line
        if (path not in (None, "OFF")) != (arm == "on"):
            raise RuntimeError(f"arm {arm}: the live model runs FSE path {path}")
    summary = _summarize(rounds, args.batch)
    meta = {
        "model": model, "dtype": dtype, "eager": args.eager, "input_len": args.input_len, "steps": args.steps,
        "profile_steps": args.profile_steps, "rounds": args.rounds, "machine": describe_machine(),
        "command": command_line(), "live_model": {a: rounds[a][0]["model"] for a in ARM_NAMES},
    }  # fmt: skip
    (out / "profile.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1, default=str))
    path = out / "profile.md"
    path.write_text(render_markdown(summary, meta))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-fse bench profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_profile_arguments(parser)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = run_child(args)
        Path(args.child).write_text(json.dumps(result, default=str))
        return 0
    if args.prefill_tokens:
        print(run_prefill_profile(args))
        return 0
    print(run_profile(args).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
