"""Qwen3.5-MoE (``Qwen3_5MoeForCausalLM``, the multimodal ``Qwen3_5MoeForConditionalGeneration``
and the MTP draft ``Qwen3_5MoeMTP``) with fused shared experts: Qwen3-Next's MoE block, so the
Qwen3-Next family (:mod:`vllm_fse.models.qwen_moe`). A module of its own because upstream's
``qwen3_5`` imports the vision tower (transformers' image processors, torchvision).

The upstream classes are the ones vLLM's registry resolves to on this platform: vLLM 0.32/0.33's
``vllm.model_executor.models.qwen3_5`` / ``qwen3_5_mtp``; 0.34's ``vllm.models.qwen3_5``, which is
NVIDIA's own implementation on CUDA (it still builds ``Qwen3NextSparseMoeBlock`` from
``qwen3_next``, under ``model.layers``) and the former module elsewhere.
"""

from __future__ import annotations

from vllm_fse.compat import vllm_model_class
from vllm_fse.core.model import FusedSharedExpertsMixin
from vllm_fse.models.qwen_moe import QWEN3_NEXT, QwenDraftMixin

UpstreamQwen3_5MoeForCausalLM = vllm_model_class("Qwen3_5MoeForCausalLM")
UpstreamQwen3_5MoeForConditionalGeneration = vllm_model_class("Qwen3_5MoeForConditionalGeneration")
UpstreamQwen3_5MoeMTP = vllm_model_class("Qwen3_5MoeMTP")


class FseQwen3_5MoeForCausalLM(FusedSharedExpertsMixin, UpstreamQwen3_5MoeForCausalLM):
    fse_family = QWEN3_NEXT


class FseQwen3_5MoeForConditionalGeneration(FusedSharedExpertsMixin, UpstreamQwen3_5MoeForConditionalGeneration):
    fse_family = QWEN3_NEXT

    def fse_decoder_layers(self):
        return self.language_model.model.layers


class FseQwen3_5MoeMTP(QwenDraftMixin, FusedSharedExpertsMixin, UpstreamQwen3_5MoeMTP):
    fse_family = QWEN3_NEXT
