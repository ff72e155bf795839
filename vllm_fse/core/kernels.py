"""vLLM's CPU kernels called directly, without the Python around them (the opaque op runs them
eagerly, where that Python costs more per call than the shared expert itself at decode sizes)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cpu_moe_kernel(routed: torch.nn.Module) -> Callable | None:
    """``f(x, topk_weights, topk_ids) -> out``: vLLM's CPU MoE kernel (``_C::cpu_fused_moe``) on
    the layer's prepacked weights, exactly as its ``CPUUnquantizedExperts.apply`` calls it; None
    where vLLM's modular kernel does more than that call (zentorch, quantized weights, expert
    parallelism, router weights on the input)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    experts = getattr(getattr(routed.quant_method, "moe_kernel", None), "fused_experts", None)
    if (
        not isinstance(experts, CPUUnquantizedExperts)
        or type(experts).apply is not CPUUnquantizedExperts.apply
        or experts._use_zentorch
        or routed.expert_map is not None
        or routed.apply_router_weight_on_input
    ):
        return None
    op = torch.ops._C.cpu_fused_moe
    w13, w2, b13, b2 = routed.w13_weight, routed.w2_weight, experts.w1_bias, experts.w2_bias
    activation, isa = routed.activation.value, experts.isa

    def call(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        op(out, x, w13, w2, b13, b2, topk_weights, topk_ids, False, activation, isa)
        return out

    return call


def cpu_dense_mlp(mlp: torch.nn.Module) -> Callable | None:
    """``f(x) -> out``: the split MLP's prepacked GEMMs (vLLM's ``cpu_linear``) and SiLU-and-mul,
    without the linear layers' Python; None unless both projections are unquantized, bias-free
    and dispatched by vLLM's CPU GEMM selection."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    for layer in (gate_up, down):
        if not (
            isinstance(layer.quant_method, UnquantizedLinearMethod)
            and callable(getattr(layer, "cpu_linear", None))
            and getattr(layer, "bias", None) is None
        ):
            return None
    gate_up_gemm, down_gemm = gate_up.cpu_linear, down.cpu_linear
    # Plain tensors on the same storage: vLLM's weight parameters define __torch_function__,
    # which outside a compiled graph sends every op on them, and on their outputs, through Python.
    gate_up_w, down_w = (w.as_subclass(torch.Tensor) for w in (gate_up.weight, down.weight))
    inter = down.input_size_per_partition

    def call(x: torch.Tensor) -> torch.Tensor:
        h = gate_up_gemm(x, gate_up_w, None)
        return down_gemm(torch.nn.functional.silu(h[:, :inter]).mul_(h[:, inter:]), down_w, None)

    return call
