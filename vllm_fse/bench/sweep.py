"""``vllm-fse bench sweep``: FSE off vs on over an (ISL, OSL, MC) grid with vLLM's serving benchmark.

Each arm is an OpenAI server (``python -m vllm.entrypoints.openai.api_server``) with its own
environment (``VLLM_FSE=0`` / ``VLLM_FSE=1`` plus any ``--env*``) and the same server arguments.
``vllm.benchmarks.serve`` runs in-process against them over the grid. The arms are interleaved
(every repeat measures both, alternating which goes first) so that the machine's drifts fall on
both, and every cell is repeated; the report gives medians, spreads and a paired 95% interval
per delta, and calls a delta noise when its interval contains zero.

Every finished run is written at once to ``OUT/raw/<cell>/<arm>-rep<N>.json``; rerunning the same
command skips what is there (resume after an interruption, or raise ``--repeats`` to extend).
``vllm-fse bench report OUT`` rebuilds ``summary.md``, ``summary.json`` and ``deltas.png`` from it.

Servers: ``--servers both`` keeps both arms up for the whole sweep (CPU default: the cheapest
interleaving); ``--servers alternate`` runs one server at a time, restarting per repeat and arm
(default where a GPU is visible, since two servers rarely fit on one device).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_fse.bench.arms import (
    ALL_ARMS,
    ARM_NAMES,
    SERVED_MODEL_NAME,
    ArmServers,
    add_model_arguments,
    add_server_arguments,
    arm_environments,
    arm_order,
    parse_env,
    resolve_model,
    server_mode,
)

# Scalars kept from vLLM's benchmark result (its per-request lists are dropped).
RESULT_LISTS_DROPPED = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times",
                        "queue_times", "generated_texts", "errors", "spec_decode_per_position_acceptance_rates")  # fmt: skip


@dataclass(frozen=True, order=True)
class Cell:
    input_len: int
    output_len: int
    concurrency: int

    @property
    def key(self) -> str:
        return f"isl{self.input_len}-osl{self.output_len}-mc{self.concurrency}"


@dataclass(frozen=True)
class Run:
    rep: int
    cell: Cell
    arm: str

    def path(self, out: Path) -> Path:
        return out / "raw" / self.cell.key / f"{self.arm}-rep{self.rep}.json"


def parse_io(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected ISL/OSL such as 1024/128, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def grid(io_pairs: list[tuple[int, int]], concurrencies: list[int]) -> list[Cell]:
    return [Cell(isl, osl, mc) for isl, osl in io_pairs for mc in concurrencies]


def schedule(cells: list[Cell], repeats: int, servers: str, arms: Sequence[str] = ARM_NAMES) -> list[Run]:
    """The order of all runs. ``both``: arms take turns within each cell; ``alternate``: per
    repeat, one arm's server runs the whole grid, then the next's (order rotating)."""
    runs = []
    for rep in range(repeats):
        if servers == "both":
            for i, cell in enumerate(cells):
                runs += [Run(rep, cell, arm) for arm in arm_order(rep + i, arms)]
        else:
            for arm in arm_order(rep, arms):
                runs += [Run(rep, cell, arm) for cell in cells]
    return runs


def num_prompts(cell: Cell, per_concurrency: int, minimum: int) -> int:
    return max(per_concurrency * cell.concurrency, minimum)


# -- configuration ---------------------------------------------------------------------------


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="results directory (resumed if it exists)")
    add_model_arguments(parser, preset="bench")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for the benchmark client (default: the model)")
    parser.add_argument("--grid", type=parse_io, nargs="+", default=[(256, 64), (1024, 128)], metavar="ISL/OSL",
                        help="input/output lengths (default: 256/64 1024/128)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], metavar="MC",
                        help="max concurrency values (default: 1 4 16)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per cell and arm (default: 5)")
    parser.add_argument("--prompts-per-concurrency", type=int, default=4,
                        help="prompts per run = max(this * MC, --min-prompts) (default: 4)")
    parser.add_argument("--min-prompts", type=int, default=8)
    parser.add_argument("--num-warmups", type=int, default=1, help="warm-up requests before each run")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed of repeat 0; repeat N uses seed+N")
    add_server_arguments(parser)
    parser.add_argument("--arms", nargs="+", choices=ALL_ARMS, default=list(ARM_NAMES),
                        help="arms to compare with off (default: off on; add auto for VLLM_FSE=auto)")
    parser.add_argument("--env-auto", type=parse_env, action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the auto server only")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard results in --out that were made with a different configuration")


@dataclass
class SweepConfig:
    model: str
    tokenizer: str
    cells: list[Cell]
    repeats: int
    prompts_per_concurrency: int
    min_prompts: int
    num_warmups: int
    seed: int
    server_args: list[str]
    arm_env: dict[str, dict[str, str]]
    servers: str
    arms: list[str] = field(default_factory=lambda: list(ARM_NAMES))

    def identity(self) -> dict:
        """What must match for old runs to be reused (repeats may grow)."""
        data = asdict(self)
        data.pop("repeats")
        if data["arms"] == list(ARM_NAMES):  # sweeps from before --arms
            data.pop("arms")
        return data


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    model, dtype = resolve_model(args.model, args.preset, args.dtype)
    cells = grid(args.grid, args.concurrency)
    longest = max(c.input_len + c.output_len for c in cells)
    # Defaults first: a later --server-arg of the same name wins in vLLM's parser.
    server_args = [
        "--max-model-len", str(longest + 64),
        "--max-num-seqs", str(max(args.concurrency)),
        "--seed", "0",
        *(["--dtype", dtype] if dtype else []),
        *args.server_arg,
    ]  # fmt: skip
    arms = list(dict.fromkeys(["off", *args.arms]))  # off is the reference of every comparison
    arm_env = arm_environments(dict(args.env), dict(args.env_off), dict(args.env_on), dict(args.env_auto), arms)
    return SweepConfig(
        model=model,
        tokenizer=args.tokenizer or model,
        cells=cells,
        repeats=args.repeats,
        prompts_per_concurrency=args.prompts_per_concurrency,
        min_prompts=args.min_prompts,
        num_warmups=args.num_warmups,
        seed=args.seed,
        server_args=server_args,
        arm_env=arm_env,
        servers=server_mode(args.servers),
        arms=arms,
    )


# -- running ---------------------------------------------------------------------------------


def bench_namespace(config: SweepConfig, run: Run, base_url: str) -> argparse.Namespace:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    cell = run.cell
    return parser.parse_args(
        [
            "--backend", "openai",
            "--base-url", base_url,
            "--model", SERVED_MODEL_NAME,
            "--tokenizer", config.tokenizer,
            "--dataset-name", "random",
            "--random-input-len", str(cell.input_len),
            "--random-output-len", str(cell.output_len),
            "--random-range-ratio", "0",
            "--num-prompts", str(num_prompts(cell, config.prompts_per_concurrency, config.min_prompts)),
            "--max-concurrency", str(cell.concurrency),
            "--ignore-eos",
            "--temperature", "0",  # greedy: the same tokens, and the same drafts, in both arms
            "--seed", str(config.seed + run.rep),  # same prompts for both arms of a repeat
            "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99",
            "--num-warmups", str(config.num_warmups),
            "--disable-tqdm",
        ]
    )  # fmt: skip


def run_benchmark(config: SweepConfig, run: Run, base_url: str, log) -> dict:
    from vllm.benchmarks.serve import main as bench_main

    namespace = bench_namespace(config, run, base_url)
    with contextlib.redirect_stdout(log):
        print(f"\n===== {run.cell.key} {run.arm} rep{run.rep} =====", flush=True)
        result = bench_main(namespace)
    expected = namespace.num_prompts
    if result.get("completed") != expected or result.get("failed"):
        errors = [e for e in result.get("errors") or [] if e][:3]
        raise RuntimeError(
            f"{run.cell.key} {run.arm} rep{run.rep}: {result.get('completed')}/{expected} requests "
            f"completed, {result.get('failed')} failed: {errors}"
        )
    return {k: v for k, v in result.items() if k not in RESULT_LISTS_DROPPED}


def _write_json(path: Path, data: dict) -> None:
    """Atomically: an interrupted write never leaves a half file that resume would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def load_manifest(out: Path) -> dict | None:
    path = out / "sweep.json"
    return json.loads(path.read_text()) if path.exists() else None


