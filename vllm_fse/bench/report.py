"""Tables, JSON summary and plot of a sweep directory (``vllm-fse bench report OUT``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_fse.bench.stats import PairedDelta, paired_delta


@dataclass(frozen=True)
class Metric:
    key: str  # in vLLM's benchmark result
    title: str
    lower_is_better: bool
    digits: int


METRICS = (
    Metric("mean_tpot_ms", "TPOT mean (ms)", True, 2),
    Metric("p99_tpot_ms", "TPOT p99 (ms)", True, 2),
    Metric("output_throughput", "Output tok/s", False, 1),
    Metric("total_token_throughput", "Total tok/s", False, 1),
)


def load_runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "raw").glob("*/*.json"))]


def cell_tuple(run: dict) -> tuple[int, int, int]:
    c = run["cell"]
    return c["input_len"], c["output_len"], c["concurrency"]


def paired_cells(runs: list[dict], arm: str = "on") -> dict[tuple[int, int, int], dict[str, PairedDelta]]:
    """Per cell and metric, the paired delta of ``arm`` against off over the repeats where both ran."""
    by_cell: dict[tuple, dict[int, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        by_cell[cell_tuple(run)][run["rep"]][run["arm"]] = run["result"]
    cells = {}
    for cell, reps in sorted(by_cell.items()):
        pairs = [(arms["off"], arms[arm]) for _, arms in sorted(reps.items()) if {"off", arm} <= arms.keys()]
        if not pairs:
            continue
        cells[cell] = {
            m.key: paired_delta([a[m.key] for a, _ in pairs], [b[m.key] for _, b in pairs]) for m in METRICS
        }
        cells[cell]["_spec"] = _acceptance(pairs)
    return cells


def _acceptance(pairs: list[tuple[dict, dict]]) -> dict[str, float] | None:
    """Draft acceptance of off and the compared arm over the cell's runs (None without
    speculative decoding)."""
    rates = {}
    for arm, index in (("off", 0), ("arm", 1)):
        drafted = sum(p[index].get("spec_decode_draft_tokens", 0) for p in pairs)
        accepted = sum(p[index].get("spec_decode_accepted_tokens", 0) for p in pairs)
        if drafted:
            rates[arm] = 100.0 * accepted / drafted
    return rates or None


def _delta_text(d: PairedDelta) -> str:
    """The seeds' Δ, B/A of the shown medians; bold when the paired interval excludes zero."""
    text = f"{100 * (d.median_b / d.median_a - 1):+.1f}%"
    return f"**{text}**" if d.significant else text


def seeds_table(cells: dict, label: str = "FSE=1") -> list[str]:
    """The seed PRs' table: ``A -> B (delta)`` per metric; bold deltas are beyond noise."""
    header = "| ISL | OSL | MC | " + " | ".join(f"{m.title} FSE=0 -> {label} (Δ)" for m in METRICS) + " |"
    lines = [header, "|" + "----:|" * 3 + "".join("---:|" for _ in METRICS)]
    for (isl, osl, mc), deltas in cells.items():
        parts = []
        for m in METRICS:
            d = deltas[m.key]
            parts.append(f"{d.median_a:.{m.digits}f} -> {d.median_b:.{m.digits}f} ({_delta_text(d)})")
        lines.append(f"| {isl} | {osl} | {mc} | " + " | ".join(parts) + " |")
    return lines


def noise_table(cells: dict, arm: str = "on") -> list[str]:
    tpot, out = METRICS[0], METRICS[2]
    lines = [
        f"| ISL | OSL | MC | n | TPOT off [min-max] | TPOT {arm} [min-max] | paired Δ TPOT, 95% CI | verdict | "
        "paired Δ output tok/s, 95% CI | verdict |",
        "|----:|----:|---:|--:|---:|---:|---:|:--|---:|:--|",
    ]
    for (isl, osl, mc), deltas in cells.items():
        t, o = deltas[tpot.key], deltas[out.key]
        lines.append(
            f"| {isl} | {osl} | {mc} | {t.n} | {t.median_a:.2f} [{t.min_a:.2f}-{t.max_a:.2f}] | "
            f"{t.median_b:.2f} [{t.min_b:.2f}-{t.max_b:.2f}] | {t.delta_pct:+.1f}% {t.ci_text()} | "
            f"{t.verdict(tpot.lower_is_better)} | {o.delta_pct:+.1f}% {o.ci_text()} | {o.verdict(out.lower_is_better)} |"
        )
    return lines


ARM_LABEL = {"on": "FSE=1", "auto": "auto"}


def _plot_name(arm: str) -> str:
    return "deltas.png" if arm == "on" else f"deltas-{arm}.png"


