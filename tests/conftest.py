"""Shared fixtures: tiny checkpoints, a one-process-per-engine runner, platform markers."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_fse.tiny_model import PRESETS, TinyGlmSpec, write_tiny_model

TESTS_DIR = Path(__file__).parent

# Engine processes: tiny KV cache, and LLM.apply_model needs to pickle our probe functions.
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "VLLM_LOGGING_LEVEL": "INFO",
}

DEFAULT_PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a small model that",
    "What is the capital of France?",
    "def forward(self, hidden_states):",
]


def _on_rocm() -> bool:
    import torch

    return getattr(torch.version, "hip", None) is not None


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available() and not _on_rocm()


def pytest_collection_modifyitems(config, items):
    skip_rocm = pytest.mark.skip(reason="needs ROCm")
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU")
    rocm, cuda = _on_rocm(), _on_cuda()
    for item in items:
        if "rocm" in item.keywords and not rocm:
            item.add_marker(skip_rocm)
        if "cuda" in item.keywords and not cuda:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: ``tiny_model(**overrides)`` -> directory of that checkpoint, built once per session."""
    built: dict[TinyGlmSpec, Path] = {}

    def make(preset: str = "tiny", **overrides) -> Path:
        spec = dataclasses.replace(PRESETS[preset], **overrides)
        if spec not in built:
            built[spec] = write_tiny_model(tmp_path_factory.mktemp("tiny-glm"), spec)
        return built[spec]

    return make


def run_engine(
    model: Path,
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    prompts: list[str] = DEFAULT_PROMPTS,
    max_tokens: int = 16,
    logprobs: int = 5,
    probes: tuple[str, ...] = (),
    dtype: str = "float32",
    timeout_s: float = 600,
    **llm_kwargs,
) -> dict:
    """Run ``vllm.LLM`` on ``model`` in a fresh process; greedy outputs and probe results."""
    request = {
        "llm": {
            "model": str(model),
            "dtype": dtype,
            "max_model_len": 512,
            "enforce_eager": True,
            "seed": 0,
            **llm_kwargs,
        },
        "sampling": {
            "temperature": 0.0,
            "max_tokens": max_tokens,
            "logprobs": logprobs,
            "ignore_eos": True,
        },
        "prompts": prompts,
        "probes": list(probes),
    }
    tag = f"engine-{len(list(tmp_path.glob('engine-*.request.json')))}"
    request_path = tmp_path / f"{tag}.request.json"
    result_path = tmp_path / f"{tag}.result.json"
    log_path = tmp_path / f"{tag}.log"
    request_path.write_text(json.dumps(request))
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, str(TESTS_DIR / "engine_child.py"), str(request_path), str(result_path)],
            env={**os.environ, **ENGINE_ENV, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
        )
    log_text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(log_text.splitlines()[-60:])
        raise AssertionError(f"engine exited with {proc.returncode}; log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["log"] = log_text
    return result


@pytest.fixture
def engine(tmp_path):
    """``engine(model, env=..., **kwargs)``: see :func:`run_engine`."""

    def run(model: Path, **kwargs) -> dict:
        return run_engine(model, tmp_path, **kwargs)

    return run
