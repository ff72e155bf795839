"""The plan line: one INFO line per model saying whether FSE is on, how, and what it costs; and the
MTP draft's check against its target's plan."""

from __future__ import annotations

import torch

from vllm_fse.compat import logger
from vllm_fse.core.decision import FsePlan
from vllm_fse.core.replicas import format_bytes

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


def split_path_memory(moe_blocks: dict[int, torch.nn.Module]) -> str:
    """Where the split path's dense MLPs keep their weights: on the shared slots, or in a copy (its
    bytes, and why the slots could not serve); empty without a split path."""
    split = [s for s in (getattr(b.experts, "fse_shared_slots", None) for b in moe_blocks.values())
             if s is not None and s.split_mlp is not None]  # fmt: skip
    copies = [s for s in split if s.split_weights_slot is None]
    if not copies:
        return "split path: the dense MLP reads the shared slot's weights, no copy" if split else ""
    size = format_bytes(sum(s.split_mlp_bytes for s in copies))
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
