"""The fused path's slot ids and weights: one pair of buffers per model whose shared columns are
filled once, so that a step only copies its routed top-k in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from vllm_fse.core.replicas import shared_slot_ids  # which replica a token row uses (and where it runs)


class SlottedLayer(Protocol):
    """What the buffers ask of a layer (the core's ``SharedSlotExperts``): its slot layout."""

    n_routed: int
    n_shared: int
    replicas: int
    slot_weight: float


@dataclass
class SlotBuffers:
    """Shared by every MoE layer of one model (its layers run one after another)."""

    max_num_batched_tokens: int
    _buffers: dict = field(default_factory=dict)

    def views(
        self, layer: SlottedLayer, tokens: int, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and weights ``[tokens, top_k + n_shared]`` whose shared columns were filled once.

        Views of one pair of ``[max_num_batched_tokens, ...]`` buffers per model: its MoE layers
        run one after another, and each kernel reads them before the next layer writes. With
        replicas, row ``t`` goes to replica ``t % replicas`` (slots ``n_routed + r * n_shared + j``).
        """
        top_k = topk_ids.shape[1]
        key = (top_k, layer.n_routed, layer.n_shared, layer.replicas, layer.slot_weight, topk_ids.dtype,
               topk_weights.dtype, topk_ids.device)  # fmt: skip
        buffers = self._buffers.get(key)
        if buffers is None or buffers[0].shape[0] < tokens:
            rows = max(tokens, self.max_num_batched_tokens)
            ids = topk_ids.new_empty(rows, top_k + layer.n_shared)
            ids[:, top_k:] = shared_slot_ids(rows, layer.n_routed, layer.n_shared, layer.replicas).to(ids)
            weights = topk_weights.new_empty(rows, top_k + layer.n_shared)
            weights[:, top_k:] = layer.slot_weight
            buffers = self._buffers[key] = (ids, weights)
        return buffers[0][:tokens], buffers[1][:tokens]
