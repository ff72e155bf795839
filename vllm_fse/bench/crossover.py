"""``vllm-fse bench crossover``: fused vs split shared experts, paired inside one engine.

Between processes the noise of a small machine is far above the few percent at stake. Under
``VLLM_FSE=auto`` one engine holds both paths on the same weights, and its switch point can be
moved while it runs, so the paths are compared step against step:

1. **MoE layer**: one live MoE layer's fused and split calls, timed interleaved at a ladder of
   token counts (decode sizes and prefill sizes), next to what the startup calibration chose;
2. **engine step**: the engine's decode steps at each batch size, interleaved step by step over
   the modes (order rotating), and its prefill steps at each token count, in rounds of one step
   per mode: ``fused`` (every step fused, = ``VLLM_FSE=1``), ``split`` (every step split: vLLM's
   unfused computation, = ``VLLM_FSE=0``), ``auto`` (the calibrated switch point) and, for decode,
   ``routed`` (the routed experts only, no shared expert at all: not lossless, the floor that
   any fusing of the shared expert could reach inside the same op). Ratios are paired per
   adjacent steps (decode) or per round (prefill): fused/split, and auto/split, the step-time
   ratio of auto to off;
3. **FSE off** (``--confirm-off``): a second engine, built first with ``VLLM_FSE=0`` in the same
   process, whose decode and prefill steps are interleaved with the modes: ``auto/off`` and ``fused/off``
   directly, ``split/off`` (whether split costs what off costs) and ``routed/off`` (the limit).

Output in ``--out``: ``crossover.json`` (everything), ``crossover.md`` (tables) and
``crossover.png`` (cost of fused and split per MoE call against token count, with the switch point).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

from vllm_fse.bench.arms import add_model_arguments, resolve_model
from vllm_fse.bench.engines import ALWAYS, EngineShape, Requests, build_engine, rotation
from vllm_fse.bench.machine import command_line, describe_machine, machine_line
from vllm_fse.bench.stats import paired_delta

MODES = ("fused", "split", "auto")
# Decode only, a measurement of the limit: the shared expert costs nothing (outputs change).
FLOOR = "routed"


# -- functions run inside the worker on the live model (LLM.apply_model) ---------------------------


def _switch(model):
    switch = getattr(model, "fse_switch", None)
    if switch is None or not switch.auto:
        raise RuntimeError("vllm-fse bench crossover needs a model built with VLLM_FSE=auto")
    return switch


def set_fused_max_tokens(model, value: int | None) -> int:
    """Move the live model's switch point (None: back to the calibrated one); returns the old."""
    switch = _switch(model)
    if not hasattr(switch, "bench_calibrated"):
        switch.bench_calibrated = switch.fused_max_tokens
    old = switch.fused_max_tokens
    switch.fused_max_tokens = switch.bench_calibrated if value is None else value
    return old


def set_mode(model, mode: str) -> None:
    """Run every following step as ``mode``: one of MODES, or FLOOR (each MoE layer runs its
    routed experts only; the engine must be built with ROUTED_ONLY_CONFIG, see run)."""
    from vllm_fse.bench.routed_only import set_routed_only

    _switch(model)
    set_routed_only(model, mode == FLOOR)
    set_fused_max_tokens(model, _mode_value(mode))


def time_moe_layer(model, sizes: list[int], reps: int) -> list[dict]:
    """Fused and split call times of the model's first MoE layer at each token count."""
    import torch

    from vllm_fse.auto.calibration import time_paths

    _switch(model)
    slots = next(m.fse_shared_slots for m in model.modules() if hasattr(m, "fse_shared_slots"))
    like_x, like_ids = slots.calibration_inputs()
    rows = []
    for tokens in sizes:
        with torch.inference_mode():  # as in a forward (the slot buffers are inference tensors)
            samples = [time_paths(slots, tokens, like_x, like_ids, reps=1) for _ in range(reps)]
        fused = [f * 1e6 for f, _ in samples]
        split = [s * 1e6 for _, s in samples]
        rows.append({"tokens": tokens, "fused_us": fused, "split_us": split})
    return rows


# -- the parent: one process, the engines in it -----------------------------------------------------


