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
  ``__call__``, :class:`~vllm_fse.core.model.FusedSharedExpertsMixin`), outside the graph.
  Under ``VLLM_FSE=1`` there is no choice: the fused path is traced alone.
- Elsewhere (eager mode, CUDA graphs) the choice and both paths live inside the opaque op
  ``vllm_fse::shared_slot_experts``, run eagerly at every step (and once per captured size under
  CUDA graphs); it resolves the switch point at its first call.

A subclass may add a path (the hook ``vllm-fse bench`` uses): :data:`LAYER_CLASS_KEY` in vLLM's
``additional_config`` names the class every MoE layer of the model is built as (the key is part of
vLLM's compile-cache key, so its graphs are cached apart); it overrides :meth:`SharedSlotExperts._traced_choice`
(the compiled CPU graph) and ``__call__`` (the opaque op).

The rule itself, the per-model :class:`~vllm_fse.auto.switch_point.SwitchPoint`, and how its N is
found (override, cache, measurement) live in :mod:`vllm_fse.auto`; docs/design.md says what the
choice of where to switch cost when measured.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch.library import Library
from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_fse.auto.calibration import resolve_switch_point
from vllm_fse.auto.switch_point import FUSED, PATH_NAMES, SwitchPoint
from vllm_fse.core.kernels import cpu_dense_mlp, cpu_moe_kernel
from vllm_fse.core.replicas import shared_slot_ids  # which replica a token row uses (and where it runs)
from vllm_fse.core.slot_buffers import SlotBuffers
from vllm_fse.core.split_storage import slot_views

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
        slot_buffers: SlotBuffers | None = None,
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
        # The fused path's slot ids and weights, one pair per model (construction passes the model's).
        self.slot_buffers = slot_buffers if slot_buffers is not None else SlotBuffers(switch.max_num_batched_tokens)
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
        # The step's path from its token count and the live switch point: a few scalar ops in
        # the graph, cheaper than an opaque op here (docs/design.md, "Where the choice is made").
        fused = x.shape[0] <= self.runner.fse_switch_state[0]
        return self._traced_choice(fused, x, topk_weights, topk_ids)

    def _traced_choice(self, fused: torch.Tensor, x, topk_weights, topk_ids) -> torch.Tensor:
        """The traced step given ``fused`` (a bool tensor: the step is at most N tokens); counted
        in the graph. A subclass that adds a path overrides this."""
        self.runner.fse_path_calls.add_(torch.stack([fused, ~fused]))
        return torch.cond(fused, self._fused_traced, self._split_traced, (x, topk_weights, topk_ids))

    def _fused_traced(self, x, topk_weights, topk_ids) -> torch.Tensor:
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

    def _split_traced(self, x, topk_weights, topk_ids) -> torch.Tensor:
        """As vLLM's unfused layer: the shared MLP module first, then the routed experts."""
        shared = self.split_mlp(x)
        if self.gate is not None:
            shared = shared * self.gate_weight(x)
        out = self._forward_modular(x, topk_weights, topk_ids)
        # Not torch.add(..., alpha=): Inductor's add(mm, x) -> addmm rewrite drops alpha when the
        # dense MLP is a plain matmul it can see (vLLM 0.34's CPU linear without oneDNN).
        return out + shared * self.slot_weight

    # -- run eagerly (inside the opaque ops) ------------------------------------------------------

    def _bind(self, x: torch.Tensor) -> None:
        """vLLM's expert call and the split MLP's module, or on CPU the kernels underneath them:
        inside the opaque op nothing is compiled, and the Python around vLLM's CPU MoE kernel
        (modular kernel, prepare/finalize, linear layers) costs more per call than the shared
        expert itself at decode sizes (docs/design.md, "vLLM's CPU MoE kernel")."""
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
        """This step's path (FUSED or SPLIT), counted; resolves the switch point first."""
        self._prepare(x, topk_ids)
        path = self.switch.path_for(x.shape[0])
        self.switch._op_calls[PATH_NAMES[path]] += 1
        return path

    def __call__(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.choose_path(x, topk_ids) == FUSED:
            return self.fused(x, topk_weights, topk_ids)
        return self.split(x, topk_weights, topk_ids)

    def gate_weight(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, 1]``: the shared expert's per-token scale, as upstream's gated MLP computes
        it (``sigmoid`` of the gate's output in the model's dtype)."""
        return torch.sigmoid(self.gate(x)[0])

    def fused(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        tokens, top_k = topk_ids.shape
        views = self._fused_views.get((tokens, top_k))
        if views is None:
            ids, weights = self.slot_buffers.views(self, tokens, topk_weights, topk_ids)
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


# -- the hook: the layer class a model is built with -------------------------------------------

# vLLM's additional_config key naming a subclass of SharedSlotExperts ("module:Class") that every
# MoE layer of the model is built as instead.
LAYER_CLASS_KEY = "vllm_fse_layer_class"


def layer_class(additional_config) -> type[SharedSlotExperts]:
    """The class the model's MoE layers are built as: :class:`SharedSlotExperts`, or the subclass
    ``additional_config[LAYER_CLASS_KEY]`` names."""
    name = additional_config.get(LAYER_CLASS_KEY) if isinstance(additional_config, dict) else None
    if name is None:
        return SharedSlotExperts
    module_name, _, class_name = str(name).partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(
            f"vllm-fse: additional_config[{LAYER_CLASS_KEY!r}] is {name!r}; expected 'module:Class' of an "
            f"importable class ({e})"
        ) from e
    if not (isinstance(cls, type) and issubclass(cls, SharedSlotExperts)):
        raise ValueError(
            f"vllm-fse: additional_config[{LAYER_CLASS_KEY!r}] is {name!r}, which is not a subclass of SharedSlotExperts"
        )
    return cls
