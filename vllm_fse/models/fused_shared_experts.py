"""The family-neutral FSE core on the vLLM side: construction hook, loading, plan log, mixin.

Every supported family builds its MoE block the same way upstream: the block's ``__init__``
asks ``resolve_layer_fused_shared_expert`` whether to fuse and builds its experts with
``FusedMoEFactory``, both names read from the block's own module. A family adapter
(:class:`MoeFamily`) says which module and block that is and how to build the family's dense
shared-expert MLP; everything else lives here. While a plugin model is constructed,
:func:`moe_construction` answers the first from the plugin's :class:`FsePlan` and, on the
backend-neutral path, turns the second into a FusedMoE with ``n_routed + n_shared`` experts and
``top_k + n_shared`` slots per token whose router is vLLM's own router for the routed experts;
:class:`~vllm_fse.models.shared_slot_experts.SharedSlotExperts` adds the shared slots to each
step (fused) or runs them as a dense MLP (split). Upstream's constructor stays the single source
of the MoE block's structure and parameter names.

Loading: checkpoint tensors go through :mod:`vllm_fse.loading` (split into the slots), and the
FusedMoE weight loaders report which slot tensors they stored, so a slot left unfilled is an
error instead of a silent zero.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from vllm.model_executor.layers.fused_moe.router.router_factory import (
    create_fused_moe_router,
)

from vllm_fse.compat import logger
from vllm_fse.decision import FsePath, FsePlan, FseSwitch, compiled_on_cpu, plan_fse
from vllm_fse.loading import SharedExpertLayout, SlotTracker, split_shared_experts
from vllm_fse.models.shared_slot_experts import BENCH_ROUTED_KEY, SharedSlotExperts, SwitchPoint
from vllm_fse.patches import (
    keep_freed_cpu_heap,
    no_aiter_fse_line,
    keep_inductor_order_of_out_variant_kernels,
    resolve_widened_moe_configs,
    route_to_modular_kernels,
)

# The MoE block's module that holds the dense shared-expert MLP of the split path (VLLM_FSE=auto).
SPLIT_MLP = "fse_split_mlp"

# FusedMoE shard ids -> checkpoint projection names (gate=w1, up=w3, down=w2).
_SHARD_TO_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


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
    second; ``rsf`` there would scale the shared expert by rsf**2 / rsf (upstream lost 48 gsm8k
    points that way). In float16 upstream's runner guards against overflow by dividing the shared
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
        slots = SharedSlotExperts(
            runner,
            switch,
            n_routed=num_experts,
            n_shared=n_shared_experts,
            slot_weight=slot_weight,
            split_mlp=split_mlp,
            replicas=plan.shared_replicas,
            gate=gate,
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
) -> Iterator[None]:
    """Build the family's upstream MoE blocks according to ``plan`` (see the module docstring).

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
        module.FusedMoEFactory = _backend_neutral_factory(plan, switch, family, real_factory, dtype)
        quiet = no_aiter_fse_line()  # vLLM 0.34 would call the plugin's fused blocks AITER's
    try:
        with quiet:
            yield
    finally:
        if real_resolve is not None:
            module.resolve_layer_fused_shared_expert = real_resolve
        module.FusedMoEFactory = real_factory


def checkpoint_layout(hf_config, plan: FsePlan, family: MoeFamily) -> SharedExpertLayout:
    """The splitter's view of the checkpoint: every MoE layer, MTP layers included."""
    shape = plan.shape
    return SharedExpertLayout(
        n_routed_experts=plan.n_routed_experts,
        n_shared_experts=plan.n_shared_experts if plan.enabled else 0,
        hidden_size=hf_config.hidden_size,
        moe_intermediate_size=hf_config.moe_intermediate_size,
        moe_layers=family.moe_layer_indices(hf_config),
        format=plan.format,
        dense_copy=SPLIT_MLP if plan.switch is FseSwitch.AUTO else None,
        shared_replicas=plan.shared_replicas,
        shared_expert_name=family.shared_expert_name,
        shared_width=shape.shared_width if shape is not None and shape.gated else None,
    )


