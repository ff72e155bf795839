"""DeepSeek-V2/V3 (architectures ``DeepseekV2ForCausalLM``, ``DeepseekV3ForCausalLM``: DeepSeek-V2,
V2-Lite, V3, R1, Kimi-K2, Moonlight) and the DeepSeek MTP draft (``DeepSeekMTPModel``) with fused
shared experts.

V2 routes with softmax scores (``topk_method`` greedy or group_limited_greedy, no correction
bias), V3 with sigmoid scores, ``noaux_tc`` and a bias; both go through vLLM's own router for the
routed experts, so the core needs nothing per scoring mode.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.deepseek_mtp import DeepSeekMTP as UpstreamDeepSeekMTP
from vllm.model_executor.models.deepseek_v2 import (
    DeepseekV2ForCausalLM as UpstreamDeepseekV2ForCausalLM,
)
from vllm.model_executor.models.deepseek_v2 import (
    DeepseekV3ForCausalLM as UpstreamDeepseekV3ForCausalLM,
)

from vllm_fse.core.construction import MoeFamily
from vllm_fse.core.model import FusedSharedExpertsMixin


def deepseek_v2_split_mlp(
    *, hidden_size: int, intermediate_size: int, quant_config, prefix: str, is_sequence_parallel: bool
) -> torch.nn.Module:
    """The shared-expert MLP as ``DeepseekV2MoE`` builds it unfused (sequence parallel as its FusedMoE)."""
    from vllm.model_executor.models.deepseek_v2 import DeepseekV2MLP

    return DeepseekV2MLP(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        hidden_act="silu",
        quant_config=quant_config,
        is_sequence_parallel=is_sequence_parallel,
        reduce_results=False,
        prefix=prefix,
    )


DEEPSEEK_V2 = MoeFamily("DeepSeek-V2/V3", "vllm.model_executor.models.deepseek_v2", "DeepseekV2MoE", deepseek_v2_split_mlp)


class FseDeepseekV2ForCausalLM(FusedSharedExpertsMixin, UpstreamDeepseekV2ForCausalLM):
    fse_family = DEEPSEEK_V2


class FseDeepseekV3ForCausalLM(FusedSharedExpertsMixin, UpstreamDeepseekV3ForCausalLM):
    fse_family = DEEPSEEK_V2


class FseDeepSeekMTP(FusedSharedExpertsMixin, UpstreamDeepSeekMTP):
    fse_family = DEEPSEEK_V2
    fse_draft = True
