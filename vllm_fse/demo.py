"""``vllm-fse demo``: serve the embedded tiny GLM-4 MoE model with FSE off and on, side by side.

Each arm is one OpenAI server (``python -m vllm.entrypoints.openai.api_server``) started with
its own ``VLLM_FSE``; the same greedy completions go to both, streamed so that every output
token is timed. The demo prints what each server says about FSE, the texts side by side with
TTFT and per-token latency, and whether the texts are identical.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from vllm_fse.compat import cache_dir
from vllm_fse.tiny_model import PRESETS, spec_fingerprint, write_tiny_model

DEMO_PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a small model that",
    "What is the capital of France?",
    "def forward(self, hidden_states):",
]


@dataclass(frozen=True)
class Arm:
    label: str
    env: dict[str, str]


DEMO_ARMS = [
    Arm("FSE off", {"VLLM_FSE": "0"}),
    Arm("FSE on", {"VLLM_FSE": "1"}),
]


def cached_model(preset: str) -> Path:
    """The preset's checkpoint, written once into the cache and reused."""
    spec = PRESETS[preset]
    return write_tiny_model(cache_dir() / "models" / f"{preset}-{spec_fingerprint(spec)}", spec)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="model directory (default: the cached tiny preset)"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--log-dir", default=None, help="keep the server logs here")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for both servers, e.g. --server-arg=--tensor-parallel-size=2",
    )


def _server_args(args: argparse.Namespace) -> list[str]:
    return [
        "--dtype",
        args.dtype,
        "--max-model-len",
        "1024",
        "--enforce-eager",
        "--seed",
        "0",
        *args.server_arg,
    ]


def _run_arm(arm: Arm, model: Path, args: argparse.Namespace, log_dir: Path) -> dict:
    from vllm_fse.server import OpenAIServer

    log_path = log_dir / f"server-{arm.label.replace(' ', '_')}.log"
    print(f"\n[{arm.label}] starting the OpenAI server ({' '.join(f'{k}={v!r}' for k, v in arm.env.items())})")
    with OpenAIServer(model, _server_args(args), env=arm.env, log_path=log_path, served_model_name="tiny-glm") as server:
        print(f"[{arm.label}] healthy after {server.startup_s:.1f}s; log: {log_path}")
        params = {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}
        server.complete(DEMO_PROMPTS[0], **params)  # warm-up: the first step is slow
        completions = [server.stream_complete(p, **params) for p in DEMO_PROMPTS]
        plugin_lines = server.log_lines("FseGlm4MoeForCausalLM FSE")
    return {"completions": completions, "plugin_lines": plugin_lines, "startup_s": server.startup_s}


def run_demo(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else cached_model(args.preset)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="vllm-fse-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"vllm-fse demo on {model}")

    results = {arm.label: _run_arm(arm, model, args, log_dir) for arm in DEMO_ARMS}

    width = max(len("same text"), *(len(arm.label) for arm in DEMO_ARMS))
    print("\n" + "=" * 78)
    for arm in DEMO_ARMS:
        lines = results[arm.label]["plugin_lines"]
        said = lines[-1].split("vllm-fse: ", 1)[-1] if lines else "no vllm-fse log line (plugin not loaded?)"
        print(f"{arm.label:<{width}} | {said}")
    same = 0
    for i, prompt in enumerate(DEMO_PROMPTS):
        print(f"\nprompt {i + 1}: {prompt!r}")
        texts = []
        for arm in DEMO_ARMS:
            c = results[arm.label]["completions"][i]
            texts.append(c.text)
            shown = textwrap.shorten(repr(c.text), 60, placeholder="...'")
            print(
                f"  {arm.label:<{width}} | TTFT {c.ttft_s * 1e3:6.1f} ms | "
                f"{c.tpot_s * 1e3:5.2f} ms/token | {shown}"
            )
        identical = all(t == texts[0] for t in texts)
        same += identical
        print(f"  {'same text':<{width}} | {'yes' if identical else 'NO'}")
    print("\n" + "=" * 78)
    print(f"identical greedy completions: {same}/{len(DEMO_PROMPTS)}")
    for arm in DEMO_ARMS:
        tpots = [c.tpot_s * 1e3 for c in results[arm.label]["completions"]]
        print(
            f"{arm.label:<{width}} | median {statistics.median(tpots):.2f} ms/token over "
            f"{len(tpots)} streams of {args.max_tokens} tokens | startup "
            f"{results[arm.label]['startup_s']:.1f}s"
        )
    return 0 if same == len(DEMO_PROMPTS) else 1
