"""The split path's dense MLP on the shared slot's storage: which of its parameters are the same
tensors as a FusedMoE slot's, so the split path needs no second copy of the shared expert."""

from __future__ import annotations

import torch

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
