"""The per-model switch point: which path (fused, split) a step of a given token count runs.

:class:`SwitchPoint` is the rule shared by every MoE layer of one model: always fused
(``VLLM_FSE=1``), or fused for steps of at most N tokens (``VLLM_FSE=auto``), N from
``VLLM_FSE_FUSED_MAX_TOKENS``, the on-disk cache (:mod:`vllm_fse.auto.cache`) or a measurement on
the real layer (:mod:`vllm_fse.auto.calibration`). It also holds the live tensors that vLLM's
compiled CPU graph reads the switch point from, and the per-path call counters.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

ALWAYS = sys.maxsize

# Path codes of a step chosen in the opaque op.
FUSED, SPLIT = 0, 1

PATH_NAMES = ("fused", "split")


class SwitchedLayer(Protocol):
    """What calibration and the cache key ask of an MoE layer (the core's ``SharedSlotExperts``):
    its shapes, its two lossless paths and the vLLM runner it belongs to."""

    switch: SwitchPoint
    runner: torch.nn.Module
    n_routed: int
    n_shared: int
    replicas: int
    gate: torch.nn.Module | None

    def fused(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor: ...

    def split(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor: ...


@dataclass
class SwitchPoint:
    """Fused for steps of at most ``fused_max_tokens`` tokens, split above; shared by every MoE
    layer of one model. ``fused_max_tokens`` is None until resolved (auto, first call)."""

    auto: bool
    fused_max_tokens: int | None
    source: str
    max_num_batched_tokens: int
    measured: list[dict] = field(default_factory=list)
    resolve_s: float = 0.0
    _announce: Callable[[], None] | None = None
    _buffers: dict = field(default_factory=dict)
    # Per path, MoE layer calls chosen inside the opaque op (eager mode, CUDA graphs).
    _op_calls: dict[str, int] = field(default_factory=lambda: {"fused": 0, "split": 0})
    # Per MoE layer of vLLM's compiled CPU graph: its ``[fused_max_tokens]`` (the graph reads it
    # every step) and its ``[fused, split]`` call counter (the graph adds to it).
    _graph_states: list[torch.Tensor] = field(default_factory=list)
    _graph_calls: list[torch.Tensor] = field(default_factory=list)

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name == "fused_max_tokens" and "_graph_states" in self.__dict__:
            self._write_graph_states()

    def _write_graph_states(self) -> None:
        # Unresolved: -1, every graph step split (vLLM's unfused computation).
        n = -1 if self.fused_max_tokens is None else min(self.fused_max_tokens, ALWAYS)
        for state in self._graph_states:
            state.fill_(n)

    def graph_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A new MoE layer's state and counter tensors (its module registers them as buffers,
        so the compiled graph reads and updates the live tensors)."""
        state, calls = torch.zeros(1, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
        self._graph_states.append(state)
        self._graph_calls.append(calls)
        self._write_graph_states()
        return state, calls

    @property
    def calls(self) -> dict[str, int]:
        """Per path, how many MoE layer calls ran it (a test's proof that both paths ran). Steps
        of ``VLLM_FSE=1`` in vLLM's compiled CPU mode have no choice to make and are not counted;
        nor are steps of a path that a layer subclass adds."""
        graph = self.chosen_in_graph()
        return {path: self._op_calls[path] + graph[i] for i, path in enumerate(PATH_NAMES)}

    def chosen_in_graph(self) -> list[int]:
        return [sum(int(c[i]) for c in self._graph_calls) for i in range(2)]

    @property
    def chosen_in(self) -> dict[str, int]:
        """Where the choices were made: "graph" (under ``torch.cond`` in vLLM's compiled CPU graph)
        or "op" (inside the opaque op)."""
        return {"graph": sum(self.chosen_in_graph()), "op": sum(self._op_calls.values())}

    def reset_calls(self) -> None:
        for path in self._op_calls:
            self._op_calls[path] = 0
        for calls in self._graph_calls:
            calls.zero_()

    @classmethod
    def always_fused(cls, max_num_batched_tokens: int) -> SwitchPoint:
        return cls(False, ALWAYS, "VLLM_FSE=1", max_num_batched_tokens)

    @classmethod
    def auto_switch(cls, override: int | None, max_num_batched_tokens: int) -> SwitchPoint:
        if override is not None:
            return cls(True, override, f"VLLM_FSE_FUSED_MAX_TOKENS={override}", max_num_batched_tokens)
        return cls(True, None, "", max_num_batched_tokens)

    @property
    def resolved(self) -> bool:
        return self.fused_max_tokens is not None

    def fused_for(self, tokens: int) -> bool:
        return tokens <= self.fused_max_tokens

    def path_for(self, tokens: int) -> int:
        return FUSED if self.fused_for(tokens) else SPLIT

    def describe(self) -> str:
        if not self.auto:
            return "every step fused"
        n = self.fused_max_tokens
        if n == 0:
            rule = "every step split"
        elif n >= self.max_num_batched_tokens:
            rule = f"every step fused (up to max_num_batched_tokens={self.max_num_batched_tokens})"
        else:
            rule = f"fused for steps of <= {n} tokens, split above"
        return f"auto: {rule} ({self.source})"

    def announce_when_resolved(self, announce: Callable[[], None]) -> None:
        if self.resolved:
            announce()
        else:
            self._announce = announce
