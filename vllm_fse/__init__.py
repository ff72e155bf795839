"""vllm-fse: fused shared experts (FSE) for MoE models with shared experts, as a vLLM plugin.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point ``fse`` in every
process it starts (API server, engine core, workers), sometimes more than once. Unless FSE is
asked for, it registers nothing: vLLM runs its own classes. It must stay cheap: nothing here
imports a model module; vLLM imports the model lazily from the ``"module:Class"`` strings below.
"""

from __future__ import annotations

from vllm_fse.version import __version__

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
# vLLM's registry entries the plugin replaced in this process (None: vLLM had none), to put back.
_vllm_entries: dict[str, object] = {}


def register() -> None:
    """Put the plugin's model classes in vLLM's registry if FSE is asked for, else leave (or put
    back) vLLM's own.

    Asked for: ``VLLM_FSE=1`` or ``auto``, or vLLM's ``VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS``
    on ROCm (:func:`vllm_fse.core.decision.fse_requested`). Otherwise the plugin registers nothing and
    vLLM runs its own classes, target and draft; it only declares the plugin variables that are
    set, so that vLLM does not call them unknown, and still refuses a bad value of one.

    vLLM calls this once per process. Re-entrant: a process that builds several engines under
    different settings (tests, benchmarks) calls it again after changing the environment. The
    outcome is logged once per process.
    """
    global _reported
    from vllm_fse.compat import declare_plugin_env_vars, logger, supported_vllm_version
    from vllm_fse.core.decision import fse_requested

    if not fse_requested():  # raises for a bad value of a plugin variable
        declare_plugin_env_vars(active=False)
        restore_vllm_classes()
        logger.debug("vllm-fse: FSE not requested; vLLM's own model classes stay in place")
        return
    supported, reason = supported_vllm_version()
    if not supported:
        restore_vllm_classes()
        if not _reported:
            logger.error("vllm-fse: inactive, upstream model classes stay in place: %s", reason)
            _reported = True
        return

    from vllm import ModelRegistry

    declare_plugin_env_vars()
    if not _vllm_entries:
        _forget_resolved_classes()
    for arch, target in MODEL_OVERRIDES.items():
        if arch not in _vllm_entries:
            _vllm_entries[arch] = ModelRegistry.models.get(arch)
        ModelRegistry.register_model(arch, target)
    if not _reported:
        logger.info(
            "vllm-fse: plugin %s registered %s",
            __version__,
            ", ".join(f"{arch} -> {target}" for arch, target in MODEL_OVERRIDES.items()),
        )
        _reported = True


def restore_vllm_classes() -> None:
    """Put back the registry entries :func:`register` replaced in this process (none: no-op)."""
    if not _vllm_entries:
        return
    from vllm import ModelRegistry

    for arch, entry in _vllm_entries.items():
        if entry is None:
            ModelRegistry.models.pop(arch, None)
        else:
            ModelRegistry.models[arch] = entry
    _vllm_entries.clear()
    _forget_resolved_classes()


def _forget_resolved_classes() -> None:
    """Drop the model classes vLLM already resolved in this process (it keeps one per model
    path: ``_MODEL_ARCH_BY_HASH``, patch entry 11), so that a registry change reaches the next
    engine built here. Nothing to drop before vLLM's model loader is imported."""
    import sys

    cache = getattr(sys.modules.get("vllm.model_executor.model_loader.utils"), "_MODEL_ARCH_BY_HASH", None)
    if isinstance(cache, dict):
        cache.clear()
