"""GLM-4.x MTP draft model (architecture ``Glm4MoeMTPModel``)."""

from __future__ import annotations

from vllm.model_executor.models.glm4_moe_mtp import Glm4MoeMTP as UpstreamGlm4MoeMTP


class FseGlm4MoeMTP(UpstreamGlm4MoeMTP):
    pass
