"""Weight loading with fused shared experts: checkpoint tensors go through :mod:`vllm_fse.loading`
(split into the slots), and the FusedMoE weight loaders report which slot tensors they stored, so
a slot left unfilled is an error instead of a silent zero."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator

import torch

from vllm_fse.core.construction import SPLIT_MLP, MoeFamily, local_slots
from vllm_fse.core.decision import FsePlan, FseSwitch
from vllm_fse.loading import SharedExpertLayout, SlotTracker, split_shared_experts

# FusedMoE shard ids -> checkpoint projection names (gate=w1, up=w3, down=w2).
_SHARD_TO_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


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
                SlotTracker.for_layers(layout, [layer], local_slots(block.experts, plan.slots)).expected
                for layer, block in moe_blocks.items()
            )
        )
    )
    split_loaded: set[str] = set()
    with _tracked_weight_loaders(moe_blocks, plan, tracker):
        loaded = load(_load_plugin_tensors(split_shared_experts(weights, layout), model, moe_blocks, plan, split_loaded))
    tracker.verify()
    return loaded | split_loaded
