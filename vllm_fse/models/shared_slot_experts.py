"""Run a widened FusedMoE's shared slots fused or split, chosen per step by its token count.

A backend-neutral FSE layer holds ``n_routed + n_shared`` experts, and vLLM's router selects the
routed top-k only. :class:`SharedSlotExperts` takes the layer's expert call
(``RoutedExperts.forward_modular``) and runs each step one of two lossless ways:

- **fused**: every token also goes to each shared slot at ``slot_weight`` (ids and weights
  written into a buffer whose shared columns were filled once), one MoE kernel call;
- **split**: the MoE kernel on the routed top-k only, and the shared experts as a dense MLP
  (the model's own shared-expert MLP class, with its own copy of the weights, computed first as
  vLLM does unfused), added at the same ``slot_weight`` before the runner scales and reduces.

Which one is a choice on the step's token count, so it must happen where the compiler does not
look: vLLM traces the CPU MoE forward with Dynamo (guards skipped, so a Python ``if`` on the
token count would be frozen at trace time), and captures CUDA graphs per batch size.

- In vLLM's compiled CPU mode both paths are traced into the graph as vLLM traces its own MoE
  layer, under a ``torch.cond`` on ``tokens <= N``, N read every step from a buffer of the
  layer (so the switch point can move without recompiling; the graph also counts the paths in
  a second buffer). The switch point is resolved before the model's first forward (by the model's
  ``__call__``, :class:`~vllm_fse.models.fused_shared_experts.FusedSharedExpertsMixin`), outside
  the graph. Run eagerly inside an op, the split path's dense MLP cost 3.6%
  more of a batch-1 step than FSE off, and choosing inside an op cost another ~3% (both
  measured across engines). Under ``VLLM_FSE=1`` there is no choice: the fused path is traced
  alone.
- Elsewhere (eager mode, CUDA graphs) the choice and both paths live inside the opaque op
  ``vllm_fse::shared_slot_experts``, run eagerly at every step (and once per captured size under
  CUDA graphs); it resolves the switch point at its first call.

:class:`SwitchPoint` is the per-model rule: always fused (``VLLM_FSE=1``), or fused for steps of
at most N tokens (``VLLM_FSE=auto``), N from ``VLLM_FSE_FUSED_MAX_TOKENS``, the on-disk cache, or
a measurement on the real layer (both paths timed at a ladder of token
counts). Tensor-parallel ranks adopt rank 0's N, so all ranks take the same path.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.library import Library
from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_fse.compat import cache_dir, logger
from vllm_fse.hardware import cpu_description
from vllm_fse.replicas import shared_slot_ids  # which replica a token row uses (and where it runs)

ALWAYS = sys.maxsize
# Path codes of a step chosen in the opaque op. ROUTED: the routed experts only, no
# shared expert; not lossless, only ``vllm-fse bench crossover`` selects it (the limit).
FUSED, SPLIT, ROUTED = 0, 1, 2
PATH_NAMES = ("fused", "split", "routed")
# vLLM's additional_config key that compiles the ROUTED branch into the graph (benchmark only;
# additional_config is part of vLLM's compile-cache key, so such graphs are cached apart).
BENCH_ROUTED_KEY = "vllm_fse_bench_routed_path"
# Calibration: stop climbing the ladder once split has won this many points in a row, or once
# this much time went into it. Past the budget, unmeasured sizes run fused only if fused won the
# last FUSED_WINS_TO_EXTRAPOLATE sizes (above a few hundred tokens both paths are compute-bound and
# their ratio is flat: 0.70, 0.70, 0.74 at 1024, 2048, 4096 tokens on the AVX2 bench machine);
# otherwise they run split, i.e. as unfused.
SPLIT_WINS_TO_STOP = 2
FUSED_WINS_TO_EXTRAPOLATE = 2
CALIBRATION_BUDGET_S = 8.0
# Part of the cache key: a change of the rule above re-measures instead of reusing old switch points.
CALIBRATION_RULE = 2
CACHE_FILE = "switch-points.json"


# -- the opaque op --------------------------------------------------------------------------------

_lib = Library("vllm_fse", "FRAGMENT")


def _shared_slot_experts(
    hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str
) -> torch.Tensor:
    slots = get_forward_context().no_compile_layers[layer_name].fse_shared_slots
    return slots(hidden_states, topk_weights, topk_ids)


def _shared_slot_experts_fake(
    hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str
) -> torch.Tensor:
    return torch.empty_like(hidden_states)


direct_register_custom_op(
    op_name="shared_slot_experts",
    op_func=_shared_slot_experts,
    fake_impl=_shared_slot_experts_fake,
    target_lib=_lib,
)


# -- the per-model switch point -----------------------------------------------------------------


@dataclass
class SwitchPoint:
    """Fused for steps of at most ``fused_max_tokens`` tokens, split above; shared by every MoE
    layer of one model. ``fused_max_tokens`` is None until resolved (auto, first call)."""

    auto: bool
    fused_max_tokens: int | None
    source: str
    max_num_batched_tokens: int
    # Benchmark only: every step runs the routed experts alone (``vllm-fse bench crossover``).
    routed_only: bool = False
    # The compiled graph holds the ROUTED branch (additional_config[BENCH_ROUTED_KEY]).
    bench_routed_path: bool = False
    measured: list[dict] = field(default_factory=list)
    resolve_s: float = 0.0
    _announce: Callable[[], None] | None = None
    _buffers: dict = field(default_factory=dict)
    # Per path, MoE layer calls chosen inside the opaque op (eager mode, CUDA graphs).
    _op_calls: dict[str, int] = field(default_factory=lambda: {"fused": 0, "split": 0})
    # Per MoE layer of vLLM's compiled CPU graph: its ``[fused_max_tokens, routed_only]`` (the
    # graph reads it every step) and its ``[fused, split]`` call counter (the graph adds to it).
    _graph_states: list[torch.Tensor] = field(default_factory=list)
    _graph_calls: list[torch.Tensor] = field(default_factory=list)

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name in ("fused_max_tokens", "routed_only") and "_graph_states" in self.__dict__:
            self._write_graph_states()

    def _write_graph_states(self) -> None:
        # Unresolved: -1, every graph step split (vLLM's unfused computation).
        n = -1 if self.fused_max_tokens is None else min(self.fused_max_tokens, ALWAYS)
        for state in self._graph_states:
            state.copy_(torch.tensor([n, int(self.routed_only)], dtype=torch.int64))

    def graph_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A new MoE layer's state and counter tensors (its module registers them as buffers,
        so the compiled graph reads and updates the live tensors)."""
        state, calls = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
        self._graph_states.append(state)
        self._graph_calls.append(calls)
        self._write_graph_states()
        return state, calls

    @property
    def calls(self) -> dict[str, int]:
        """Per path, how many MoE layer calls ran it (a test's proof that both paths ran). Steps
        of ``VLLM_FSE=1`` in vLLM's compiled CPU mode have no choice to make and are not counted;
        nor are the benchmark's routed-only steps."""
        graph = self.chosen_in_graph()
        return {path: self._op_calls[path] + graph[i] for i, path in enumerate(PATH_NAMES[:2])}

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
        if self.routed_only:
            return ROUTED
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

    def slot_buffers(
        self, layer: SharedSlotExperts, tokens: int, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and weights ``[tokens, top_k + n_shared]`` whose shared columns were filled once.

        Views of one pair of ``[max_num_batched_tokens, ...]`` buffers per model: its MoE layers
        run one after another, and each kernel reads them before the next layer writes. With
        replicas, row ``t`` goes to replica ``t % replicas`` (slots ``n_routed + r * n_shared + j``).
        """
        top_k = topk_ids.shape[1]
        key = (top_k, layer.n_routed, layer.n_shared, layer.replicas, layer.slot_weight, topk_ids.dtype,
               topk_weights.dtype, topk_ids.device)  # fmt: skip
        buffers = self._buffers.get(key)
        if buffers is None or buffers[0].shape[0] < tokens:
            rows = max(tokens, self.max_num_batched_tokens)
            ids = topk_ids.new_empty(rows, top_k + layer.n_shared)
            ids[:, top_k:] = shared_slot_ids(rows, layer.n_routed, layer.n_shared, layer.replicas).to(ids)
            weights = topk_weights.new_empty(rows, top_k + layer.n_shared)
            weights[:, top_k:] = layer.slot_weight
            buffers = self._buffers[key] = (ids, weights)
        return buffers[0][:tokens], buffers[1][:tokens]


# -- one MoE layer ----------------------------------------------------------------------------


class SharedSlotExperts:
    """Fused or split execution of one widened FusedMoE layer (not an ``nn.Module``: the split
    MLP belongs to the MoE block, where the checkpoint's tensors load into it)."""

    def __init__(
        self,
        runner: torch.nn.Module,
        switch: SwitchPoint,
        *,
        n_routed: int,
        n_shared: int,
        slot_weight: float,
        split_mlp: torch.nn.Module | None,
        replicas: int = 1,
        gate: torch.nn.Module | None = None,
    ) -> None:
        if switch.auto and split_mlp is None:
            raise ValueError("vllm-fse: VLLM_FSE=auto needs a split MLP for every MoE layer")
        self.runner = runner
        self.switch = switch
        self.n_routed = n_routed
        self.n_shared = n_shared  # shared slots per token
        self.replicas = replicas  # copies of each shared expert (n_shared * replicas slots)
        self.slot_weight = slot_weight
        self.split_mlp = split_mlp
        # Qwen's shared expert is scaled per token by sigmoid(gate(x)) ([1, hidden] linear):
        # the shared slots' weight, or the split MLP's output scale.
        self.gate = gate
        self.replaced_shared_mlp: torch.nn.Module | None = None
        self.layer_name = runner.layer_name
        routed = runner.routed_experts
        self._forward_modular = routed.forward_modular  # vLLM's, bound to this layer
        routed.forward_modular = self._op_entry
        runner.fse_shared_slots = self
        if switch.auto:
            # Buffers of the runner module: vLLM's compiled graph takes them as inputs (the live
            # tensors every step), so the switch point can move without recompiling.
            state, calls = switch.graph_tensors()
            runner.register_buffer("fse_switch_state", state, persistent=False)
            runner.register_buffer("fse_path_calls", calls, persistent=False)
        # What the paths call, bound at the first call (after vLLM prepacked the weights).
        self._experts: Callable | None = None
        self._mlp: Callable | None = None
        self.direct_cpu_kernels = False
        # The split MLP's weights as built (vLLM's CPU GEMMs later move them into a packed handle
        # and leave ``weight`` empty): what its copy of the shared expert costs.
        self.split_mlp_bytes = 0 if split_mlp is None else sum(p.numel() * p.element_size() for p in split_mlp.parameters())
        # Once loaded (read_split_weights_from_slot): the shared slot the split MLP's weights are
        # views of, or why it keeps its own copy.
        self.split_weights_slot: int | None = None
        self.split_copy_reason: str | None = None
        # Per token count: the slot buffers' views a fused call writes and passes (a decode step
        # then only copies the routed ids and weights in; views cost microseconds per layer).
        self._fused_views: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def _op_entry(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts=None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The runner of a fused layer has no shared experts of its own.
        assert shared_experts is None
        if torch.compiler.is_compiling() and x.device.type == "cpu":
            return self._traced(x, topk_weights, topk_ids)
        return torch.ops.vllm_fse.shared_slot_experts(x, topk_weights, topk_ids, self.layer_name)

    # -- traced into vLLM's compiled CPU graph ---------------------------------------------------

    def _traced(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if not self.switch.auto:
            return self._fused_traced(x, topk_weights, topk_ids)
        # The step's path from its token count and the live switch point (a few scalar ops in
        # the graph; an opaque op here cost ~3% of a batch-1 step, measured across engines).
        state = self.runner.fse_switch_state
        fused = x.shape[0] <= state[0]
        if not self.switch.bench_routed_path:
            self.runner.fse_path_calls.add_(torch.stack([fused, ~fused]))
            return torch.cond(fused, self._fused_traced, self._split_traced, (x, topk_weights, topk_ids))
        lossless = state[1] == 0
        self.runner.fse_path_calls.add_(torch.stack([fused & lossless, ~fused & lossless]))
        return torch.cond(fused & lossless, self._fused_traced, self._split_or_routed_traced,
                          (x, topk_weights, topk_ids, lossless))  # fmt: skip

    def _fused_traced(self, x, topk_weights, topk_ids, lossless=None) -> torch.Tensor:
        """The shared slots appended to each token's top-k (Inductor writes both in one kernel)."""
        tokens = x.shape[0]
        shared_ids = shared_slot_ids(tokens, self.n_routed, self.n_shared, self.replicas).to(topk_ids)
        if self.gate is not None:
            shared_w = (self.gate_weight(x).to(topk_weights.dtype) * self.slot_weight).expand(tokens, self.n_shared)
        else:
            shared_w = topk_weights.new_full((tokens, self.n_shared), self.slot_weight)
        ids = torch.cat([topk_ids, shared_ids], dim=1)
        weights = torch.cat([topk_weights, shared_w], dim=1)
        return self._forward_modular(x, weights, ids)

    def _split_traced(self, x, topk_weights, topk_ids, lossless=None) -> torch.Tensor:
        """As vLLM's unfused layer: the shared MLP module first, then the routed experts."""
        shared = self.split_mlp(x)
        if self.gate is not None:
            shared = shared * self.gate_weight(x)
        out = self._forward_modular(x, topk_weights, topk_ids)
        return torch.add(out, shared, alpha=self.slot_weight)

    def _routed_traced(self, x, topk_weights, topk_ids) -> torch.Tensor:
        return self._forward_modular(x, topk_weights, topk_ids)

    def _split_or_routed_traced(self, x, topk_weights, topk_ids, lossless) -> torch.Tensor:
        return torch.cond(lossless, self._split_traced, self._routed_traced, (x, topk_weights, topk_ids))

    # -- run eagerly (inside the opaque ops) ------------------------------------------------------

    def _bind(self, x: torch.Tensor) -> None:
        """vLLM's expert call and the split MLP's module, or on CPU the kernels underneath them:
        inside the opaque op nothing is compiled, and the Python around vLLM's CPU MoE kernel
        (modular kernel, prepare/finalize, linear layers) costs more per call than the shared
        expert itself at decode sizes (measured: +25% per decode step at batch 1)."""
        self._experts, self._mlp = self._forward_modular, self.split_mlp
        if x.device.type == "cpu":
            experts = cpu_moe_kernel(self.runner.routed_experts)
            mlp = cpu_dense_mlp(self.split_mlp) if self.split_mlp is not None else None
            if experts is not None and (mlp is not None or self.split_mlp is None):
                self._experts, self._mlp, self.direct_cpu_kernels = experts, mlp, True

    def read_split_weights_from_slot(self) -> bool:
        """After vLLM processed the weights for its kernels: point the split MLP's parameters at a
        shared slot that holds the same matrices, so the split path keeps no second copy of the
        shared expert. True if it now reads the slot (``split_weights_slot``); otherwise
        ``split_copy_reason`` says why the copy stays."""
        if self.split_mlp is None:
            return False
        if self.split_weights_slot is not None:
            # Called again after a weight update (loaded in place into the shared storage): moving
            # the parameters now would change addresses that CUDA graphs captured.
            return True
        if self.n_shared != 1:
            self.split_copy_reason = f"the split MLP spans {self.n_shared} slots"
            return False
        routed = self.runner.routed_experts
        # n_shared == 1: the shared expert's replicas are slots n_routed .. n_routed + replicas - 1.
        held = [s for s in range(self.n_routed, self.n_routed + self.replicas)
                if routed.expert_map is None or int(routed.expert_map[s]) >= 0]  # fmt: skip
        if not held:
            self.split_copy_reason = "the shared slots are held by other expert-parallel ranks"
            return False
        local = held[0] if routed.expert_map is None else int(routed.expert_map[held[0]])
        pairs = slot_views(self.split_mlp, routed, local)
        if isinstance(pairs, str):
            self.split_copy_reason = pairs
            return False
        for param, view in pairs:
            param.data = view
        self.split_weights_slot, self.split_copy_reason = held[0], None
        return True

    def calibration_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and top-k ids shaped, typed and placed as the layer's calls are."""
        cfg = self.runner.moe_config
        device = self.runner.routed_experts.w13_weight.device
        like_x = torch.empty(1, cfg.hidden_dim, dtype=cfg.in_dtype, device=device)
        like_ids = torch.empty(1, cfg.experts_per_token - self.n_shared, dtype=torch.int32, device=device)
        return like_x, like_ids

    def resolve_before_forward(self) -> None:
        """Resolve the switch point outside the compiled graph (vLLM's compiled CPU mode: the
        model's first forward, after its weights were loaded and prepacked)."""
        if self.switch.resolved:
            return
        with torch.inference_mode():  # as in a forward (the slot buffers are inference tensors)
            self._prepare(*self.calibration_inputs())

    def _prepare(self, x: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """Bind the kernels and resolve the switch point, each once."""
        if self._experts is None:
            self._bind(x)
        if not self.switch.resolved:
            resolve_switch_point(self, x, topk_ids)

    def choose_path(self, x: torch.Tensor, topk_ids: torch.Tensor) -> int:
        """This step's path (FUSED, SPLIT or ROUTED), counted; resolves the switch point first."""
        self._prepare(x, topk_ids)
        path = self.switch.path_for(x.shape[0])
        if path != ROUTED:
            self.switch._op_calls[PATH_NAMES[path]] += 1
        return path

    def __call__(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        path = self.choose_path(x, topk_ids)
        if path == FUSED:
            return self.fused(x, topk_weights, topk_ids)
        if path == SPLIT:
            return self.split(x, topk_weights, topk_ids)
        return self._experts(x, topk_weights, topk_ids)

    def gate_weight(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, 1]``: the shared expert's per-token scale, as upstream's gated MLP computes
        it (``sigmoid`` of the gate's output in the model's dtype)."""
        return torch.sigmoid(self.gate(x)[0])

    def fused(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        tokens, top_k = topk_ids.shape
        views = self._fused_views.get((tokens, top_k))
        if views is None:
            ids, weights = self.switch.slot_buffers(self, tokens, topk_weights, topk_ids)
            views = self._fused_views[(tokens, top_k)] = (ids, weights, ids[:, :top_k], weights[:, :top_k],
                                                          weights[:, top_k:])  # fmt: skip
        ids, weights, routed_ids, routed_weights, shared_weights = views
        routed_ids.copy_(topk_ids)
        routed_weights.copy_(topk_weights)
        if self.gate is not None:
            shared_weights.copy_(self.gate_weight(x).expand_as(shared_weights))
            if self.slot_weight != 1.0:
                shared_weights.mul_(self.slot_weight)
        return self._experts(x, weights, ids)

    def split(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        shared = self._mlp(x)  # first, as vLLM runs unfused shared experts
        if self.gate is not None:
            shared = shared.mul_(self.gate_weight(x))
        out = self._experts(x, topk_weights, topk_ids)
        return out.add_(shared, alpha=self.slot_weight)


# -- the split MLP on the slot's storage ----------------------------------------------------------

# Each projection of the split MLP and the FusedMoE parameters' prefix that holds it per expert:
# gate_up_proj.weight <-> w13_weight[slot], down_proj.weight <-> w2_weight[slot], and so on for
# every other parameter (bias, quantization scales).
_SLOT_PARAMETER_PREFIX = (("gate_up_proj", "w13_"), ("down_proj", "w2_"))


def slot_views(
    mlp: torch.nn.Module, routed: torch.nn.Module, slot: int
) -> list[tuple[torch.nn.Parameter, torch.Tensor]] | str:
    """Every parameter of the split MLP's two projections paired with its twin in the FusedMoE's
    local expert ``slot``, or why they are not the same tensor.

    The same means the same shape, strides, dtype, device and values after both sides were
    processed for their kernels. Anything a backend does to either side (vLLM's CPU MoE kernel
    prepacks the slots, its CPU GEMMs pack the dense weights and empty ``weight``, FlashInfer
    swaps gate and up, a quantized format rescales) shows up as a difference, and the copy stays.
    """
    pairs = []
    for proj_name, prefix in _SLOT_PARAMETER_PREFIX:
        for name, param in getattr(mlp, proj_name).named_parameters(recurse=False):
            twin_name = f"{prefix}{name}"
            twin = getattr(routed, twin_name, None)
            if not isinstance(twin, torch.Tensor) or twin.dim() == 0 or not 0 <= slot < twin.shape[0]:
                return f"{proj_name}.{name} has no per-expert twin {twin_name}"
            view = twin[slot]
            ours = (tuple(param.shape), param.stride(), param.dtype, param.device)
            theirs = (tuple(view.shape), view.stride(), view.dtype, view.device)
            if ours != theirs:  # e.g. oneDNN keeps the packed weight in its handle: ``weight`` is [0]
                return (f"{proj_name}.{name} is {_layout_text(ours)}, {twin_name}[{slot}] is {_layout_text(theirs)}: "
                        "repacked for a kernel")  # fmt: skip
            if not torch.equal(param, view):
                return f"{proj_name}.{name} differs from {twin_name}[{slot}]"
            pairs.append((param, view))
    if not pairs:
        return "the split MLP has no parameters"
    return pairs


def _layout_text(layout: tuple) -> str:
    shape, stride, dtype, device = layout
    return f"{list(shape)} (strides {list(stride)}) {str(dtype).removeprefix('torch.')} on {device}"


# -- CPU: vLLM's kernels, called directly -------------------------------------------------------------


def cpu_moe_kernel(routed: torch.nn.Module) -> Callable | None:
    """``f(x, topk_weights, topk_ids) -> out``: vLLM's CPU MoE kernel (``_C::cpu_fused_moe``) on
    the layer's prepacked weights, exactly as its ``CPUUnquantizedExperts.apply`` calls it; None
    where vLLM's modular kernel does more than that call (zentorch, quantized weights, expert
    parallelism, router weights on the input)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    experts = getattr(getattr(routed.quant_method, "moe_kernel", None), "fused_experts", None)
    if (
        not isinstance(experts, CPUUnquantizedExperts)
        or type(experts).apply is not CPUUnquantizedExperts.apply
        or experts._use_zentorch
        or routed.expert_map is not None
        or routed.apply_router_weight_on_input
    ):
        return None
    op = torch.ops._C.cpu_fused_moe
    w13, w2, b13, b2 = routed.w13_weight, routed.w2_weight, experts.w1_bias, experts.w2_bias
    activation, isa = routed.activation.value, experts.isa

    def call(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        op(out, x, w13, w2, b13, b2, topk_weights, topk_ids, False, activation, isa)
        return out

    return call


def cpu_dense_mlp(mlp: torch.nn.Module) -> Callable | None:
    """``f(x) -> out``: the split MLP's prepacked GEMMs (vLLM's ``cpu_linear``) and SiLU-and-mul,
    without the linear layers' Python; None unless both projections are unquantized, bias-free
    and dispatched by vLLM's CPU GEMM selection."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    for layer in (gate_up, down):
        if not (
            isinstance(layer.quant_method, UnquantizedLinearMethod)
            and callable(getattr(layer, "cpu_linear", None))
            and getattr(layer, "bias", None) is None
        ):
            return None
    gate_up_gemm, down_gemm = gate_up.cpu_linear, down.cpu_linear
    # Plain tensors on the same storage: vLLM's weight parameters define __torch_function__,
    # which outside a compiled graph sends every op on them, and on their outputs, through Python.
    gate_up_w, down_w = (w.as_subclass(torch.Tensor) for w in (gate_up.weight, down.weight))
    inter = down.input_size_per_partition

    def call(x: torch.Tensor) -> torch.Tensor:
        h = gate_up_gemm(x, gate_up_w, None)
        return down_gemm(torch.nn.functional.silu(h[:, :inter]).mul_(h[:, inter:]), down_w, None)

    return call


# -- resolving the switch point -------------------------------------------------------------------


def device_description(device: torch.device) -> str:
    """The device model, on CPU with its vector ISA features (see :mod:`vllm_fse.hardware`)."""
    if device.type != "cpu":
        return f"{device.type}:{torch.cuda.get_device_name(device)}"
    return cpu_description()


def cache_key(layer: SharedSlotExperts, x: torch.Tensor) -> str:
    """Everything the timings depend on: machine, build, layer shapes, dtype, TP, kernels."""
    from vllm import __version__ as vllm_version

    from vllm_fse import __version__ as fse_version

    routed = layer.runner.routed_experts
    cfg = layer.runner.moe_config
    return json.dumps(
        {
            "device": device_description(x.device),
            "threads": torch.get_num_threads() if x.device.type == "cpu" else None,
            "dtype": str(x.dtype).removeprefix("torch."),
            "tp": cfg.tp_size,
            "hidden": int(x.shape[-1]),
            "w13": list(routed.w13_weight.shape),
            "w2": list(routed.w2_weight.shape),
            "experts": f"{layer.n_routed}+{layer.n_shared}" + (f"x{layer.replicas}" if layer.replicas > 1 else "")
            + (" gated" if layer.gate is not None else ""),
            "kernel": type(routed.quant_method).__name__,
            "max_num_batched_tokens": layer.switch.max_num_batched_tokens,
            "rule": CALIBRATION_RULE,
            "versions": f"vllm {vllm_version}, torch {torch.__version__}, vllm-fse {fse_version}",
        },
        sort_keys=True,
    )


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = _read_cache(path)
    cache[key] = entry
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(path)


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def time_paths(layer: SharedSlotExperts, tokens: int, like_x: torch.Tensor, like_ids: torch.Tensor, reps: int
               ) -> tuple[float, float]:  # fmt: skip
    """Median seconds of one fused and one split call at ``tokens`` (interleaved, random routing;
    dtypes, device and top-k as the layer's real first call ``like_x``/``like_ids``)."""
    device = like_x.device
    gen = torch.Generator(device="cpu").manual_seed(tokens)
    x = torch.randn(tokens, like_x.shape[-1], generator=gen).to(device=device, dtype=like_x.dtype)
    scores = torch.rand(tokens, layer.n_routed, generator=gen)
    weights, ids = scores.topk(like_ids.shape[1], dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(device).contiguous()
    ids = ids.to(device=device, dtype=like_ids.dtype).contiguous()
    paths = {"fused": layer.fused, "split": layer.split}
    times: dict[str, list[float]] = {"fused": [], "split": []}
    for rep in range(reps + 1):  # the first round warms up
        order = ("fused", "split") if rep % 2 == 0 else ("split", "fused")
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            paths[name](x, weights, ids)
            _sync(device)
            if rep:
                times[name].append(time.perf_counter() - t0)
    return statistics.median(times["fused"]), statistics.median(times["split"])


def ladder(max_tokens: int) -> list[int]:
    """1, 2, 4, ... up to and including ``max_tokens``."""
    sizes, t = [], 1
    while t < max_tokens:
        sizes.append(t)
        t *= 2
    return sizes + [max_tokens]


def measure_switch_point(
    layer: SharedSlotExperts, like_x: torch.Tensor, like_ids: torch.Tensor, budget_s: float = CALIBRATION_BUDGET_S
) -> tuple[int, list[dict]]:
    """Climb the token ladder timing both paths; fused up to the last size where it won before
    split won ``SPLIT_WINS_TO_STOP`` sizes in a row. If the next size would overrun the budget (a
    size costs about twice the one before it), the sizes left unmeasured run fused when fused won
    the last ``FUSED_WINS_TO_EXTRAPOLATE`` measured sizes, split otherwise."""
    start = time.perf_counter()
    max_tokens = layer.switch.max_num_batched_tokens
    fused_max, split_streak, fused_streak, rows, last_size_s = 0, 0, 0, [], 0.0
    for tokens in ladder(max_tokens):
        elapsed = time.perf_counter() - start
        if elapsed + 2 * last_size_s > budget_s:
            extrapolate = fused_streak >= FUSED_WINS_TO_EXTRAPOLATE
            logger.warning(
                "vllm-fse: switch-point measurement stopped before %d tokens to stay within %.0f s; "
                "larger steps run %s",
                tokens,
                budget_s,
                f"fused (it won the last {fused_streak} sizes)" if extrapolate else "split",
            )
            if extrapolate:
                fused_max = max_tokens
            break
        reps = 5 if tokens <= 64 else 3 if tokens <= 512 else 2
        t0 = time.perf_counter()
        fused_s, split_s = time_paths(layer, tokens, like_x, like_ids, reps=reps)
        last_size_s = time.perf_counter() - t0
        rows.append({"tokens": tokens, "fused_us": fused_s * 1e6, "split_us": split_s * 1e6})
        if fused_s <= split_s:
            if split_streak < SPLIT_WINS_TO_STOP:
                fused_max = tokens
            split_streak, fused_streak = 0, fused_streak + 1
        else:
            split_streak, fused_streak = split_streak + 1, 0
            if split_streak >= SPLIT_WINS_TO_STOP:
                break
    return fused_max, rows


def resolve_switch_point(layer: SharedSlotExperts, x: torch.Tensor, topk_ids: torch.Tensor) -> None:
    """At a model's first MoE call under ``auto``: cached, else measured; then TP-agreed."""
    from vllm.distributed import get_tp_group

    switch = layer.switch
    start = time.perf_counter()
    path = cache_dir() / CACHE_FILE
    key = cache_key(layer, x)
    tp = get_tp_group()
    entry = _read_cache(path).get(key)
    if entry is not None:
        fused_max, source, switch.measured = int(entry["fused_max_tokens"]), f"cached in {path}", entry["measured"]
    else:
        fused_max, switch.measured = measure_switch_point(layer, x, topk_ids)
        source = f"measured at startup in {time.perf_counter() - start:.1f} s, cached in {path}"
        if tp.rank_in_group == 0:
            _write_cache(path, key, {"fused_max_tokens": fused_max, "measured": switch.measured})
    largest = switch.measured[-1]["tokens"] if switch.measured else 0
    if fused_max > largest:
        source += f"; sizes above {largest} tokens not timed, fused as at the largest timed sizes"
    if tp.world_size > 1:
        fused_max, source = tp.broadcast_object((fused_max, source), src=0)
    switch.fused_max_tokens, switch.source = fused_max, source
    switch.resolve_s = time.perf_counter() - start
    if switch._announce is not None:
        switch._announce()
