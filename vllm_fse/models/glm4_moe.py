"""GLM-4.5/4.6/4.7 MoE (architecture ``Glm4MoeForCausalLM``)."""

from __future__ import annotations

from vllm.model_executor.models.glm4_moe import (
    Glm4MoeForCausalLM as UpstreamGlm4MoeForCausalLM,
)

from vllm_fse.compat import logger


class FseGlm4MoeForCausalLM(UpstreamGlm4MoeForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        logger.info("vllm-fse: instantiated %s", type(self).__name__)
