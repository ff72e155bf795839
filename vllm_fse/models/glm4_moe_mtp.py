"""GLM-4.x MTP draft model (architecture ``Glm4MoeMTPModel``) with fused shared experts."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.compilation.decorators import support_torch_compile
from vllm.model_executor.models.glm4_moe import Glm4MoE
from vllm.model_executor.models.glm4_moe_mtp import Glm4MoeMTP as UpstreamGlm4MoeMTP

from vllm_fse.decision import plan_fse
from vllm_fse.models.fused_shared_experts import (
    check_draft_agrees_with_target,
    glm4_moe_construction,
    load_with_fused_shared_experts,
    log_plan,
)


# Compiled like vLLM's DeepSeekMTP (the seed PR's second commit), so the draft gets the same
# Inductor fusions as the target model.
@support_torch_compile
class FseGlm4MoeMTP(UpstreamGlm4MoeMTP):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        plan = plan_fse(vllm_config)
        with glm4_moe_construction(plan):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fse_plan = plan
        log_plan(type(self).__name__, plan, self.fse_moe_blocks())
        check_draft_agrees_with_target(plan)

    def fse_moe_blocks(self) -> dict[int, Glm4MoE]:
        """MTP layer index -> its MoE block."""
        return {
            int(idx): layer.mtp_block.mlp
            for idx, layer in self.model.layers.items()
            if isinstance(layer.mtp_block.mlp, Glm4MoE)
        }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The splitter renames the MTP layer's shared experts to its expert slots before
        # upstream's loader sees them; upstream's expert mapping is widened for FSE already.
        return load_with_fused_shared_experts(
            weights,
            super().load_weights,
            plan=self.fse_plan,
            hf_config=self.config,
            moe_blocks=self.fse_moe_blocks(),
        )
