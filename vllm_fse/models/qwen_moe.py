"""Qwen MoE models with a gated shared expert: Qwen1.5/Qwen2-MoE (``Qwen2MoeForCausalLM``),
Qwen3-Next (``Qwen3NextForCausalLM``, MTP draft ``Qwen3NextMTP``) and Qwen3.5-MoE
(``Qwen3_5MoeForCausalLM``, ``Qwen3_5MoeForConditionalGeneration``, MTP draft ``Qwen3_5MoeMTP``).

What differs from GLM/DeepSeek: one shared MLP ``mlp.shared_expert`` of width
``shared_expert_intermediate_size`` whose output is scaled per token by
``sigmoid(mlp.shared_expert_gate(x))``. The core turns it into ``ceil(width /
moe_intermediate_size)`` slots whose weight is that per-token value (see
:class:`~vllm_fse.core.decision.SharedExpertShape`). MoE layers follow ``mlp_only_layers`` and
``decoder_sparse_step``; MTP layers are ``mtp.layers.K``. Qwen2-MoE's block always builds its
shared MLP and hands it to ``FusedMoEFactory``; the Qwen3 blocks ask
``resolve_layer_fused_shared_expert`` (upstream's ROCm AITER path, which this plugin leaves to
upstream for Qwen3-Next/Qwen3.5 with one slot).
"""

from __future__ import annotations

import re

import torch
from vllm.model_executor.models.qwen2_moe import (
    Qwen2MoeForCausalLM as UpstreamQwen2MoeForCausalLM,
)
from vllm.model_executor.models.qwen3_next import (
    Qwen3NextForCausalLM as UpstreamQwen3NextForCausalLM,
)
from vllm.model_executor.models.qwen3_next_mtp import Qwen3NextMTP as UpstreamQwen3NextMTP

from vllm_fse.core.construction import MoeFamily
from vllm_fse.core.model import FusedSharedExpertsMixin

MTP_PREFIX = "mtp."
_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.")


def qwen_moe_layer_indices(hf_config) -> frozenset[int]:
    """Layers with a MoE block, as upstream's decoder layers decide (main and MTP layers are
    numbered apart: ``model.layers.N`` and ``mtp.layers.K``; both sets are in the result)."""
    if not getattr(hf_config, "num_experts", 0):
        return frozenset()
    mlp_only = set(getattr(hf_config, "mlp_only_layers", None) or ())
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    n_mtp = getattr(hf_config, "num_nextn_predict_layers", None) or getattr(hf_config, "mtp_num_hidden_layers", 0) or 0
    n = max(hf_config.num_hidden_layers, n_mtp)
    return frozenset(i for i in range(n) if i not in mlp_only and (i + 1) % step == 0)


def qwen_split_mlp(
    *, hidden_size: int, intermediate_size: int, quant_config, prefix: str, is_sequence_parallel: bool
) -> torch.nn.Module:
    """The shared-expert MLP as upstream builds it unfused, without its gate (the core applies
    the gate, to the slots or to this MLP's output). Sequence parallel as the block's FusedMoE
    (Qwen3-Next's follows vLLM's setting, Qwen2-MoE's never is)."""
    from vllm.model_executor.models.qwen2_moe import Qwen2MoeMLP

    return Qwen2MoeMLP(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        hidden_act="silu",
        quant_config=quant_config,
        reduce_results=False,
        is_sequence_parallel=is_sequence_parallel,
        prefix=prefix,
    )


QWEN2_MOE = MoeFamily(
    "Qwen2-MoE",
    "vllm.model_executor.models.qwen2_moe",
    "Qwen2MoeSparseMoeBlock",
    qwen_split_mlp,
    shared_expert_name="shared_expert",
    moe_layers=qwen_moe_layer_indices,
    draft_prefix=MTP_PREFIX,
    aiter_capable=False,
)
# Qwen3.5's decoder layers build Qwen3-Next's block.
QWEN3_NEXT = MoeFamily(
    "Qwen3-Next/Qwen3.5",
    "vllm.model_executor.models.qwen3_next",
    "Qwen3NextSparseMoeBlock",
    qwen_split_mlp,
    shared_expert_name="shared_expert",
    moe_layers=qwen_moe_layer_indices,
    draft_prefix=MTP_PREFIX,
)


class QwenDraftMixin:
    """A Qwen MTP draft receives the whole checkpoint: keep its ``mtp.`` tensors and the
    non-layer ones (embeddings, head) only, so that the main model's ``model.layers.N`` tensors
    never meet the draft's layer ``N``."""

    fse_draft = True

    def fse_checkpoint_weights(self, weights):
        return (
            (name, tensor)
            for name, tensor in weights
            if name.startswith(MTP_PREFIX) or not _DECODER_LAYER.search(name)
        )


class FseQwen2MoeForCausalLM(FusedSharedExpertsMixin, UpstreamQwen2MoeForCausalLM):
    fse_family = QWEN2_MOE


class FseQwen3NextForCausalLM(FusedSharedExpertsMixin, UpstreamQwen3NextForCausalLM):
    fse_family = QWEN3_NEXT


class FseQwen3NextMTP(QwenDraftMixin, FusedSharedExpertsMixin, UpstreamQwen3NextMTP):
    fse_family = QWEN3_NEXT
