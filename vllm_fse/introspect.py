"""Describe a live vLLM model instance: what the engine really instantiated.

Pass these to ``LLM.apply_model`` (needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``); they run
inside the worker on the real model and return plain data.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_fse.patches import freed_cpu_heap_state


def model_class(model) -> str:
    """``module:Class`` of the instantiated model."""
    return f"{type(model).__module__}:{type(model).__qualname__}"


def _moe_blocks(model):
    """(name, block) for every module that owns a FusedMoE runner as ``experts``."""
    for name, module in model.named_modules():
        routed = getattr(getattr(module, "experts", None), "routed_experts", None)
        if routed is not None and hasattr(routed, "w13_weight"):
            yield name, module


def _is_base_router(router) -> bool:
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    return isinstance(router, BaseRouter)


def describe_model(model) -> dict[str, Any]:
    """Class, FSE plan and per-MoE-layer structure of a live GLM-4 MoE model (main or MTP)."""
    plan = getattr(model, "fse_plan", None)
    layers = []
    for name, block in _moe_blocks(model):
        runner = block.experts
        slots = getattr(runner, "fse_shared_slots", None)
        layers.append(
            {
                "name": name,
                # GLM/DeepSeek: shared_experts; Qwen: shared_expert.
                "has_shared_experts_mlp": any(
                    getattr(block, name, None) is not None for name in ("shared_experts", "shared_expert")
                ),
                "has_split_mlp": getattr(block, "fse_split_mlp", None) is not None,
                # Set once the weights are processed: the slot the split MLP reads, or why it keeps a copy.
                "split_weights_slot": getattr(slots, "split_weights_slot", None),
                "split_copy_reason": getattr(slots, "split_copy_reason", None),
                "router": type(runner.router).__qualname__,
                # vLLM binds routed-experts capture only to BaseRouter subclasses.
                "router_is_base_router": _is_base_router(runner.router),
                "shared_slots": type(slots).__qualname__ if slots is not None else None,
                "shared_slot_weight": slots.slot_weight if slots is not None else None,
                "shared_slot_gated": slots.gate is not None if slots is not None else None,
                "n_shared_slots": slots.n_shared if slots is not None else None,
                "shared_replicas": slots.replicas if slots is not None else None,
                "top_k": runner.moe_config.experts_per_token,
                "w13_shape": list(runner.routed_experts.w13_weight.shape),
                "w2_shape": list(runner.routed_experts.w2_weight.shape),
            }
        )
    switch = getattr(model, "fse_switch", None)
    # The Inductor options of the compiled decoder stack (None in eager mode).
    decoder = getattr(model, "model", None)
    compilation = getattr(decoder, "compilation_config", None)
    inductor = compilation.inductor_compile_config if compilation is not None else {}
    traced = getattr(decoder, "do_not_compile", True) is False
    return {
        "class": model_class(model),
        "fse_path": plan.path.name if plan is not None else None,
        "fse_reason": plan.reason if plan is not None else None,
        "moe_layers": layers,
        "inductor_reorder_for_peak_memory": inductor.get("reorder_for_peak_memory"),
        # vllm_fse.patches entry 10: whether this process keeps freed heap memory (None: not asked).
        "freed_cpu_heap": freed_cpu_heap_state(),
        # What runs the traced graph: "inductor", or "eager" under VLLM_CPU_CI_ENV; None when not traced.
        "compilation_backend": compilation.backend if traced else None,
        "switch": None if switch is None else {
            "auto": switch.auto,
            "fused_max_tokens": switch.fused_max_tokens,
            "source": switch.source,
            "describe": switch.describe() if switch.resolved else None,
            "calls": dict(switch.calls),
            "chosen_in": dict(switch.chosen_in),
            "measured": list(switch.measured),
            "resolve_s": switch.resolve_s,
        },
    }


def shared_slot_weights(model) -> dict[str, dict[str, torch.Tensor]]:
    """The FusedMoE rows beyond the routed experts (the fused shared slots), per MoE block.

    ``w13`` is ``[n_slots, 2 * moe_intermediate, hidden]`` (gate rows, then up rows) and ``w2``
    ``[n_slots, hidden, moe_intermediate]``, as float32 copies.
    """
    out = {}
    for name, block in _moe_blocks(model):
        routed = block.experts.routed_experts
        slots = getattr(block.experts, "fse_shared_slots", None)
        n_routed = slots.n_routed if slots is not None else block.n_routed_experts
        out[name] = {
            "w13": routed.w13_weight[n_routed:].detach().float().cpu().clone(),
            "w2": routed.w2_weight[n_routed:].detach().float().cpu().clone(),
        }
    return out


def reset_switch_calls(model) -> dict[str, int] | None:
    """Zero the model's fused/split call counters (so a later read counts only what follows)."""
    switch = getattr(model, "fse_switch", None)
    if switch is None:
        return None
    before = dict(switch.calls)
    switch.reset_calls()
    return before


def switch_state(model) -> dict[str, Any] | None:
    """:func:`describe_model`'s ``switch`` entry alone."""
    return describe_model(model)["switch"]


def _drafter_model(worker):
    """The speculative-decoding draft model of a worker (``LLM.collective_rpc`` target)."""
    worker = getattr(worker, "worker", worker)  # a WorkerWrapper holds the worker
    runner = worker.model_runner
    # Model Runner V2 (vLLM's default on GPU) holds it as ``speculator``, the V1 runners as ``drafter``.
    holder = getattr(runner, "speculator", None) or runner.drafter
    return holder.model


def describe_drafter(worker) -> dict[str, Any]:
    """:func:`describe_model` of the worker's draft model (pass to ``LLM.collective_rpc``)."""
    return describe_model(_drafter_model(worker))


def drafter_switch_state(worker) -> dict[str, Any] | None:
    """:func:`switch_state` of the worker's draft model (pass to ``LLM.collective_rpc``)."""
    return switch_state(_drafter_model(worker))


def reset_drafter_switch_calls(worker) -> dict[str, int] | None:
    """:func:`reset_switch_calls` on the worker's draft model (pass to ``LLM.collective_rpc``)."""
    return reset_switch_calls(_drafter_model(worker))


def drafter_slot_weights(worker) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`shared_slot_weights` of the worker's draft model (pass to ``LLM.collective_rpc``)."""
    return shared_slot_weights(_drafter_model(worker))
