"""``vllm-fse bench plot``: step time against FSE off, per token count, from engine-groups and
crossover results.

Each source is ``FILE[:ARM,...]``: an ``engine-groups`` JSON file or a ``crossover.json``, and
which arms of it to draw (default: every arm with a ratio against ``off``); where two sources have
the same arm at the same step, the first one named is drawn. A point is an arm's
step time over FSE off's at one step size (decode: the batch, one token per request; prefill: the
tokens of the step) with its 95% interval; points of one arm are joined, decode and prefill
separately. A line at 1 is FSE off.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLE = {"fused": ("tab:blue", "o"), "split": ("tab:orange", "s"), "auto": ("tab:green", "D"),
         "routed": ("tab:gray", "v")}  # fmt: skip


def points(result: dict, base: str = "off") -> dict[str, list[tuple[str, int, float, list[float] | None]]]:
    """``{arm: [(step kind, tokens, ratio, ci), ...]}`` of every ``arm/base`` ratio in an
    engine-groups result (``rows``) or a crossover result (``decode``/``prefill``)."""
    out: dict[str, list] = {}

    def add(kind: str, tokens: int, ratios: dict) -> None:
        for name, r in ratios.items():
            arm, _, against = name.partition("/")
            if against == base:
                out.setdefault(arm, []).append((kind, int(tokens), r["ratio"], r["ci"]))

    for row in result.get("rows", []):
        kind = "decode" if "batch" in row else "prefill"
        add(kind, row.get("batch", row.get("prefill_tokens")), row["ratios"])
    for kind in ("decode", "prefill"):
        for tokens, entry in (result.get(kind) or {}).items():
            add(kind, tokens, entry["ratios"])
    return out


def plot(sources: list[tuple[str, list[str] | None]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen: dict[str, dict[tuple[str, int], tuple]] = {}  # arm -> (kind, tokens) -> point; first source wins
    for path, arms in sources:
        by_arm = points(json.loads(Path(path).read_text()))
        for arm in arms or sorted(by_arm):
            if arm not in by_arm:
                raise SystemExit(f"{path}: no ratio {arm}/off (has {sorted(by_arm)})")
            for p in by_arm[arm]:
                chosen.setdefault(arm, {}).setdefault(p[:2], p)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ticks = sorted({tokens for pts in chosen.values() for _, tokens in pts})
    for arm, by_step in chosen.items():
        color, marker = STYLE.get(arm, ("black", "x"))
        for kind in ("decode", "prefill"):
            pts = sorted(p for p in by_step.values() if p[0] == kind)
            if not pts:
                continue
            xs = [p[1] for p in pts]
            ys = [p[2] for p in pts]
            cis = [p[3] or [y, y] for y, p in zip(ys, pts)]
            err = [[y - ci[0] for y, ci in zip(ys, cis)], [ci[1] - y for y, ci in zip(ys, cis)]]
            ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, linestyle="-" if kind == "decode" else "--",
                        capsize=3, label=f"{arm} / off, {kind}")  # fmt: skip
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("tokens in the step (decode: batch size, solid; prefill: dashed)")
    ax.set_ylabel("step time / FSE off (lower is faster)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_source(text: str) -> tuple[str, list[str] | None]:
    path, sep, arms = text.partition(":")
    return path, [a for a in arms.split(",") if a] if sep else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-fse bench plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("sources", nargs="+", type=parse_source, metavar="FILE[:ARM,...]")
    parser.add_argument("--out", required=True, help="PNG file")
    parser.add_argument("--title", default="Step time against FSE off (95% intervals)")
    args = parser.parse_args(argv)
    plot(args.sources, Path(args.out), args.title)
    print(f"plot in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
