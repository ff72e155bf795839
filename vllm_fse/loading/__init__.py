"""Shared-expert weight splitting for FSE: pure torch, no vLLM import.

The one place that knows how a checkpoint's packed ``mlp.shared_experts.*`` tensors become the
appended routed-expert slots ``mlp.experts.{n_routed_experts + j}.*``; the models call it.
"""

from vllm_fse.loading.formats import (
    UNQUANTIZED,
    FormatKind,
    ScaleSplit,
    SharedExpertFormat,
    UnsupportedSharedExpertFormat,
    fp8_block,
    fp8_per_tensor,
    per_channel,
    shared_expert_format,
)
from vllm_fse.loading.splitter import (
    PROJECTIONS,
    MissingSlotWeightsError,
    SharedExpertLayout,
    SharedExpertWeightError,
    SlotTensor,
    SlotTracker,
    split_shared_experts,
)

__all__ = [
    "PROJECTIONS",
    "UNQUANTIZED",
    "FormatKind",
    "MissingSlotWeightsError",
    "ScaleSplit",
    "SharedExpertFormat",
    "SharedExpertLayout",
    "SharedExpertWeightError",
    "SlotTensor",
    "SlotTracker",
    "UnsupportedSharedExpertFormat",
    "fp8_block",
    "fp8_per_tensor",
    "per_channel",
    "shared_expert_format",
    "split_shared_experts",
]
