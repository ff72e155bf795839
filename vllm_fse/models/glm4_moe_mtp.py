"""GLM-4.x MTP draft model (architecture ``Glm4MoeMTPModel``) with fused shared experts.

Upstream's MTP loader already widens its expert mapping when FSE is on; the splitter renames the
MTP layer's shared experts to its expert slots before that loader sees them.
"""

from __future__ import annotations

from vllm.compilation.decorators import support_torch_compile
from vllm.model_executor.models.glm4_moe_mtp import Glm4MoeMTP as UpstreamGlm4MoeMTP

from vllm_fse.models.fused_shared_experts import FusedSharedExpertsMixin
from vllm_fse.models.glm4_moe import GLM4_MOE


# Compiled like vLLM's DeepSeekMTP (the seed PR's second commit), so the draft gets the same
# Inductor fusions as the target model. The decorator sits on a base class, as upstream's sits on
# DeepSeekMTP: it replaces its class's __call__, and the mixin's __call__ has to come first.
@support_torch_compile
class CompiledGlm4MoeMTP(UpstreamGlm4MoeMTP):
    pass


class FseGlm4MoeMTP(FusedSharedExpertsMixin, CompiledGlm4MoeMTP):
    fse_family = GLM4_MOE
    fse_draft = True
