"""GLM-4.x MTP draft model (architecture ``Glm4MoeMTPModel``) with fused shared experts.

Upstream's MTP loader already widens its expert mapping when FSE is on; the splitter renames the
MTP layer's shared experts to its expert slots before that loader sees them.
"""

from __future__ import annotations

from vllm.compilation.decorators import support_torch_compile
from vllm.model_executor.models.glm4_moe_mtp import Glm4MoeMTP as UpstreamGlm4MoeMTP

from vllm_fse.core.model import FusedSharedExpertsMixin
from vllm_fse.models.glm4_moe import GLM4_MOE


def compile_mtp_draft(vllm_config) -> bool:
    """Whether the draft is compiled: not when it picks its MTP module per speculative step.
    The drafter is compiled once with guards dropped, so a compiled multi-module drafter would
    run the first-traced module at every step. vLLM 0.34's own rule for its MTP drafters
    (``qwen3_next_mtp.should_torch_compile_mtp_drafter``) where it has one; the same rule on
    0.32/0.33, whose ``SpeculativeConfig.use_multi_module_mtp`` it reads."""
    try:
        from vllm.model_executor.models.qwen3_next_mtp import should_torch_compile_mtp_drafter
    except ImportError:  # vLLM 0.32/0.33
        spec = vllm_config.speculative_config
        return spec is None or not spec.use_multi_module_mtp()
    return should_torch_compile_mtp_drafter(vllm_config)


# Compiled like vLLM's DeepSeekMTP (the seed PR's second commit), so the draft gets the same
# Inductor fusions as the target model, except where vLLM compiles no multi-module drafter. The
# decorator sits on a base class, as upstream's sits on DeepSeekMTP: it replaces its class's
# __call__, and the mixin's __call__ has to come first.
@support_torch_compile(enable_if=compile_mtp_draft)
class CompiledGlm4MoeMTP(UpstreamGlm4MoeMTP):
    pass


class FseGlm4MoeMTP(FusedSharedExpertsMixin, CompiledGlm4MoeMTP):
    fse_family = GLM4_MOE
    fse_draft = True
