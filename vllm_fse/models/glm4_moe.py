"""GLM-4.5/4.6/4.7 MoE (architecture ``Glm4MoeForCausalLM``) with fused shared experts."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.glm4_moe import Glm4MoE
from vllm.model_executor.models.glm4_moe import (
    Glm4MoeForCausalLM as UpstreamGlm4MoeForCausalLM,
)
from vllm.model_executor.models.utils import skip_spec_layers

from vllm_fse.models.fused_shared_experts import FusedSharedExpertsMixin, record_target_plan


class FseGlm4MoeForCausalLM(FusedSharedExpertsMixin, UpstreamGlm4MoeForCausalLM):
    def fse_moe_blocks(self) -> dict[int, Glm4MoE]:
        return {
            layer.layer_idx: layer.mlp
            for layer in self.model.layers
            if isinstance(getattr(layer, "mlp", None), Glm4MoE)
        }

    def fse_after_init(self) -> None:
        record_target_plan(self.fse_plan)

    def fse_checkpoint_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        # MTP tensors belong to the draft model: drop them before splitting.
        return skip_spec_layers(weights, self.config)
