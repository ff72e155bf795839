"""The plugin is found by vLLM's own plugin loading and registers the right classes, cheaply."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import textwrap

import pytest

import vllm_fse
from vllm_fse.compat import is_supported_version

pytestmark = pytest.mark.unit

UPSTREAM = {
    "Glm4MoeForCausalLM": "vllm.model_executor.models.glm4_moe:Glm4MoeForCausalLM",
    "Glm4MoeMTPModel": "vllm.model_executor.models.glm4_moe_mtp:Glm4MoeMTP",
    "Glm4MoeLiteForCausalLM": "vllm.model_executor.models.glm4_moe_lite:Glm4MoeLiteForCausalLM",
    "Glm4MoeLiteMTPModel": "vllm.model_executor.models.glm4_moe_lite_mtp:Glm4MoeLiteMTP",
    "DeepseekV2ForCausalLM": "vllm.model_executor.models.deepseek_v2:DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM": "vllm.model_executor.models.deepseek_v2:DeepseekV3ForCausalLM",
    "DeepSeekMTPModel": "vllm.model_executor.models.deepseek_mtp:DeepSeekMTP",
    "Qwen2MoeForCausalLM": "vllm.model_executor.models.qwen2_moe:Qwen2MoeForCausalLM",
    "Qwen3NextForCausalLM": "vllm.model_executor.models.qwen3_next:Qwen3NextForCausalLM",
    "Qwen3NextMTP": "vllm.model_executor.models.qwen3_next_mtp:Qwen3NextMTP",
    "Qwen3_5MoeForCausalLM": "vllm.model_executor.models.qwen3_5:Qwen3_5MoeForCausalLM",
    "Qwen3_5MoeForConditionalGeneration": "vllm.model_executor.models.qwen3_5:Qwen3_5MoeForConditionalGeneration",
    "Qwen3_5MoeMTP": "vllm.model_executor.models.qwen3_5_mtp:Qwen3_5MoeMTP",
}


def _archs(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "log"}


# vLLM's entrypoints (LLM, serve, engine and worker processes) configure logging first.
CONFIGURE_VLLM_LOGGING = """
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging
configure_logging(LoggingConfig())
"""


def _python(code: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, "-c", CONFIGURE_VLLM_LOGGING + textwrap.dedent(code)],
        env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["log"] = proc.stdout + proc.stderr  # vLLM logs to stdout by default
    return result


RESOLVE_AFTER_VLLM_PLUGIN_LOADING = """
    import json
    from vllm.plugins import load_general_plugins
    load_general_plugins()
    from vllm import ModelRegistry
    out = {}
    import vllm_fse
    for arch in vllm_fse.MODEL_OVERRIDES:
        entry = ModelRegistry.models[arch]
        out[arch] = f"{entry.module_name}:{entry.class_name}"
    print(json.dumps(out))
"""


def test_entry_point_is_discovered_in_vllm_general_plugins():
    eps = {ep.name: ep.value for ep in md.entry_points(group="vllm.general_plugins")}
    assert eps.get("fse") == "vllm_fse:register"


def test_vllm_plugin_loading_resolves_every_architecture_to_vllm_fse():
    result = _python(RESOLVE_AFTER_VLLM_PLUGIN_LOADING)
    assert _archs(result) == vllm_fse.MODEL_OVERRIDES
    assert result["log"].count("vllm-fse: plugin") == 1


def test_vllm_plugins_allowlist_naming_fse_loads_it():
    result = _python(RESOLVE_AFTER_VLLM_PLUGIN_LOADING, env={"VLLM_PLUGINS": "fse"})
    assert result["Glm4MoeForCausalLM"] == vllm_fse.MODEL_OVERRIDES["Glm4MoeForCausalLM"]


@pytest.mark.parametrize("allowlist", ["", "lora_filesystem_resolver"])
def test_vllm_plugins_allowlist_without_fse_keeps_upstream(allowlist):
    result = _python(RESOLVE_AFTER_VLLM_PLUGIN_LOADING, env={"VLLM_PLUGINS": allowlist})
    assert _archs(result) == UPSTREAM
    assert "vllm-fse" not in result["log"]


def test_register_twice_is_harmless_logs_once_and_imports_no_model_module():
    result = _python(
        """
        import json, sys
        import vllm_fse
        vllm_fse.register()
        vllm_fse.register()
        from vllm import ModelRegistry
        entry = ModelRegistry.models["Glm4MoeForCausalLM"]
        print(json.dumps({
            "resolved": f"{entry.module_name}:{entry.class_name}",
            "model_modules": sorted(
                m for m in sys.modules
                if m.startswith("vllm_fse.models.") or m.startswith("vllm.model_executor.models.glm")
            ),
        }))
        """
    )
    assert result["resolved"] == vllm_fse.MODEL_OVERRIDES["Glm4MoeForCausalLM"]
    assert result["model_modules"] == []
    assert result["log"].count("vllm-fse: plugin") == 1


def test_unsupported_vllm_version_logs_one_error_and_keeps_upstream():
    result = _python(
        """
        import json
        import vllm.version
        vllm.version.__version__ = "0.31.2"
        import vllm_fse
        vllm_fse.register()
        vllm_fse.register()
        from vllm import ModelRegistry
        out = {}
        for arch in vllm_fse.MODEL_OVERRIDES:
            entry = ModelRegistry.models[arch]
            out[arch] = f"{entry.module_name}:{entry.class_name}"
        print(json.dumps(out))
        """
    )
    assert _archs(result) == UPSTREAM
    errors = [ln for ln in result["log"].splitlines() if "ERROR" in ln and "vllm-fse" in ln]
    assert len(errors) == 1
    assert "0.31.2" in errors[0] and ">=0.32.0,<0.34" in errors[0]


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("0.32.0", True),
        ("0.32.1", True),
        ("0.33.0rc1", True),
        ("0.33.2+cpu", True),
        ("0.33.1.dev45+g1234abc", True),
        ("0.31.9", False),
        ("0.34.0", False),
        ("0.34.0.dev3", False),
        ("1.0.0", False),
        ("dev", False),
    ],
)
def test_supported_version_range_is_0_32_to_0_33(version, supported):
    assert is_supported_version(version) is supported