def prepare_out_dir(out: Path, config: SweepConfig, overwrite: bool) -> None:
    old = load_manifest(out)
    if old is not None and old["config"] != config.identity():
        if not overwrite:
            changed = sorted(k for k in config.identity() if old["config"].get(k) != config.identity()[k])
            raise SystemExit(
                f"{out} holds a sweep with a different configuration ({', '.join(changed)} differ); "
                "choose another --out, or pass --overwrite to discard it"
            )
        import shutil

        shutil.rmtree(out / "raw", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def write_manifest(out: Path, config: SweepConfig, servers_info: dict) -> None:
    from vllm_fse.bench.machine import command_line, describe_machine

    old = load_manifest(out) or {}
    info = {**old.get("servers", {}), **servers_info}
    _write_json(
        out / "sweep.json",
        {
            "config": config.identity(),
            "repeats": config.repeats,
            "command": command_line(),
            "machine": describe_machine(),
            "servers": info,
        },
    )


def _fmt_s(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def pending_runs(config: SweepConfig, out: Path) -> Iterator[Run]:
    for run in schedule(config.cells, config.repeats, config.servers, config.arms):
        if not run.path(out).exists():
            yield run


def run_sweep(config: SweepConfig, out: Path, startup_timeout_s: float = 1800.0, overwrite: bool = False) -> Path:
    prepare_out_dir(out, config, overwrite)
    total = len(schedule(config.cells, config.repeats, config.servers, config.arms))
    todo = list(pending_runs(config, out))
    done_before = total - len(todo)
    print(f"sweep: {len(config.cells)} cells x {len(config.arms)} arms x {config.repeats} repeats = {total} runs; "
          f"{done_before} already in {out}, {len(todo)} to run", flush=True)
    servers = ArmServers(config.model, config.server_args, config.arm_env, out / "logs", startup_timeout_s)
    write_manifest(out, config, {})
    started = time.monotonic()
    run_seconds: list[float] = []
    try:
        (out / "logs").mkdir(exist_ok=True)
        with open(out / "logs" / "bench.log", "a") as log:  # the benchmark's own printout
            for run in todo:
                servers.ensure(config.arms if config.servers == "both" else (run.arm,))
                t0 = time.monotonic()
                result = run_benchmark(config, run, servers.url(run.arm), log)
                _write_json(run.path(out), {"rep": run.rep, "arm": run.arm, "cell": asdict(run.cell),
                                            "env": config.arm_env[run.arm], "result": result})
                run_seconds.append(time.monotonic() - t0)
                elapsed = time.monotonic() - started
                eta = sum(run_seconds) / len(run_seconds) * (len(todo) - len(run_seconds))  # runs only
                print(
                    f"[{done_before + len(run_seconds)}/{total}] rep {run.rep} {run.cell.key} {run.arm:>4}: "
                    f"TPOT {result['mean_tpot_ms']:.2f} ms, p99 {result['p99_tpot_ms']:.2f} ms, "
                    f"out {result['output_throughput']:.1f} tok/s ({run_seconds[-1]:.0f}s) | "
                    f"elapsed {_fmt_s(elapsed)}, ETA {_fmt_s(eta)}",
                    flush=True,
                )
                write_manifest(out, config, servers.info)
    finally:
        servers.stop_all()
    from vllm_fse.bench.report import write_report

    return write_report(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-fse bench sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_arguments(parser)
    args = parser.parse_args(argv)
    return sweep_command(args)


def sweep_command(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    summary = run_sweep(config, Path(args.out), args.startup_timeout, args.overwrite)
    print(summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