def add_crossover_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="results directory")
    add_model_arguments(parser, preset="bench")
    parser.add_argument("--decode-batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[256, 1024, 4096, 8192],
                        help="tokens per prefill step (split into requests of at most --prefill-request-len)")
    parser.add_argument("--prefill-request-len", type=int, default=2048)
    parser.add_argument("--layer-sizes", type=int, nargs="+",
                        default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
                        help="token counts of the MoE-layer timing")
    parser.add_argument("--layer-reps", type=int, default=7)
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens of the decode requests")
    parser.add_argument("--steps", type=int, default=96,
                        help="timed decode steps per mode at each batch size (interleaved one by one)")
    parser.add_argument("--prefill-rounds", type=int, default=4)
    parser.add_argument("--confirm-off", action="store_true",
                        help="also build an FSE-off engine and interleave its decode and prefill steps with the modes")
    parser.add_argument("--off-built", choices=("first", "last"), default="last",
                        help="build the FSE-off engine before or after the FSE engine (the engine built second "
                             "runs slightly faster: 'last' biases x/off against FSE, 'first' in its favour)")
    parser.add_argument("--off-compilation-config", type=json.loads, default=None, metavar="JSON",
                        help="vLLM compilation config of the FSE-off engine, e.g. the Inductor option FSE sets: "
                             "'{\"inductor_compile_config\": {\"reorder_for_peak_memory\": false}}'")
    parser.add_argument("--eager", action="store_true", help="enforce eager mode (default: vLLM's default)")


def _engine_shape(args) -> EngineShape:
    return EngineShape(decode_batch=args.decode_batch, prefill_tokens=args.prefill_tokens,
                       prefill_request_len=args.prefill_request_len, input_len=args.input_len,
                       decode_tokens=8 + (len(MODES) + 1) * args.steps + 16, eager=args.eager)  # fmt: skip


def _mode_value(mode: str) -> int | None:
    return {"fused": ALWAYS, "split": 0, "auto": None, FLOOR: 0}[mode]


def decode_schedule(arms: tuple[str, ...], steps: int) -> list[tuple[str, ...]]:
    """``steps`` cycles of one step per arm, the order rotating by one each cycle (no arm always
    runs first after another engine's step or right after the switch)."""
    return [tuple(rotation(list(arms), cycle)) for cycle in range(steps)]


def measure_decode(llm, reqs: Requests, args, batch: int, off_llm=None, off_reqs=None) -> dict:
    """Per arm, the time of each of ``--steps`` decode steps at ``batch``; step ``i`` of every arm
    belongs to the same cycle (adjacent steps: the pairs of the ratios)."""
    arms = MODES + (FLOOR,) + (("off",) if off_llm is not None else ())
    total = 8 + (len(MODES) + 1) * args.steps + 8
    ids = reqs.add(batch, args.input_len, total)
    reqs.engine.step()  # prefill (one step)
    off_ids = []
    if off_llm is not None:
        off_ids = off_reqs.add(batch, args.input_len, total)
        off_reqs.engine.step()
    for _ in range(4):  # warm up
        reqs.engine.step()
        if off_llm is not None:
            off_reqs.engine.step()
    per_step: dict[str, list[float]] = {m: [] for m in arms}
    for cycle in decode_schedule(arms, args.steps):
        for arm in cycle:
            if arm == "off":
                per_step[arm].append(off_reqs.timed_step() * 1e3)
            else:
                llm.apply_model(functools.partial(set_mode, mode=arm))
                per_step[arm].append(reqs.timed_step() * 1e3)
    llm.apply_model(functools.partial(set_mode, mode="auto"))
    reqs.drain(ids)
    if off_llm is not None:
        off_reqs.drain(off_ids)
    return per_step


def measure_prefill(llm, reqs: Requests, args, tokens: int, off_reqs: Requests | None = None) -> dict:
    """Per round and arm, the time of one prefill step of ``tokens`` tokens."""
    arms = MODES + (("off",) if off_reqs is not None else ())
    per_round: dict[str, list[float]] = {m: [] for m in arms}
    for rnd in range(args.prefill_rounds + 1):  # round 0 warms up
        for arm in rotation(list(arms), rnd):
            engine_reqs = off_reqs if arm == "off" else reqs
            if arm != "off":
                llm.apply_model(functools.partial(set_mode, mode=arm))
            ids = engine_reqs.add_prefill(tokens, args.prefill_request_len)
            elapsed = engine_reqs.timed_step()
            engine_reqs.drain(ids)
            if rnd:
                per_round[arm].append(elapsed * 1e3)
    llm.apply_model(functools.partial(set_mode, mode="auto"))
    return per_round


def _ratios(per_round: dict[str, list[float]]) -> dict:
    out = {}
    for name, (a, b) in {"fused/split": ("split", "fused"), "auto/split": ("split", "auto"),
                         "split/off": ("off", "split"), "auto/off": ("off", "auto"),
                         "fused/off": ("off", "fused"), "routed/off": ("off", FLOOR),
                         "fused/routed": (FLOOR, "fused")}.items():  # fmt: skip
        if a in per_round and b in per_round:
            d = paired_delta(per_round[a], per_round[b])
            ci = None if d.ci_low_pct is None else [1 + d.ci_low_pct / 100, 1 + d.ci_high_pct / 100]
            out[name] = {"ratio": 1 + d.delta_pct / 100, "ci": ci, "significant": d.significant}
    return out


