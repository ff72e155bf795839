"""``vllm-fse demo``: serve the embedded tiny GLM-4 MoE model with FSE off, on and ``auto``, and
check that all three produce the same tokens.

Each arm is one OpenAI server (``python -m vllm.entrypoints.openai.api_server``) started with its
own ``VLLM_FSE``; the same greedy completions go to each. The demo prints what each server's
plugin says about FSE, the texts side by side, and whether every arm returned FSE off's token
ids, with the largest difference in their log-probabilities. It makes no speed claim: a handful
of short streams on a tiny model cannot tell a few percent from noise (``docs/benchmarks.md``
says how to measure speed).
"""

from __future__ import annotations

import argparse
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
    Arm("FSE auto", {"VLLM_FSE": "auto"}),
]
RANDOM_WEIGHTS_NOTE = (
    "The tiny model's weights are random, so its text is noise; what counts is that FSE off, on "
    "and auto return the same tokens."
)


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]


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
    parser.add_argument(
        "--logprob-atol", type=float, default=1e-3,
        help="largest |log-probability difference| to FSE off that counts as the same (fp32; bf16 needs ~0.05)",
    )  # fmt: skip
    parser.add_argument("--log-dir", default=None, help="keep the server logs here")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for every server, e.g. --server-arg=--tensor-parallel-size=2",
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


def _complete(server, prompt: str, max_tokens: int) -> Completion:
    response = server.complete(
        prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=1, return_token_ids=True
    )
    [choice] = response["choices"]
    return Completion(choice["text"], choice["token_ids"], choice["logprobs"]["token_logprobs"])


def _run_arm(arm: Arm, model: Path, args: argparse.Namespace, log_dir: Path) -> dict:
    from vllm_fse.server import OpenAIServer

    log_path = log_dir / f"server-{arm.label.replace(' ', '_')}.log"
    print(f"[{arm.label}] starting the OpenAI server ({' '.join(f'{k}={v}' for k, v in arm.env.items())})", flush=True)
    with OpenAIServer(model, _server_args(args), env=arm.env, log_path=log_path, served_model_name="tiny-glm") as server:
        print(f"[{arm.label}] ready; log: {log_path}", flush=True)
        completions = [_complete(server, p, args.max_tokens) for p in DEMO_PROMPTS]
        # Under auto the plan line comes once the switch point is known (here: the first request).
        plugin_lines = server.log_lines("vllm-fse: Fse")
    return {"completions": completions, "plugin_lines": plugin_lines}


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 4] + "...'"


def compare(reference: Completion, other: Completion) -> tuple[bool, float]:
    """Same token ids, and the largest |log-probability difference| over them."""
    same = reference.token_ids == other.token_ids
    diff = max((abs(a - b) for a, b in zip(reference.logprobs, other.logprobs)), default=0.0)
    return same, diff


def run_demo(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else cached_model(args.preset)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="vllm-fse-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"vllm-fse demo on {model}\n{RANDOM_WEIGHTS_NOTE}\n")

    results = {arm.label: _run_arm(arm, model, args, log_dir) for arm in DEMO_ARMS}

    width = max(len(arm.label) for arm in DEMO_ARMS)
    print("\n" + "=" * 78)
    print("What each server's plugin says:")
    for arm in DEMO_ARMS:
        lines = results[arm.label]["plugin_lines"]
        said = lines[-1].split("vllm-fse: ", 1)[-1] if lines else "no plan line (FSE not requested: vLLM's own classes)"
        print(textwrap.fill(said, 100, initial_indent=f"{arm.label:<{width}} | ", subsequent_indent=" " * (width + 3),
                            break_on_hyphens=False, break_long_words=False))
    reference_label = DEMO_ARMS[0].label
    agree = {arm.label: 0 for arm in DEMO_ARMS[1:]}
    worst = {arm.label: 0.0 for arm in DEMO_ARMS[1:]}
    for i, prompt in enumerate(DEMO_PROMPTS):
        print(f"\nprompt {i + 1}: {prompt!r}")
        reference = results[reference_label]["completions"][i]
        for arm in DEMO_ARMS:
            c = results[arm.label]["completions"][i]
            shown = _clip(repr(c.text), 60)
            verdict = ""
            if arm.label != reference_label:
                same, diff = compare(reference, c)
                ok = same and diff <= args.logprob_atol
                agree[arm.label] += ok
                worst[arm.label] = max(worst[arm.label], diff)
                verdict = f"  {'same tokens' if same else 'DIFFERENT tokens'} as FSE off, max |d logprob| {diff:.1e}"
            print(f"  {arm.label:<{width}} | {shown}{verdict}")
    print("\n" + "=" * 78)
    for label, count in agree.items():
        print(
            f"{label} vs FSE off: {count}/{len(DEMO_PROMPTS)} completions token for token the same "
            f"({args.max_tokens} tokens each), max |d logprob| {worst[label]:.1e} (tolerance {args.logprob_atol:g})"
        )
    print("No speed is measured here: see docs/benchmarks.md for how to measure FSE on your model and machine.")
    return 0 if all(count == len(DEMO_PROMPTS) for count in agree.values()) else 1