def render_markdown(manifest: dict, comparisons: dict[str, dict]) -> str:
    """Every compared arm against off: the seeds' table, the noise table, draft acceptance."""
    from vllm_fse.bench.machine import machine_line

    cfg = manifest["config"]
    env = {arm: " ".join(f"{k}={v}" for k, v in e.items()) for arm, e in cfg["arm_env"].items()}
    arms_text = ", ".join(f"{ARM_LABEL.get(arm, 'FSE=0')} `{env[arm]}`" for arm in env)
    names = " and ".join(ARM_LABEL[arm] for arm in comparisons)
    lines = [
        f"# FSE off vs {'on' if list(comparisons) == ['on'] else ' and '.join(comparisons)}: "
        f"`vllm bench serve` sweep, {Path(cfg['model']).name}",
        "",
        f"- Machine: {machine_line(manifest['machine'])}",
        f"- Arms: {arms_text}; servers: {cfg['servers']}",
        f"- Server arguments (all arms): `{' '.join(cfg['server_args'])}`",
        f"- Random dataset, greedy, `--ignore-eos`; prompts per run max({cfg['prompts_per_concurrency']} x MC, "
        f"{cfg['min_prompts']}); {manifest['repeats']} interleaved repeats per cell and arm",
        f"- Command: `{manifest.get('command', '')}`",
        "",
        "Values are medians over the repeats and Δ compares them. **Bold**: the effect is beyond noise, i.e. the "
        f"95% interval of the paired effect (geometric mean of the per-repeat ratios {names} / FSE=0, Student t on "
        "the log ratios) excludes zero; the *Noise* table gives that paired effect and its interval.",
    ]
    for arm, cells in comparisons.items():
        label = ARM_LABEL[arm]
        heading = "" if len(comparisons) == 1 else f" ({label} vs FSE=0)"
        if len(comparisons) > 1:
            lines += ["", f"## {label} vs FSE=0"]
        lines += ["", *seeds_table(cells, label), "", f"## Noise{heading}", "", *noise_table(cells, arm)]
        spec = {cell: d["_spec"] for cell, d in cells.items() if d["_spec"]}
        if spec:
            lines += ["", f"## Draft acceptance (speculative decoding){heading}", "",
                      f"| ISL | OSL | MC | FSE=0 | {label} |", "|----:|----:|---:|---:|---:|"]  # fmt: skip
            for (isl, osl, mc), rates in spec.items():
                lines.append(f"| {isl} | {osl} | {mc} | {rates.get('off', 0):.1f}% | {rates.get('arm', 0):.1f}% |")
        lines += ["", f"![deltas {label}]({_plot_name(arm)})"]
    return "\n".join(lines) + "\n"


PLOT_CI_MAX_PCT = 100.0


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def plot_deltas(cells: dict, title: str, path: Path, label: str = "FSE=1") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    io_pairs = sorted({(isl, osl) for isl, osl, _ in cells})
    for ax, metric in zip(axes.flat, METRICS):
        for isl, osl in io_pairs:
            points = sorted((mc, d[metric.key]) for (i, o, mc), d in cells.items() if (i, o) == (isl, osl))
            xs = [mc for mc, _ in points]
            ys = [d.delta_pct for _, d in points]
            # Intervals of a few noisy pairs can be huge: clip them to the plotted range.
            lo = [max(0.0, d.delta_pct - max(_or(d.ci_low_pct, d.delta_pct), -100.0)) for _, d in points]
            hi = [max(0.0, min(_or(d.ci_high_pct, d.delta_pct), PLOT_CI_MAX_PCT) - d.delta_pct) for _, d in points]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, label=f"ISL {isl} / OSL {osl}")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        better = "lower is better" if metric.lower_is_better else "higher is better"
        ax.set_title(f"{metric.title}: {label} vs FSE=0 ({better})", fontsize=10)
        ax.set_ylabel("Δ %")
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("max concurrency")
        ax.set_xticks(sorted({mc for *_, mc in cells}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title + "\n(95% CI of the paired delta)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cells_summary(cells: dict) -> list[dict]:
    return [
        {"input_len": isl, "output_len": osl, "concurrency": mc,
         "acceptance_pct": d["_spec"],
         **{m.key: {**asdict(d[m.key]), "verdict": d[m.key].verdict(m.lower_is_better)} for m in METRICS}}
        for (isl, osl, mc), d in cells.items()
    ]  # fmt: skip


def write_report(out: Path) -> Path:
    manifest = json.loads((out / "sweep.json").read_text())
    arms = manifest["config"].get("arms") or ["off", "on"]
    runs = load_runs(out)
    comparisons = {arm: cells for arm in arms if arm != "off" and (cells := paired_cells(runs, arm))}
    if not comparisons:
        raise SystemExit(f"{out}: no cell has off and another arm yet")
    summary = {"manifest": manifest, "comparisons": {arm: _cells_summary(c) for arm, c in comparisons.items()}}
    if "on" in comparisons:
        summary["cells"] = summary["comparisons"]["on"]  # the off-vs-on table, as before --arms
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    model = Path(manifest["config"]["model"]).name
    for arm, cells in comparisons.items():
        plot_deltas(cells, f"FSE off vs {arm}, {model}", out / _plot_name(arm), ARM_LABEL[arm])
    path = out / "summary.md"
    path.write_text(render_markdown(manifest, comparisons))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-fse bench report", description=__doc__)
    parser.add_argument("out", help="a sweep's results directory")
    args = parser.parse_args(argv)
    print(write_report(Path(args.out)).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
