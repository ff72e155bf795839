"""Qwen3.5-MoE (``Qwen3_5MoeForCausalLM``, the multimodal ``Qwen3_5MoeForConditionalGeneration``
and the MTP draft ``Qwen3_5MoeMTP``) with fused shared experts: Qwen3-Next's MoE block, so the
Qwen3-Next family (:mod:`vllm_fse.models.qwen_moe`). A module of its own because upstream's
``qwen3_5`` imports the vision tower (transformers' image processors, torchvision).
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5MoeForCausalLM as UpstreamQwen3_5MoeForCausalLM,
)
from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5MoeForConditionalGeneration as UpstreamQwen3_5MoeForConditionalGeneration,
)
from vllm.model_executor.models.qwen3_5_mtp import Qwen3_5MoeMTP as UpstreamQwen3_5MoeMTP

from vllm_fse.models.fused_shared_experts import FusedSharedExpertsMixin
from vllm_fse.models.qwen_moe import QWEN3_NEXT, QwenDraftMixin


class FseQwen3_5MoeForCausalLM(FusedSharedExpertsMixin, UpstreamQwen3_5MoeForCausalLM):
    fse_family = QWEN3_NEXT


class FseQwen3_5MoeForConditionalGeneration(FusedSharedExpertsMixin, UpstreamQwen3_5MoeForConditionalGeneration):
    fse_family = QWEN3_NEXT

    def fse_decoder_layers(self):
        return self.language_model.model.layers


class FseQwen3_5MoeMTP(QwenDraftMixin, FusedSharedExpertsMixin, UpstreamQwen3_5MoeMTP):
    fse_family = QWEN3_NEXT
