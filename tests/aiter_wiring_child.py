"""Builds the plugin's model of a checkpoint (any family) on CPU as if ROCm AITER
fused-shared-experts were active.

AITER itself cannot run here, so only what needs the AITER library or a ROCm GPU is faked:
the two ``rocm_aiter_ops`` switches, "on ROCm" for vllm-fse's decision, and AITER's top-k buffer
allocation (``init_aiter_topK_meta_data`` allocates on "cuda"; its arguments are recorded).
Everything else is vLLM's own code: FusedMoE construction with ``n_shared_experts``, expert
counts, and weight loading into the slots through vllm_fse.loading.

Usage: python tests/aiter_wiring_child.py MODEL_DIR RESULT.pt [drop-tensor-name]
"""

import os
import sys


def main(model_dir: str, result_path: str, drop: str | None) -> None:
    import torch

    # Import vLLM's ROCm-sensitive modules while the platform is still CPU.
    import vllm._aiter_ops as aiter_ops
    import vllm.model_executor.layers.fused_moe.expert_map_manager as expert_map_manager
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
    import vllm_fse.core.decision
    import importlib

    from vllm_fse import MODEL_OVERRIDES
    from vllm_fse.introspect import describe_model, shared_slot_weights

    os.environ["VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS"] = "1"
    vllm_config = EngineArgs(model=model_dir, dtype="float32", enforce_eager=True).create_engine_config()
    (arch,) = vllm_config.model_config.hf_config.architectures
    module, cls = MODEL_OVERRIDES[arch].split(":")
    model_cls = getattr(importlib.import_module(module), cls)

    recorded = []
    aiter_ops.rocm_aiter_ops.is_fused_moe_enabled = classmethod(lambda cls: True)
    aiter_ops.rocm_aiter_ops.is_fusion_moe_shared_experts_enabled = classmethod(lambda cls: True)
    expert_map_manager.init_aiter_topK_meta_data = lambda **kw: recorded.append(kw)
    vllm_fse.core.decision._on_rocm = lambda: True

    with set_current_vllm_config(vllm_config), torch.device("cpu"):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method="tcp://127.0.0.1:29517", backend="gloo"
        )
        initialize_model_parallel(1, 1)
        model = model_cls(vllm_config=vllm_config)
    result = {"describe": describe_model(model), "aiter_topk_buffers": recorded}
    runner = next(iter(model.fse_moe_blocks().values())).experts
    result["runner_routed_scaling_factor"] = runner.routed_scaling_factor
    result["router_routed_scaling_factor"] = getattr(runner.router, "routed_scaling_factor", None)
    result["num_fused_shared_experts"] = runner.routed_experts.expert_map_manager.num_fused_shared_experts
    files = [os.path.join(model_dir, "model.safetensors")]
    weights = safetensors_weights_iterator(files, False)
    if drop:
        weights = ((name, t) for name, t in weights if name != drop)
    try:
        with set_current_vllm_config(vllm_config):
            model.load_weights(weights)
        result["slots"] = shared_slot_weights(model)
    except Exception as e:
        result["load_error"] = f"{type(e).__name__}: {e}"
    torch.save(result, result_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
