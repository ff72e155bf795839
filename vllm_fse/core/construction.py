"""Construction: the family adapters' description and the hook that widens their FusedMoE layers.

Every supported family builds its MoE block the same way upstream: the block's ``__init__``
asks ``resolve_layer_fused_shared_expert`` whether to fuse and builds its experts with
``FusedMoEFactory``, both names read from the block's own module. A family adapter
(:class:`MoeFamily`) says which module and block that is and how to build the family's dense
shared-expert MLP; everything else lives in the core. While a plugin model is constructed,
:func:`moe_construction` answers the first from the plugin's :class:`FsePlan` and, on the
backend-neutral path, turns the second into a FusedMoE with ``n_routed + n_shared`` experts and
``top_k + n_shared`` slots per token whose router is vLLM's own router for the routed experts;
:class:`~vllm_fse.core.layer.SharedSlotExperts` adds the shared slots to each
step (fused) or runs them as a dense MLP (split). Upstream's constructor stays the single source
of the MoE block's structure and parameter names.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from vllm.model_executor.layers.fused_moe.router.router_factory import (
    create_fused_moe_router,
)

from vllm_fse.auto.switch_point import SwitchPoint
from vllm_fse.compat import logger
from vllm_fse.core.decision import FsePath, FsePlan
from vllm_fse.core.layer import SharedSlotExperts
from vllm_fse.core.slot_buffers import SlotBuffers
from vllm_fse.patches import no_aiter_fse_line, resolve_widened_moe_configs, route_to_modular_kernels

# The MoE block's module that holds the dense shared-expert MLP of the split path (VLLM_FSE=auto).
SPLIT_MLP = "fse_split_mlp"


@dataclass(frozen=True)
class MoeFamily:
    """What a model family does differently from the core: nothing else is family-specific.

    ``module`` is the upstream module whose MoE block (``moe_block``, a class in it) reads
    ``FusedMoEFactory`` (and, where upstream decides fusion per layer,
    ``resolve_layer_fused_shared_expert``) from the module's globals; ``split_mlp`` builds the
    family's own dense shared-expert MLP (keyword arguments ``hidden_size``,
    ``intermediate_size``, ``quant_config``, ``prefix``, ``is_sequence_parallel``; output not
    reduced, not gated).
    By default checkpoints name the packed shared expert
    ``layers.N.mlp.shared_experts.{gate,up,down}_proj`` and ``moe_layers`` is
    :func:`moe_layer_indices`; ``draft_prefix`` names the MTP tensors the main model must drop
    before splitting (None: upstream's ``skip_spec_layers``); ``aiter_capable``: upstream has an
    AITER fused-shared-expert path for the family. Which layers a model holds is read from
    ``model.layers`` (a list, or a dict of MTP layers with the block at ``mtp_block.mlp``).
    """

    name: str
    module: str
    moe_block: str
    split_mlp: Callable[..., torch.nn.Module]
    shared_expert_name: str = "shared_experts"
    moe_layers: Callable[..., frozenset[int]] | None = None
    draft_prefix: str | None = None
    aiter_capable: bool = True

    def upstream(self):
        return importlib.import_module(self.module)

    def moe_block_cls(self) -> type:
        return getattr(self.upstream(), self.moe_block)

    def moe_layer_indices(self, hf_config) -> frozenset[int]:
        return (self.moe_layers or moe_layer_indices)(hf_config)


def moe_layer_indices(hf_config) -> frozenset[int]:
    """Decoder-layer indices with a MoE block in the checkpoint, MTP layers included."""
    n_layers = hf_config.num_hidden_layers
    n_mtp = getattr(hf_config, "num_nextn_predict_layers", 0) or 0
    first = getattr(hf_config, "first_k_dense_replace", 0) or 0
    freq = getattr(hf_config, "moe_layer_freq", 1) or 1
    # Upstream's decoder layers (MTP blocks included) apply this rule to their own index.
    return frozenset(layer for layer in range(n_layers + n_mtp) if layer >= first and layer % freq == 0)


def shared_slot_scaling(
    routed_scaling_factor: float, apply_routed_scale_to_output: bool, dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """(shared-slot weight, scale the runner applies to the MoE output) that make the fused sum
    equal the unfused one.

    Unfused: ``rsf * sum_k w_k E_k(x) + S(x)`` when the runner scales the routed output by rsf,
    or ``sum_k (rsf * w_k) E_k(x) + S(x)`` when rsf is folded into the routed weights. The shared
    slot sits inside the scaled sum, so it gets ``1/rsf`` in the first case and ``1`` in the
    second; ``rsf`` there would scale the shared expert by rsf**2 / rsf (docs/design.md says
    what that cost upstream). In float16 upstream's runner guards against overflow by dividing the shared
    output by rsf instead of scaling the routed one (``sum_k w_k E_k(x) + S(x) / rsf``, which
    DeepSeek's decoder layer compensates); fused, that is the slot at ``1/rsf`` with no output
    scale.
    """
    if not apply_routed_scale_to_output or not routed_scaling_factor or routed_scaling_factor == 1.0:
        return 1.0, routed_scaling_factor
    if dtype == torch.float16:
        return 1.0 / routed_scaling_factor, 1.0
    return 1.0 / routed_scaling_factor, routed_scaling_factor


def _backend_neutral_factory(
    plan: FsePlan,
    switch: SwitchPoint,
    family: MoeFamily,
    real_factory: Callable,
    dtype: torch.dtype | None,
    slot_buffers: SlotBuffers,
    layer_cls: type[SharedSlotExperts],
) -> Callable:
    def factory(
        *,
        num_experts: int,
        top_k: int,
        n_shared_experts: int | None = None,
        fuse_shared_experts: bool = False,
        routed_scaling_factor: float = 1.0,
        apply_routed_scale_to_output: bool = False,
        shared_expert_prefix: str | None = None,
        shared_experts: torch.nn.Module | None = None,
        shared_expert_gate: torch.nn.Module | None = None,
        **kwargs,
    ):
        # Families that decide fusion per layer ask for it (GLM, DeepSeek, Qwen3-Next); Qwen2-MoE
        # always hands over its shared MLP, which the fused layer then replaces.
        if not (fuse_shared_experts or shared_experts is not None):
            return real_factory(
                num_experts=num_experts,
                top_k=top_k,
                n_shared_experts=n_shared_experts,
                fuse_shared_experts=fuse_shared_experts,
                shared_expert_prefix=shared_expert_prefix,
                routed_scaling_factor=routed_scaling_factor,
                apply_routed_scale_to_output=apply_routed_scale_to_output,
                shared_expert_gate=shared_expert_gate,
                **kwargs,
            )
        shape = plan.shape
        if num_experts != plan.n_routed_experts or (
            not shape.gated and n_shared_experts is not None and n_shared_experts != plan.n_shared_experts
        ):
            raise RuntimeError(
                f"vllm-fse: MoE block asks for {num_experts} routed + {n_shared_experts} shared "
                f"experts, the plan has {plan.n_routed_experts} + {plan.n_shared_experts}"
            )
        gate = None
        if shape.gated:
            gate = shared_expert_gate if shared_expert_gate is not None else getattr(shared_experts, "expert_gate", None)
            if gate is None:
                raise RuntimeError(
                    f"vllm-fse: {kwargs.get('prefix')} has a gated shared expert (Qwen) but its MoE block "
                    "passed no shared_expert_gate"
                )
        n_shared_experts = plan.n_shared_experts
        if shared_expert_prefix is None:
            shared_expert_prefix = f"{kwargs.get('prefix', '').rpartition('.')[0]}.{family.shared_expert_name}"
        # The routed part is routed exactly as upstream would, by the router vLLM picks for
        # this platform; as in FusedMoEFactory, rsf goes either into it or onto the output.
        routed = create_fused_moe_router(
            top_k=top_k,
            global_num_experts=num_experts,
            eplb_state=None,  # plan_fse refuses EPLB
            renormalize=kwargs.get("renormalize", True),
            use_grouped_topk=kwargs.get("use_grouped_topk", False),
            num_expert_group=kwargs.get("num_expert_group"),
            topk_group=kwargs.get("topk_group"),
            custom_routing_function=kwargs.get("custom_routing_function"),
            scoring_func=kwargs.get("scoring_func", "softmax"),
            routed_scaling_factor=1.0 if apply_routed_scale_to_output else routed_scaling_factor,
            e_score_correction_bias=kwargs.get("e_score_correction_bias"),
        )
        route_to_modular_kernels(routed)  # vLLM >= 0.33: its kernel oracle then skips monolithic ones
        slot_weight, output_scale = shared_slot_scaling(routed_scaling_factor, apply_routed_scale_to_output, dtype)
        n_slots = n_shared_experts * plan.shared_replicas
        runner = real_factory(
            num_experts=num_experts + n_slots,
            top_k=top_k + n_shared_experts,
            router=routed,
            routed_scaling_factor=output_scale,
            apply_routed_scale_to_output=apply_routed_scale_to_output,
            **kwargs,
        )
        if runner.routed_experts.quant_method.is_monolithic:
            raise RuntimeError(
                f"vllm-fse: the MoE kernel chosen for {kwargs.get('prefix')} "
                f"({type(runner.routed_experts.quant_method).__name__}) routes inside the kernel, "
                "so the shared slots cannot be appended (this vLLM cannot be told to avoid it); run "
                "with VLLM_FSE=0 or pick a modular MoE backend, e.g. --moe-backend triton"
            )
        resolve_widened_moe_configs(num_experts + n_slots, num_experts)
        _check_placement(runner, plan)
        split_mlp = None
        if switch.auto:
            # The model's own shared-expert MLP, under upstream's prefix (quantization rules).
            split_mlp = family.split_mlp(
                hidden_size=kwargs["hidden_size"],
                intermediate_size=shape.shared_width,
                quant_config=kwargs.get("quant_config"),
                prefix=shared_expert_prefix,
                # As the block built its FusedMoE: the runner reduces the sum accordingly.
                is_sequence_parallel=kwargs.get("is_sequence_parallel", False),
            )
        slots = layer_cls(
            runner,
            switch,
            n_routed=num_experts,
            n_shared=n_shared_experts,
            slot_weight=slot_weight,
            split_mlp=split_mlp,
            replicas=plan.shared_replicas,
            gate=gate,
            slot_buffers=slot_buffers,
        )
        # Upstream's own shared MLP (Qwen2-MoE builds it whatever the plan): dropped from the
        # block after construction, its tensors go to the slots.
        slots.replaced_shared_mlp = shared_experts
        return runner

    return factory


@contextlib.contextmanager
def moe_construction(
    family: MoeFamily,
    plan: FsePlan,
    switch: SwitchPoint | None,
    dtype: torch.dtype | None = None,
    layer_cls: type[SharedSlotExperts] = SharedSlotExperts,
) -> Iterator[None]:
    """Build the family's upstream MoE blocks according to ``plan`` (see the module docstring);
    the backend-neutral path's layers as ``layer_cls`` (:func:`~vllm_fse.core.layer.layer_class`).

    Swaps two names in the family's upstream module for the duration of one model's construction
    (single-threaded, restored on exit); see :mod:`vllm_fse.patches`.
    """
    module = family.upstream()
    real_resolve = getattr(module, "resolve_layer_fused_shared_expert", None)
    real_factory = module.FusedMoEFactory
    if real_resolve is not None and not plan.upstream_decides:
        module.resolve_layer_fused_shared_expert = lambda quant_config, prefix, *a, **k: plan.enabled
    quiet = contextlib.nullcontext()
    if plan.path is FsePath.BACKEND_NEUTRAL:
        buffers = SlotBuffers(switch.max_num_batched_tokens)  # one pair for the model's MoE layers
        module.FusedMoEFactory = _backend_neutral_factory(plan, switch, family, real_factory, dtype, buffers, layer_cls)
        quiet = no_aiter_fse_line()  # vLLM 0.34 would call the plugin's fused blocks AITER's
    try:
        with quiet:
            yield
    finally:
        if real_resolve is not None:
            module.resolve_layer_fused_shared_expert = real_resolve
        module.FusedMoEFactory = real_factory


def _check_placement(runner, plan: FsePlan) -> None:
    """Say so when vLLM placed this rank's shared slots elsewhere than the plan's layout (the sum
    stays exact, every slot lives on one rank; only the balance the plan line states is off)."""
    if runner.routed_experts.expert_map is None:
        return
    rank = runner.moe_config.moe_parallel_config.ep_rank
    promised = plan.layout.holders()[rank]
    live = local_slots(runner, plan.slots)
    if live != promised:
        logger.warning_once(
            "vllm-fse: EP rank %d holds shared slots %s, the plan (%s placement) expected %s",
            rank,
            live,
            plan.placement,
            promised,
        )


def local_slots(runner, slots: range) -> list[int]:
    """The shared slots this rank holds (all of them without expert parallelism)."""
    expert_map = runner.routed_experts.expert_map
    if expert_map is None:
        return list(slots)
    return [s for s in slots if s < expert_map.numel() and int(expert_map[s]) >= 0]
