"""Shared fixtures: tiny checkpoints, a one-process-per-engine runner, platform markers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from vllm_fse.tiny_model import PRESETS, TinyMoeSpec, write_tiny_model

TESTS_DIR = Path(__file__).parent

# Engine processes: tiny KV cache, and LLM.apply_model needs to pickle our probe functions.
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "VLLM_LOGGING_LEVEL": "INFO",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}

# vLLM's own CPU CI mode (VLLM_CPU_CI_ENV=1, read by vllm/platforms/cpu.py and
# vllm/v1/worker/cpu_worker.py): Dynamo traces the model as in the default compiled mode, then the
# eager backend runs the traced graph instead of Inductor's generated code (and the warm-up run is
# skipped). For tests of what Dynamo traces (FSE's branch in the graph, the hooks outside it): an
# engine starts in about half the time. Inductor's code is covered by the tests compiled with it.
DYNAMO_EAGER_BACKEND = {"VLLM_CPU_CI_ENV": "1"}

# Fixed texts scored teacher-forced (prompt logprobs): every position is compared, whatever
# the model would have generated.
SCORE_TEXTS = [
    "The river runs past the old mill, under the stone bridge and into the sea. In the morning "
    "the market opens, people buy bread, fish, apples and coffee, and talk about the weather.",
    "Once upon a time there was a small model that wanted to speak. It learned words, then "
    "sentences, then whole stories about mountains, rivers, cities, machines and music.",
    "A mixture of experts model sends every token to a few experts chosen by a router, and to a "
    "shared expert that sees every token. What is two plus two? It is four.",
]

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
    built: dict[TinyMoeSpec, Path] = {}

    def make(preset: str = "tiny", **overrides) -> Path:
        spec = dataclasses.replace(PRESETS[preset], **overrides)
        if spec not in built:
            built[spec] = write_tiny_model(tmp_path_factory.mktemp("tiny-glm"), spec)
        return built[spec]

    return make


def engine_run(
    model: Path,
    *,
    env: dict[str, str] | None = None,
    prompts: list[str] = DEFAULT_PROMPTS,
    max_tokens: int = 16,
    logprobs: int = 5,
    probes: tuple[str, ...] = (),
    worker_probes: tuple[str, ...] = (),
    after_probes: tuple[str, ...] = (),
    after_worker_probes: tuple[str, ...] = (),
    dtype: str = "float32",
    metrics: bool = False,
    score_texts: list[str] | None = None,
    **llm_kwargs,
) -> dict:
    """One engine run's description for :func:`run_engines`: greedy, ``ignore_eos``."""
    env = dict(env or {})
    if llm_kwargs.get("tensor_parallel_size", 1) > 1:
        # One core per tensor-parallel worker on the 2-core machine.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    else:
        llm_kwargs.setdefault("distributed_executor_backend", "uni")  # no worker process
    return {
        "env": env,
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
        "worker_probes": list(worker_probes),
        "after_probes": list(after_probes),
        "after_worker_probes": list(after_worker_probes),
        "metrics": metrics,
        "score_texts": score_texts or [],
    }


def run_engines(
    runs: list[dict], tmp_path: Path, timeout_s: float = 1500, process_env: dict[str, str] | None = None
) -> list[dict]:
    """Run the engines one after another in one fresh process; their results, in order.

    A run that raised has ``error`` (type and message) instead of outputs; the whole log is
    in each result's ``log``. ``process_env``: variables the process must start with (a run's
    ``env`` is set later, before its engine), e.g. ``PYTHONPATH``.
    """
    import torch

    tag = f"engines-{len(list(tmp_path.glob('engines-*.request.json')))}"
    request_path = tmp_path / f"{tag}.request.json"
    result_path = tmp_path / f"{tag}.result.pt"
    log_path = tmp_path / f"{tag}.log"
    request_path.write_text(json.dumps({"runs": runs}))
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, str(TESTS_DIR / "engine_child.py"), str(request_path), str(result_path)],
            env={**os.environ, **ENGINE_ENV, **(process_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
        )
    log_text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(log_text.splitlines()[-60:])
        raise AssertionError(f"engine process exited with {proc.returncode}; log {log_path}:\n{tail}")
    results = torch.load(result_path, weights_only=False)
    for result in results:
        result["log"] = log_text
    return results


def run_keyed_engines(runs: dict, tmp_path: Path) -> dict:
    """:func:`run_engines` over ``{key: run}`` -> ``{key: result}``; fails naming the key of a run
    that raised."""
    results = dict(zip(runs, run_engines(list(runs.values()), tmp_path)))
    for key, result in results.items():
        assert "error" not in result, f"{key}: {result['traceback']}"
    return results


def run_engine(model: Path, tmp_path: Path, **kwargs) -> dict:
    """A single engine run (see :func:`engine_run`); raises if it failed."""
    (result,) = run_engines([engine_run(model, **kwargs)], tmp_path)
    assert "error" not in result, result.get("traceback")
    return result


@pytest.fixture
def engine(tmp_path):
    """``engine(model, env=..., **kwargs)``: see :func:`run_engine`."""

    def run(model: Path, **kwargs) -> dict:
        return run_engine(model, tmp_path, **kwargs)

    return run


def built_once(build: Callable):
    """``get(key)`` -> ``build(key)``, computed once per key. A build that failed an assertion
    is kept too: every test of that key fails with it, none reruns the engines."""
    built: dict = {}

    def get(key):
        if key not in built:
            try:
                built[key] = build(key)
            except AssertionError as e:
                built[key] = e
        if isinstance(built[key], AssertionError):
            raise built[key]
        return built[key]

    return get


def edited_checkpoint(source: Path, target: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of checkpoint ``source`` at ``target`` whose tensors ``edit`` changed in place."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target