def _check_placement(runner, plan: FsePlan) -> None:
    """Say so when vLLM placed this rank's shared slots elsewhere than the plan's layout (the sum
    stays exact, every slot lives on one rank; only the balance the plan line states is off)."""
    if runner.routed_experts.expert_map is None:
        return
    rank = runner.moe_config.moe_parallel_config.ep_rank
    promised = plan.layout.holders()[rank]
    live = _local_slots(runner, plan.slots)
    if live != promised:
        logger.warning_once(
            "vllm-fse: EP rank %d holds shared slots %s, the plan (%s placement) expected %s",
            rank,
            live,
            plan.placement,
            promised,
        )


def _local_slots(runner, slots: range) -> list[int]:
    """The shared slots this rank holds (all of them without expert parallelism)."""
    expert_map = runner.routed_experts.expert_map
    if expert_map is None:
        return list(slots)
    return [s for s in slots if s < expert_map.numel() and int(expert_map[s]) >= 0]


@contextlib.contextmanager
def _tracked_weight_loaders(moe_blocks: dict[int, torch.nn.Module], plan: FsePlan, tracker: SlotTracker):
    """Make each FusedMoE parameter's weight loader report the slot tensors it stored."""
    restore: list[tuple[torch.nn.Parameter, Callable]] = []

    def tracking(loader: Callable, layer: int, suffix: str) -> Callable:
        def load(*args, **kwargs):
            stored = loader(*args, **kwargs)
            expert_id, shard_id = kwargs.get("expert_id"), kwargs.get("shard_id")
            if stored and expert_id in plan.slots and shard_id in _SHARD_TO_PROJ:
                tracker.mark_loaded(layer, expert_id, _SHARD_TO_PROJ[shard_id], suffix)
            return stored

        return load

    try:
        for layer, block in moe_blocks.items():
            for name, param in block.experts.routed_experts.named_parameters(recurse=False):
                loader = getattr(param, "weight_loader", None)
                if loader is None or not name.startswith(("w13_", "w2_")):
                    continue
                restore.append((param, loader))
                param.weight_loader = tracking(loader, layer, name.split("_", 1)[1])
        yield
    finally:
        for param, loader in restore:
            param.weight_loader = loader


_SPLIT_MLP_TENSOR = re.compile(rf"(?:^|\.)layers\.(\d+)\.mlp\.{SPLIT_MLP}\.(gate_proj|up_proj|down_proj)\.(.+)$")
# Checkpoint projection -> (split MLP module, shard id): vLLM's stacked gate_up_proj.
_SPLIT_MLP_TARGET = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}
_SLOT_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(.+)$")
# Checkpoint projection -> (FusedMoE parameter prefix, shard id), as vLLM's expert params mapping.
_SLOT_TARGET = {"gate_proj": ("w13_", "w1"), "up_proj": ("w13_", "w3"), "down_proj": ("w2_", "w2")}


