"""In-process engines for the tools that time engine steps (crossover, engine-groups, the prefill
profile): how an engine is built, how its requests are made and drained, and what an engine arm is.

An engine arm is ``NAME=VLLM_FSE[,VAR=VALUE...]``: a name for the report, the ``VLLM_FSE`` value
the engine is built with and any other environment of its build (e.g.
``split=auto,VLLM_FSE_FUSED_MAX_TOKENS=0``: every step on the split path).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field

ALWAYS = 2**62  # a switch point no step reaches: every step fused


@dataclass(frozen=True)
class EngineArm:
    name: str
    fse: str
    env: dict[str, str] = field(default_factory=dict)


def parse_engine_arm(text: str) -> EngineArm:
    name, _, spec = text.partition("=")
    fse, *extra = spec.split(",")
    if not name or not fse:
        raise argparse.ArgumentTypeError(f"--arms: expected NAME=VLLM_FSE[,VAR=VALUE...], got {text!r}")
    env = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--arms: expected VAR=VALUE in {text!r}, got {item!r}")
        env[key] = value
    return EngineArm(name, fse, env)


def parse_compilation_configs(items: list[str], arm_names: list[str]) -> dict[str, dict]:
    """``NAME=JSON`` per arm: that arm's vLLM compilation config."""
    configs = {}
    for text in items:
        name, sep, spec = text.partition("=")
        if not sep or name not in arm_names:
            raise SystemExit(f"--compilation-config: expected NAME=JSON with NAME one of {arm_names}, got {text!r}")
        try:
            configs[name] = json.loads(spec)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--compilation-config {name}: not JSON ({e}): {spec!r}") from None
        if not isinstance(configs[name], dict):
            raise SystemExit(f"--compilation-config {name}: expected a JSON object, got {spec!r}")
    return configs


def minor_faults() -> int:
    """Pages this process touched for the first time so far (fresh memory the allocator mapped
    or got back from the OS: what a step that frees and reallocates large buffers pays)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def prefill_lengths(tokens: int, request_len: int) -> list[int]:
    """Prompt lengths of one prefill step of ``tokens`` tokens: as few requests of at most
    ``request_len`` tokens as hold them, as even as possible."""
    n = math.ceil(tokens / request_len)
    return [tokens // n + (1 if i < tokens % n else 0) for i in range(n)]


def rotation(names: list, cycle: int) -> list:
    """One cycle's order: every item once, the leader moving by one each cycle (no item always
    runs first, or right after the same other one)."""
    k = cycle % len(names)
    return list(names[k:]) + list(names[:k])


@dataclass(frozen=True)
class EngineShape:
    """What an engine must hold: the decode batches and prefill steps it will be asked for."""

    decode_batch: list[int]
    prefill_tokens: list[int]
    prefill_request_len: int = 2048
    input_len: int = 128
    decode_tokens: int = 512  # output tokens a decode request may need
    eager: bool = False


def build_engine(shape: EngineShape, model: str, dtype: str | None, fse: str,
                 compilation_config: dict | None = None, additional_config: dict | None = None):  # fmt: skip
    """An ``LLM`` whose engine core runs in this process with synchronous steps."""
    from vllm import LLM

    import vllm_fse

    os.environ["VLLM_FSE"] = fse
    # vLLM loads plugins once per process; the plugin's model classes must follow this engine's
    # settings, not the first engine's.
    vllm_fse.register()
    # The engine core in this process: with vLLM's default background engine-core process a
    # step() only collects outputs that process produced on its own time, and two engines' cores
    # would run at once.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # The live model is read through LLM.apply_model; several engines share the machine's memory.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    max_batch = max(shape.decode_batch + [math.ceil(t / shape.prefill_request_len) for t in shape.prefill_tokens])
    max_tokens = max(shape.prefill_tokens + [shape.input_len * max(shape.decode_batch), 2048])
    return LLM(
        model=model,
        dtype=dtype or "auto",
        max_model_len=max(shape.prefill_request_len, shape.input_len + shape.decode_tokens) + 16,
        max_num_seqs=max_batch,
        max_num_batched_tokens=max_tokens,
        enforce_eager=shape.eager,
        enable_prefix_caching=False,
        distributed_executor_backend="uni",
        async_scheduling=False,  # a step() returns once its forward is done
        seed=0,
        **({"compilation_config": compilation_config} if compilation_config else {}),
        **({"additional_config": additional_config} if additional_config else {}),
    )


class Requests:
    """Deterministic prompt token ids and request bookkeeping on an engine."""

    def __init__(self, llm) -> None:
        self.engine = llm.llm_engine
        self.vocab = self.engine.model_config.get_vocab_size()
        self.count = 0

    def add(self, n: int, length: int, max_tokens: int) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ids = []
        for _ in range(n):
            self.count += 1
            rid = f"r{self.count}"
            tokens = [(17 * self.count + 31 * j + 7) % (self.vocab - 16) + 16 for j in range(length)]
            self.engine.add_request(rid, {"prompt_token_ids": tokens}, params)
            ids.append(rid)
        return ids

    def add_prefill(self, tokens: int, request_len: int) -> list[str]:
        """Requests that make the next step one prefill step of ``tokens`` tokens."""
        return [rid for length in prefill_lengths(tokens, request_len) for rid in self.add(1, length, 1)]

    def drain(self, ids: list[str]) -> None:
        self.engine.abort_request(ids)
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def timed_step(self) -> float:
        t0 = time.perf_counter()
        self.engine.step()
        return time.perf_counter() - t0
