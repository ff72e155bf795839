"""Shared-expert weight splitting for FSE: pure torch, no vLLM import.

The one place that knows how a checkpoint's packed ``mlp.shared_experts.*`` tensors become the
appended routed-expert slots ``mlp.experts.{n_routed_experts + j}.*``; the models call it.
"""

from vllm_fse.loading.formats import (
    FORMATS,
    ROWS,
    UNQUANTIZED,
    FormatKind,
    FormatRow,
    ScaleSplit,
    SharedExpertFormat,
    UnsupportedSharedExpertFormat,
    fp8_block,
    format_table_markdown,
    fp8_per_tensor,
    packed_int,
    per_channel,
    refusal,
    shared_expert_format,
    slot_alignment_refusal,
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
    "FORMATS",
    "PROJECTIONS",
    "ROWS",
    "UNQUANTIZED",
    "FormatKind",
    "FormatRow",
    "MissingSlotWeightsError",
    "ScaleSplit",
    "SharedExpertFormat",
    "SharedExpertLayout",
    "SharedExpertWeightError",
    "SlotTensor",
    "SlotTracker",
    "UnsupportedSharedExpertFormat",
    "fp8_block",
    "format_table_markdown",
    "fp8_per_tensor",
    "packed_int",
    "per_channel",
    "refusal",
    "shared_expert_format",
    "slot_alignment_refusal",
    "split_shared_experts",
]
