"""GLM-4.5/4.6/4.7 MoE (architecture ``Glm4MoeForCausalLM``) with fused shared experts."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.glm4_moe import Glm4MoE
from vllm.model_executor.models.glm4_moe import (
    Glm4MoeForCausalLM as UpstreamGlm4MoeForCausalLM,
)
from vllm.model_executor.models.utils import skip_spec_layers

from vllm_fse.decision import plan_fse
from vllm_fse.models.fused_shared_experts import (
    glm4_moe_construction,
    load_with_fused_shared_experts,
    log_plan,
    record_target_plan,
)


class FseGlm4MoeForCausalLM(UpstreamGlm4MoeForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        plan = plan_fse(vllm_config)
        with glm4_moe_construction(plan):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fse_plan = plan
        log_plan(type(self).__name__, plan, self.fse_moe_blocks())
        record_target_plan(plan)

    def fse_moe_blocks(self) -> dict[int, Glm4MoE]:
        """Layer index -> MoE block, for the layers this rank holds."""
        return {
            layer.layer_idx: layer.mlp
            for layer in self.model.layers
            if isinstance(getattr(layer, "mlp", None), Glm4MoE)
        }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_with_fused_shared_experts(
            # MTP tensors belong to the draft model: drop them before splitting.
            skip_spec_layers(weights, self.config),
            super().load_weights,
            plan=self.fse_plan,
            hf_config=self.config,
            moe_blocks=self.fse_moe_blocks(),
        )
