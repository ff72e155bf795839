"""GLM-4.x MTP draft model (architecture ``Glm4MoeMTPModel``) with fused shared experts.

Upstream's MTP loader already widens its expert mapping when FSE is on; the splitter renames the
MTP layer's shared experts to its expert slots before that loader sees them.
"""

from __future__ import annotations

from vllm.compilation.decorators import support_torch_compile
from vllm.model_executor.models.glm4_moe import Glm4MoE
from vllm.model_executor.models.glm4_moe_mtp import Glm4MoeMTP as UpstreamGlm4MoeMTP

from vllm_fse.models.fused_shared_experts import (
    FusedSharedExpertsMixin,
    check_draft_agrees_with_target,
)


# Compiled like vLLM's DeepSeekMTP (the seed PR's second commit), so the draft gets the same
# Inductor fusions as the target model.
@support_torch_compile
class FseGlm4MoeMTP(FusedSharedExpertsMixin, UpstreamGlm4MoeMTP):
    def fse_moe_blocks(self) -> dict[int, Glm4MoE]:
        return {
            int(idx): layer.mtp_block.mlp
            for idx, layer in self.model.layers.items()
            if isinstance(layer.mtp_block.mlp, Glm4MoE)
        }

    def fse_after_init(self) -> None:
        check_draft_agrees_with_target(self.fse_plan)
