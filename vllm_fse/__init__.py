"""vllm-fse: fused shared experts (FSE) for MoE models with shared experts, as a vLLM plugin.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point ``fse`` in every
process it starts (API server, engine core, workers), sometimes more than once. It must stay
cheap: nothing here imports torch or a model module; vLLM imports the model lazily from the
``"module:Class"`` strings registered below.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Upstream architecture name -> the plugin's class, as a lazy "module:Class" string.
MODEL_OVERRIDES: dict[str, str] = {
    "Glm4MoeForCausalLM": "vllm_fse.models.glm4_moe:FseGlm4MoeForCausalLM",
    "Glm4MoeMTPModel": "vllm_fse.models.glm4_moe_mtp:FseGlm4MoeMTP",
    "Glm4MoeLiteForCausalLM": "vllm_fse.models.glm4_moe_lite:FseGlm4MoeLiteForCausalLM",
    "Glm4MoeLiteMTPModel": "vllm_fse.models.glm4_moe_lite:FseGlm4MoeLiteMTP",
    "DeepseekV2ForCausalLM": "vllm_fse.models.deepseek_v2:FseDeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM": "vllm_fse.models.deepseek_v2:FseDeepseekV3ForCausalLM",
    "DeepSeekMTPModel": "vllm_fse.models.deepseek_v2:FseDeepSeekMTP",
    "Qwen2MoeForCausalLM": "vllm_fse.models.qwen_moe:FseQwen2MoeForCausalLM",
    "Qwen3NextForCausalLM": "vllm_fse.models.qwen_moe:FseQwen3NextForCausalLM",
    "Qwen3NextMTP": "vllm_fse.models.qwen_moe:FseQwen3NextMTP",
    "Qwen3_5MoeForCausalLM": "vllm_fse.models.qwen3_5_moe:FseQwen3_5MoeForCausalLM",
    "Qwen3_5MoeForConditionalGeneration": "vllm_fse.models.qwen3_5_moe:FseQwen3_5MoeForConditionalGeneration",
    "Qwen3_5MoeMTP": "vllm_fse.models.qwen3_5_moe:FseQwen3_5MoeMTP",
}

_reported = False


def register() -> None:
    """Point vLLM's model registry at the plugin's model classes.

    Re-entrant: registering again overwrites the same entries with the same strings. The
    outcome is logged once per process.
    """
    global _reported
    from vllm_fse.compat import declare_plugin_env_vars, logger, supported_vllm_version

    supported, reason = supported_vllm_version()
    if not supported:
        if not _reported:
            logger.error("vllm-fse: inactive, upstream model classes stay in place: %s", reason)
            _reported = True
        return

    from vllm import ModelRegistry

    declare_plugin_env_vars()
    for arch, target in MODEL_OVERRIDES.items():
        ModelRegistry.register_model(arch, target)
    if not _reported:
        logger.info(
            "vllm-fse: plugin %s registered %s",
            __version__,
            ", ".join(f"{arch} -> {target}" for arch, target in MODEL_OVERRIDES.items()),
        )
        _reported = True
