"""Describe a live vLLM model instance: what the engine really instantiated.

Pass these to ``LLM.apply_model`` (needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``); they run
inside the worker on the real model and return plain data.
"""

from __future__ import annotations

from typing import Any


def model_class(model) -> str:
    """``module:Class`` of the instantiated model."""
    return f"{type(model).__module__}:{type(model).__qualname__}"


def describe_model(model) -> dict[str, Any]:
    """Class and per-MoE-layer facts of a live GLM-4 MoE model (main or MTP)."""
    layers = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is None or not hasattr(experts, "w13_weight"):
            continue
        layers.append(
            {
                "name": name,
                "class": type(module).__qualname__,
                "has_shared_experts_mlp": getattr(module, "shared_experts", None) is not None,
                "w13_shape": list(experts.w13_weight.shape),
                "w2_shape": list(experts.w2_weight.shape),
            }
        )
    return {"class": model_class(model), "moe_layers": layers}
