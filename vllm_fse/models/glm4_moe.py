"""GLM-4.5/4.6/4.7 MoE (architecture ``Glm4MoeForCausalLM``) with fused shared experts."""

from __future__ import annotations

import torch
from vllm.model_executor.models.glm4_moe import (
    Glm4MoeForCausalLM as UpstreamGlm4MoeForCausalLM,
)

from vllm_fse.core.construction import MoeFamily
from vllm_fse.core.model import FusedSharedExpertsMixin


def glm4_moe_split_mlp(
    *, hidden_size: int, intermediate_size: int, quant_config, prefix: str, is_sequence_parallel: bool = False
) -> torch.nn.Module:
    """The shared-expert MLP as ``Glm4MoE`` builds it unfused (GLM's MoE is never sequence parallel)."""
    from vllm.model_executor.models.glm4_moe import Glm4MoeMLP

    return Glm4MoeMLP(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        hidden_act="silu",
        quant_config=quant_config,
        reduce_results=False,
        prefix=prefix,
    )


# Also GLM-4.7-Flash's: ``Glm4MoeLite`` is a ``Glm4MoE``.
GLM4_MOE = MoeFamily("GLM-4 MoE", "vllm.model_executor.models.glm4_moe", "Glm4MoE", glm4_moe_split_mlp)


class FseGlm4MoeForCausalLM(FusedSharedExpertsMixin, UpstreamGlm4MoeForCausalLM):
    fse_family = GLM4_MOE