def _load_plugin_tensors(
    weights: Iterable[tuple[str, torch.Tensor]],
    model: torch.nn.Module,
    moe_blocks: dict[int, torch.nn.Module],
    plan: FsePlan,
    loaded: set[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Load what only the plugin has (adding the parameters' names to ``loaded``) and pass
    everything else on to the family's loader:

    - the splitter's whole shared-expert tensors, into each block's split MLP;
    - slots of replicas beyond the first, which upstream's expert mapping (``n_routed +
      n_shared`` experts) does not know: straight into the FusedMoE parameters.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    first_replica_end = plan.n_routed_experts + plan.n_shared_experts
    for name, tensor in weights:
        match = _SPLIT_MLP_TENSOR.search(name)
        if match is not None:
            layer, proj, suffix = int(match[1]), match[2], match[3]
            block = moe_blocks.get(layer)
            if block is None:  # a layer another pipeline rank holds
                continue
            module_name, shard = _SPLIT_MLP_TARGET[proj]
            param = getattr(getattr(block, SPLIT_MLP), module_name).get_parameter(suffix)
            if shard is None:
                param.weight_loader(param, tensor)
            else:
                param.weight_loader(param, tensor, shard)
            loaded.add(names[id(param)])
            continue
        match = _SLOT_TENSOR.search(name)
        if match is not None and int(match[2]) >= first_replica_end:
            layer, slot, proj, suffix = int(match[1]), int(match[2]), match[3], match[4]
            block = moe_blocks.get(layer)
            if block is None:
                continue
            prefix, shard = _SLOT_TARGET[proj]
            param = block.experts.routed_experts.get_parameter(prefix + suffix)
            mapped = f"{name[: match.start(2)]}{prefix}{suffix}"
            # False where expert parallelism puts the slot on another rank (the tracker knows).
            param.weight_loader(param, tensor, mapped, shard_id=shard, expert_id=slot, return_success=True)
            loaded.add(names[id(param)])
            continue
        yield name, tensor


def load_with_fused_shared_experts(
    weights: Iterable[tuple[str, torch.Tensor]],
    load: Callable[[Iterable[tuple[str, torch.Tensor]]], set[str]],
    *,
    plan: FsePlan,
    hf_config,
    model: torch.nn.Module,
    moe_blocks: dict[int, torch.nn.Module],
    family: MoeFamily,
) -> set[str]:
    """Run ``load`` (upstream's loader) on the split checkpoint, then verify every slot.

    ``moe_blocks`` maps layer index -> MoE block for the layers this rank holds.
    """
    if not plan.enabled:
        return load(weights)
    layout = checkpoint_layout(hf_config, plan, family)
    tracker = SlotTracker(
        frozenset().union(
            *(
                SlotTracker.for_layers(layout, [layer], _local_slots(block.experts, plan.slots)).expected
                for layer, block in moe_blocks.items()
            )
        )
    )
    split_loaded: set[str] = set()
    with _tracked_weight_loaders(moe_blocks, plan, tracker):
        loaded = load(_load_plugin_tensors(split_shared_experts(weights, layout), model, moe_blocks, plan, split_loaded))
    tracker.verify()
    return loaded | split_loaded


# The target model's plan in this process, for the draft model to compare against.
_target_plan: FsePlan | None = None


def record_target_plan(plan: FsePlan) -> None:
    global _target_plan
    _target_plan = plan


def check_draft_agrees_with_target(plan: FsePlan) -> None:
    """Say so when the MTP draft and its target run their shared experts differently.

    Both decisions come from the same inputs, so they normally agree. If they do not, each
    model is still correct on its own (its slots come from its own layers' tensors and are
    verified); the draft then just runs unfused, or fused, alone.
    """
    if _target_plan is not None and _target_plan.path is not plan.path:
        logger.warning_once(
            "vllm-fse: the MTP draft runs its shared experts %s (%s) while the target model runs "
            "them %s (%s); both are verified and correct, only the speed differs",
            plan.path.value,
            plan.reason,
            _target_plan.path.value,
            _target_plan.reason,
        )


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def split_path_memory(moe_blocks: dict[int, torch.nn.Module]) -> str:
    """Where the split path's dense MLPs keep their weights: on the shared slots, or in a copy (its
    bytes, and why the slots could not serve); empty without a split path."""
    split = [s for s in (getattr(b.experts, "fse_shared_slots", None) for b in moe_blocks.values())
             if s is not None and s.split_mlp is not None]  # fmt: skip
    copies = [s for s in split if s.split_weights_slot is None]
    if not copies:
        return "split path: the dense MLP reads the shared slot's weights, no copy" if split else ""
    size = _format_bytes(sum(s.split_mlp_bytes for s in copies))
    reasons = sorted({s.split_copy_reason for s in copies if s.split_copy_reason})
    why = f" ({'; '.join(reasons)})" if reasons else ""
    if len(copies) < len(split):
        return (f"split path: {len(split) - len(copies)} of {len(split)} MoE layers read the shared slot's weights, "
                f"the others keep a dense copy, {size} in all{why}")  # fmt: skip
    return f"split path: one dense shared-expert copy per MoE layer, {size} in all{why}"


def log_plan(model_name: str, plan: FsePlan, moe_blocks: dict[int, torch.nn.Module]) -> None:
    """One INFO line per model: on/off, path, MoE layers, slot indices, shared-slot weight and,
    on the backend-neutral path, when steps run fused (logged once that is known: under
    ``auto`` without an override, after the model's first MoE call measured or read it)."""
    moe_layers = sorted(moe_blocks)
    if not plan.enabled:
        logger.info_once("vllm-fse: %s FSE off (%s)", model_name, plan.reason)
        return
    slots = getattr(next(iter(moe_blocks.values())).experts, "fse_shared_slots", None) if moe_blocks else None
    if slots is None:
        weight, switch = "1.0, routed_scaling_factor applied by AITER to the routed slots only", None
    else:
        weight, switch = f"{slots.slot_weight:g}", slots.switch
    split_memory = split_path_memory(moe_blocks)
    replicas = ""
    if (plan.shared_replicas > 1 or plan.ep_size > 1) and moe_blocks and slots is not None:
        runner = next(iter(moe_blocks.values())).experts
        routed = runner.routed_experts
        per_slot = sum(w[0].numel() * w.element_size() for w in (routed.w13_weight, routed.w2_weight))
        rank = runner.moe_config.moe_parallel_config.ep_rank if plan.ep_size > 1 else None
        replicas = "; " + plan.layout.describe(per_slot, len(moe_blocks), rank)

    shape = plan.shape
    if shape is not None and shape.gated:
        weight += " x sigmoid(shared_expert_gate(x)) per token"
        if shape.n_slots > 1 or shape.padding:
            weight += (
                f"; shared expert of width {shape.shared_width} as {shape.n_slots} slots of {shape.slot_width}"
                + (f" (last one zero-padded: +{shape.padding / shape.shared_width:.1%} shared-expert FLOPs)"
                   if shape.padding else "")
            )

    def announce() -> None:
        steps = ""
        if switch is not None:
            steps = f"; {switch.describe()}" + (f"; {split_memory}" if split_memory else "")
        logger.info_once(
            "vllm-fse: %s FSE on (%s; %s): %d MoE layers %s, shared slots %s of %d experts per "
            "layer, shared-slot weight %s%s%s",
            model_name,
            plan.path.value,
            plan.reason,
            len(moe_layers),
            _ranges(moe_layers),
            f"{plan.slots.start}..{plan.slots.stop - 1}",
            plan.slots.stop,
            weight,
            replicas,
            steps,
        )

    if switch is None:
        announce()
    else:
        switch.announce_when_resolved(announce)


def _ranges(indices: list[int]) -> str:
    if not indices:
        return "[]"
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"[{indices[0]}..{indices[-1]}]"
    return str(indices)


class FusedSharedExpertsMixin:
    """Put before an upstream model class of a :class:`MoeFamily`: builds it under
    :func:`plan_fse`'s plan and loads its weights through the splitter with slot verification.

    An adapter sets ``fse_family`` and, for an MTP draft, ``fse_draft = True``; that is all it
    has to say. MoE blocks sit at ``model.layers[i].mlp`` (GLM/DeepSeek drafts:
    ``model.layers[str(i)].mtp_block.mlp``), as every supported family has them upstream; a
    wrapper whose decoder layers sit elsewhere overrides :meth:`fse_decoder_layers`.
    """

    fse_family: MoeFamily
    fse_draft: bool = False
    fse_plan: FsePlan

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        family = self.fse_family
        model_config = vllm_config.model_config
        plan = plan_fse(
            vllm_config,
            aiter_capable=family.aiter_capable,
            shared_expert_name=family.shared_expert_name,
            moe_layers=family.moe_layer_indices(getattr(model_config, "hf_text_config", None) or model_config.hf_config),
        )
        if plan.enabled and compiled_on_cpu(vllm_config):
            # Before construction: the model's compile backend copies the Inductor options.
            keep_inductor_order_of_out_variant_kernels(vllm_config)
            if plan.switch is FseSwitch.AUTO:  # only ever on the backend-neutral path
                keep_freed_cpu_heap()  # the split path's torch.cond branch frees its buffers every step
        switch = None
        if plan.path is FsePath.BACKEND_NEUTRAL:
            max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
            switch = (
                SwitchPoint.auto_switch(plan.fused_max_tokens, max_tokens)
                if plan.switch is FseSwitch.AUTO
                else SwitchPoint.always_fused(max_tokens)
            )
            extra = vllm_config.additional_config
            switch.bench_routed_path = isinstance(extra, dict) and bool(extra.get(BENCH_ROUTED_KEY))
        dtype = vllm_config.model_config.dtype
        with moe_construction(self.fse_family, plan, switch, dtype):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fse_plan = plan
        self.fse_switch = switch
        self.fse_hf_config = getattr(vllm_config.model_config, "hf_text_config", None) or vllm_config.model_config.hf_config
        blocks = self.fse_moe_blocks()
        widened = sum(getattr(m, "fse_shared_slots", None) is not None for m in self.modules())
        if widened != sum(getattr(b.experts, "fse_shared_slots", None) is not None for b in blocks.values()):
            # A block the plugin cannot find would keep an unloaded split MLP and unverified slots.
            raise RuntimeError(
                f"vllm-fse: {type(self).__name__} built {widened} fused MoE layers but finds "
                f"{len(blocks)} MoE blocks under its decoder layers"
            )
        for block in blocks.values():
            slots = getattr(block.experts, "fse_shared_slots", None)
            if slots is None:
                continue
            if slots.replaced_shared_mlp is not None:
                for name, child in list(block.named_children()):
                    if child is slots.replaced_shared_mlp:
                        setattr(block, name, None)
                slots.replaced_shared_mlp = None
            if slots.split_mlp is not None:
                # Under the block, so the checkpoint's shared-expert tensors load into it.
                block.add_module(SPLIT_MLP, slots.split_mlp)
        if switch is None:
            log_plan(type(self).__name__, plan, self.fse_moe_blocks())
        # else: once the weights are processed (process_weights_after_loading), since the plan line
        # says where the split path's weights live.
        # The compiled graph reads the switch point: __call__ measures it before the first forward.
        self.fse_resolve_before_forward = None
        if switch is not None and switch.auto and not switch.resolved and compiled_on_cpu(vllm_config):
            self.fse_resolve_before_forward = next(
                (s for s in (getattr(b.experts, "fse_shared_slots", None) for b in blocks.values()) if s), None
            )
        if self.fse_draft:
            check_draft_agrees_with_target(plan)
        else:
            record_target_plan(plan)

    def __call__(self, *args, **kwargs):
        # Not a forward pre-hook: a model class compiled as a whole (support_torch_compile on the
        # MTP drafts) replaces nn.Module.__call__ by one that runs the compiled code and skips
        # hooks. This __call__ precedes it (the mixin comes first), outside the graph.
        slots = self.fse_resolve_before_forward
        if slots is not None:
            self.fse_resolve_before_forward = None
            slots.resolve_before_forward()
        return super().__call__(*args, **kwargs)

    def process_weights_after_loading(self) -> None:
        # vLLM's model-level hook, after every layer processed its weights for its kernel: the
        # split path's dense MLP reads a shared slot where that holds the same matrices.
        upstream = getattr(super(), "process_weights_after_loading", None)
        if upstream is not None:
            upstream()
        if self.fse_switch is None:
            return
        blocks = self.fse_moe_blocks()
        for block in blocks.values():
            slots = getattr(block.experts, "fse_shared_slots", None)
            if slots is not None:
                slots.read_split_weights_from_slot()
        log_plan(type(self).__name__, self.fse_plan, blocks)

    def fse_decoder_layers(self) -> torch.nn.Module:
        """The model's ``layers`` container (a multimodal wrapper overrides where it sits)."""
        return self.model.layers

    def fse_moe_blocks(self) -> dict[int, torch.nn.Module]:
        """Layer index -> MoE block, for the layers this rank holds (pipeline ranks hold
        ``PPMissingLayer`` elsewhere)."""
        block_cls = self.fse_family.moe_block_cls()
        layers = self.fse_decoder_layers()
        items = layers.items() if isinstance(layers, torch.nn.ModuleDict) else enumerate(layers)
        found = ((int(i), getattr(getattr(layer, "mtp_block", layer), "mlp", None)) for i, layer in items)
        return {i: block for i, block in found if isinstance(block, block_cls)}

    def fse_checkpoint_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        if self.fse_draft:
            return weights
        # MTP tensors belong to the draft model: drop them before splitting.
        prefix = self.fse_family.draft_prefix
        if prefix is not None:
            return ((name, tensor) for name, tensor in weights if not name.startswith(prefix))
        from vllm.model_executor.models.utils import skip_spec_layers

        return skip_spec_layers(weights, self.fse_hf_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_with_fused_shared_experts(
            self.fse_checkpoint_weights(weights),
            super().load_weights,
            plan=self.fse_plan,
            hf_config=self.fse_hf_config,
            model=self,
            moe_blocks=self.fse_moe_blocks(),
            family=self.fse_family,
        )
