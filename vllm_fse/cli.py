"""The ``vllm-fse`` command line: ``tiny-model``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from vllm_fse.tiny_model import PRESETS, TinyMoeSpec


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` option per TinyMoeSpec field, overriding the preset."""
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="tiny", help="starting point (default: tiny)"
    )
    for field in dataclasses.fields(TinyMoeSpec):
        default = getattr(PRESETS["tiny"], field.name)
        kind = {bool: _parse_bool, int: int, float: float, str: str}[type(default)]
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=kind,
            default=None,
            metavar=type(default).__name__.upper(),
            help=f"(tiny preset: {default})",
        )


def spec_from_args(args: argparse.Namespace) -> TinyMoeSpec:
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TinyMoeSpec)
        if getattr(args, f.name) is not None
    }
    return dataclasses.replace(PRESETS[args.preset], **overrides)


def _tiny_model(args: argparse.Namespace) -> int:
    from vllm_fse.tiny_model import write_tiny_model

    spec = spec_from_args(args)
    out = write_tiny_model(args.out_dir, spec)
    print(f"tiny GLM-4 MoE checkpoint in {out} ({spec})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vllm_fse.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-fse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser(
        "tiny-model", help="write a deterministic tiny random GLM-4.x MoE checkpoint"
    )
    tiny.add_argument("out_dir", help="directory to write (created if missing)")
    add_spec_arguments(tiny)
    tiny.set_defaults(func=_tiny_model)

    from vllm_fse.demo import add_demo_arguments

    demo = sub.add_parser("demo", help="serve the tiny model with FSE off, on and auto; check they return the same tokens")
    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    check = sub.add_parser("check-vllm", help="check a vLLM release (source dir, .whl, or installed) has what the plugin uses")
    check.add_argument("source", nargs="?", help="vLLM source dir (holding vllm/) or .whl; default: the installed vLLM")
    check.set_defaults(func=_check_vllm)

    bench = sub.add_parser("bench", help="FSE off vs on: serving sweep, report, accuracy A/B, profile, engine steps, plot")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, module, help_text in (
        ("sweep", "sweep", "vllm bench serve over an ISL/OSL x concurrency grid, interleaved and repeated"),
        ("report", "report", "rebuild summary.md, summary.json and deltas.png of a sweep directory"),
        ("accuracy", "accuracy", "lm-eval on both arms: per-sample equality and accuracy delta"),
        ("profile", "profile", "where decode (or, with --prefill-tokens, prefill) time goes, per operator"),
        ("crossover", "crossover", "fused vs split (and auto) paired inside one engine, per token count"),
        ("engine-groups", "engine_groups", "arms across several engines each in one process, with an A/A control"),
        ("plot", "plot", "step time against FSE off per token count, from engine-groups and crossover results"),
    ):
        bench_sub.add_parser(name, help=help_text, add_help=False).set_defaults(
            func=_bench, bench_module=module
        )
    return parser


def _check_vllm(args: argparse.Namespace) -> int:
    from vllm_fse.vllm_compat import main as check_main

    return check_main([args.source] if args.source else [])


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"vllm_fse.bench.{args.bench_module}")
    return module.main(args.bench_argv)


def main(argv: list[str] | None = None) -> int:
    # `bench` subcommands own their options: everything after the subcommand goes to them.
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "bench":
        args.bench_argv = rest
    elif rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