def run(args: argparse.Namespace) -> Path:
    import gc

    from vllm_fse.bench.routed_only import ROUTED_ONLY_CONFIG
    from vllm_fse.introspect import switch_state

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, dtype = resolve_model(args.model, args.preset, args.dtype)
    # Of two engines in one process the one built second runs its decode steps slightly faster
    # (the A/A control of `vllm-fse bench engine-groups`): --off-built says which way that bias goes.
    shape = _engine_shape(args)
    build_off = functools.partial(build_engine, shape, model, dtype, "0", args.off_compilation_config)
    off_llm = build_off() if args.confirm_off and args.off_built == "first" else None
    started = time.perf_counter()
    # The routed-only benchmark path (FLOOR) compiled into the graph.
    llm = build_engine(shape, model, dtype, "auto", additional_config=ROUTED_ONLY_CONFIG)
    startup_s = time.perf_counter() - started
    if args.confirm_off and args.off_built == "last":
        off_llm = build_off()
    # In eager mode vLLM's CPU start-up runs no forward: the first request resolves the switch.
    llm.generate([{"prompt_token_ids": [16, 17, 18]}], use_tqdm=False)
    [calibration] = llm.apply_model(switch_state)
    print(f"engine up in {startup_s:.0f} s; {calibration['describe']}", flush=True)
    result = {
        "meta": {"command": command_line(), "machine": describe_machine(), "model": model, "dtype": dtype,
                 "args": {k: v for k, v in vars(args).items() if k != "func"}, "startup_s": startup_s},
        "calibration": calibration,
    }  # fmt: skip
    [result["layer"]] = llm.apply_model(functools.partial(time_moe_layer, sizes=args.layer_sizes, reps=args.layer_reps))
    print("MoE layer timed", flush=True)
    reqs = Requests(llm)
    off_reqs = Requests(off_llm) if off_llm is not None else None
    result["decode"] = {}
    for batch in args.decode_batch:
        per_round = measure_decode(llm, reqs, args, batch, off_llm, off_reqs)
        result["decode"][batch] = {"step_ms": per_round, "ratios": _ratios(per_round)}
        print(f"decode batch {batch}: {_short(result['decode'][batch])}", flush=True)
    result["prefill"] = {}
    for tokens in args.prefill_tokens:
        per_round = measure_prefill(llm, reqs, args, tokens, off_reqs)
        result["prefill"][tokens] = {"step_ms": per_round, "ratios": _ratios(per_round)}
        print(f"prefill {tokens} tokens: {_short(result['prefill'][tokens])}", flush=True)
    del llm, off_llm
    gc.collect()
    (out / "crossover.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "crossover.md").write_text(render_markdown(result))
    plot_crossover(result, out / "crossover.png")
    print(f"results in {out}", flush=True)
    return out


def _ratio_text(r: dict) -> str:
    ci = "no CI" if r["ci"] is None else f"{r['ci'][0]:.3f}, {r['ci'][1]:.3f}"
    return f"{r['ratio']:.3f} [{ci}]"


def _short(entry: dict) -> str:
    return ", ".join(f"{k} {_ratio_text(v)}" for k, v in entry["ratios"].items())


def _ratio_cell(entry: dict, name: str) -> str:
    r = entry["ratios"].get(name)
    if r is None:
        return "-"
    return f"**{_ratio_text(r)}**" if r["significant"] else _ratio_text(r)


def render_markdown(result: dict) -> str:
    meta, cal = result["meta"], result["calibration"]
    lines = [
        f"# Fused vs split shared experts, paired in one engine: {Path(meta['model']).name}",
        "",
        f"- machine: {machine_line(meta['machine'])}",
        f"- command: `{meta['command']}`",
        f"- dtype {meta['dtype']}, {'eager' if meta['args']['eager'] else 'compiled (vLLM default)'}; "
        f"engine start {meta['startup_s']:.0f} s",
        f"- calibration: {cal['describe']}; it took {cal['resolve_s']:.1f} s",
        f"- FSE-off engine's compilation config: {meta['args'].get('off_compilation_config') or 'vLLM default'}",
        "",
        "Step-time ratios are geometric means of paired ratios with 95% intervals; **bold** excludes 1. "
        "Decode pairs adjacent steps (one step per arm in turn, order rotating), prefill pairs rounds. Modes "
        "of one engine: `fused` (= `VLLM_FSE=1`), `split` (vLLM's unfused computation, in the plugin's MoE layer), "
        "`auto`, and `routed` (the routed experts only, no shared expert: not lossless; `routed/off` is the "
        "limit of any fusing inside the op); `off` is a separate `VLLM_FSE=0` engine in the same process, "
        f"built {meta['args'].get('off_built', 'first')} (of two engines, the one built second runs slightly faster).",
        "",
        "## Decode steps",
        "",
        "| batch | steps | off ms | fused ms | split ms | auto ms | routed ms | fused/off | auto/off | split/off "
        "| routed/off | fused/split | fused/routed |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for batch, entry in result["decode"].items():
        med = {m: statistics.median(v) for m, v in entry["step_ms"].items()}
        ms = " | ".join(f"{med[m]:.2f}" if m in med else "-" for m in ("off", "fused", "split", "auto", FLOOR))
        cells = " | ".join(_ratio_cell(entry, k) for k in ("fused/off", "auto/off", "split/off", "routed/off",
                                                            "fused/split", "fused/routed"))  # fmt: skip
        lines.append(f"| {batch} | {len(entry['step_ms']['fused'])} | {ms} | {cells} |")
    lines += ["", "## Prefill steps", "",
              "| tokens | off ms | fused ms | split ms | auto ms | fused/off | auto/off | split/off | fused/split | auto/split |",
              "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for tokens, entry in result["prefill"].items():
        med = {m: statistics.median(v) for m, v in entry["step_ms"].items()}
        ms = " | ".join(f"{med[m]:.1f}" if m in med else "-" for m in ("off", "fused", "split", "auto"))
        cells = " | ".join(_ratio_cell(entry, k) for k in ("fused/off", "auto/off", "split/off", "fused/split",
                                                            "auto/split"))  # fmt: skip
        lines.append(f"| {tokens} | {ms} | {cells} |")
    lines += ["", "## One MoE layer call (median us)", "", "| tokens | fused | split | split - fused |", "|--:|--:|--:|--:|"]
    for row in result["layer"]:
        f, s = statistics.median(row["fused_us"]), statistics.median(row["split_us"])
        lines.append(f"| {row['tokens']} | {f:.0f} | {s:.0f} | {s - f:+.0f} |")
    return "\n".join(lines) + "\n"


def plot_crossover(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layer"]
    tokens = [r["tokens"] for r in rows]
    fig, (ax, rel) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for name, color in (("fused", "tab:blue"), ("split", "tab:orange")):
        med = [statistics.median(r[f"{name}_us"]) for r in rows]
        ax.plot(tokens, med, "o-", color=color, label=f"{name} (live layer)")
    cal = result["calibration"]
    if cal.get("measured"):
        ct = [m["tokens"] for m in cal["measured"]]
        ax.plot(ct, [m["fused_us"] for m in cal["measured"]], "x", color="tab:blue", alpha=0.6, label="fused (startup calibration)")
        ax.plot(ct, [m["split_us"] for m in cal["measured"]], "x", color="tab:orange", alpha=0.6, label="split (startup calibration)")
    switch = cal.get("fused_max_tokens")
    for axis in (ax, rel):
        if switch:
            axis.axvline(switch, color="gray", linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylabel("us per MoE layer call")
    ax.set_title(f"Fused vs split shared experts: {Path(result['meta']['model']).name}\n{cal['describe']}", fontsize=9)
    ax.legend(fontsize=8)
    rel.plot(tokens, [statistics.median(r["fused_us"]) / statistics.median(r["split_us"]) for r in rows], "o-",
             color="tab:blue", label="MoE layer: fused / split")  # fmt: skip
    for label, section, key in (("decode step fused/split", "decode", "fused/split"),
                                ("prefill step fused/split", "prefill", "fused/split"),
                                ("decode step auto/off", "decode", "auto/off"),
                                ("prefill step auto/split", "prefill", "auto/split")):  # fmt: skip
        pts = [(int(k), v["ratios"][key]) for k, v in result[section].items() if key in v["ratios"]]
        if pts:
            xs = [p[0] for p in pts]
            ys = [p[1]["ratio"] for p in pts]
            cis = [p[1]["ci"] or [y, y] for y, p in zip(ys, pts)]
            err = [[y - ci[0] for y, ci in zip(ys, cis)], [ci[1] - y for y, ci in zip(ys, cis)]]
            rel.errorbar(xs, ys, yerr=err, fmt="s--" if "auto" in label else "s-", capsize=3, label=label)
    rel.axhline(1.0, color="black", linewidth=0.8)
    rel.set_xlabel("tokens in the step (decode: batch size)")
    rel.set_ylabel("time ratio")
    rel.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-fse bench crossover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_crossover_arguments(parser)
    args = parser.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
