"""GLM-4.7-Flash (architecture ``Glm4MoeLiteForCausalLM``: GLM's MoE on DeepSeek-style MLA
attention) and its MTP draft (``Glm4MoeLiteMTPModel``) with fused shared experts.

Its MoE block ``Glm4MoeLite`` is upstream's ``Glm4MoE``, so it is the GLM-4 MoE family.
"""

from __future__ import annotations

from vllm.model_executor.models.glm4_moe_lite import (
    Glm4MoeLiteForCausalLM as UpstreamGlm4MoeLiteForCausalLM,
)
from vllm.model_executor.models.glm4_moe_lite_mtp import Glm4MoeLiteMTP as UpstreamGlm4MoeLiteMTP

from vllm_fse.core.model import FusedSharedExpertsMixin
from vllm_fse.models.glm4_moe import GLM4_MOE


class FseGlm4MoeLiteForCausalLM(FusedSharedExpertsMixin, UpstreamGlm4MoeLiteForCausalLM):
    fse_family = GLM4_MOE


class FseGlm4MoeLiteMTP(FusedSharedExpertsMixin, UpstreamGlm4MoeLiteMTP):
    fse_family = GLM4_MOE
    fse_draft = True
