"""Deliberate mutations of a live FSE model (``LLM.apply_model`` probes, ``mutations:NAME``):
a test applies one and shows that the comparison that guards the behaviour fails."""

from __future__ import annotations

import torch


def constant_shared_slot_gate(model) -> int:
    """Every gated shared slot at weight 0.5 (the gate's value at logit 0) instead of
    ``sigmoid(shared_expert_gate(x))`` per token; returns how many layers were mutated."""
    mutated = 0
    for module in model.modules():
        slots = getattr(module, "fse_shared_slots", None)
        if slots is not None and slots.gate is not None:
            slots.gate_weight = lambda x: torch.full((x.shape[0], 1), 0.5, dtype=x.dtype, device=x.device)
            mutated += 1
    return mutated
