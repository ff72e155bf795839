"""The plugin is found by vLLM's own plugin loading and registers the right classes, cheaply, and
only when FSE is asked for: otherwise vLLM's own classes stay in place."""

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


def _python(code: str, env: dict[str, str] | None = None, base: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (environment ``base``, default this one's, plus
    ``env``; ``VLLM_FSE`` unset unless ``env`` sets it); it prints one JSON line last."""
    base = {k: v for k, v in (os.environ if base is None else base).items() if k != "VLLM_FSE"}
    proc = subprocess.run(
        [sys.executable, "-c", CONFIGURE_VLLM_LOGGING + textwrap.dedent(code)],
        env={**base, "VLLM_LOGGING_LEVEL": "INFO", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["log"] = proc.stdout + proc.stderr  # vLLM logs to stdout by default
    return result


# Prints what vLLM's registry resolves every architecture the plugin replaces to.
PRINT_RESOLVED = """
import json
from vllm import ModelRegistry
import vllm_fse
out = {arch: f"{ModelRegistry.models[arch].module_name}:{ModelRegistry.models[arch].class_name}"
       for arch in vllm_fse.MODEL_OVERRIDES}
print(json.dumps({**out, **globals().get("extra", {})}))
"""
RESOLVE_AFTER_VLLM_PLUGIN_LOADING = """
from vllm.plugins import load_general_plugins
load_general_plugins()
""" + PRINT_RESOLVED


def test_entry_point_is_discovered_in_vllm_general_plugins():
    eps = {ep.name: ep.value for ep in md.entry_points(group="vllm.general_plugins")}
    assert eps.get("fse") == "vllm_fse:register"


FSE_ON = {"VLLM_FSE": "1"}


def test_fse_asked_for_resolves_every_architecture_to_vllm_fse():
    result = _python(RESOLVE_AFTER_VLLM_PLUGIN_LOADING, env={"VLLM_FSE": "auto"})
    assert _archs(result) == vllm_fse.MODEL_OVERRIDES
    assert result["log"].count("vllm-fse: plugin") == 1


DECLARED_AFTER_VLLM_PLUGIN_LOADING = RESOLVE_AFTER_VLLM_PLUGIN_LOADING.replace("import json", """
from vllm import envs
from vllm.platforms import current_platform
current_platform.validate_environ(hard_fail=True)  # as --fail-on-environ-validation
extra = {"declared": sorted(v for v in envs.environment_variables if v.startswith("VLLM_FSE"))}
import json""")


@pytest.mark.parametrize("env", [{}, {"VLLM_FSE": "0", "VLLM_FSE_FUSED_MAX_TOKENS": "8"}], ids=["unset", "0"])
def test_fse_not_asked_for_keeps_vllms_classes_and_declares_only_the_set_variables(env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FSE")}
    result = _python(DECLARED_AFTER_VLLM_PLUGIN_LOADING, env=env, base=clean)
    declared = result.pop("declared")
    assert _archs(result) == UPSTREAM
    # Known to vLLM (no "unknown variable" error), and no source hash in its compile-cache key.
    assert declared == sorted(env)
    assert "vllm-fse: plugin" not in result["log"] and "ERROR" not in result["log"]


@pytest.mark.parametrize(
    ("env", "rocm", "asked"),
    [
        ({}, True, False),
        ({"VLLM_FSE": ""}, False, False),
        ({"VLLM_FSE": "0"}, False, False),
        ({"VLLM_FSE": "1"}, False, True),
        ({"VLLM_FSE": " AUTO "}, False, True),
        ({"VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS": "1"}, False, False),  # the toggle means nothing off ROCm
        ({"VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS": "1"}, True, True),
        ({"VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS": "True"}, True, True),  # parsed as vLLM parses it
        ({"VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS": "0"}, True, False),
        ({"VLLM_FSE": "0", "VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS": "1"}, True, False),  # 0 wins
    ],
)
def test_what_asks_for_fse(monkeypatch, env, rocm, asked):
    from vllm_fse.core import decision

    for name in ("VLLM_FSE", "VLLM_FSE_FUSED_MAX_TOKENS", "VLLM_FSE_SHARED_REPLICAS", decision.AITER_FSE_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(decision, "_on_rocm", lambda: rocm)
    assert decision.fse_requested() is asked


@pytest.mark.parametrize(("name", "value"), [("VLLM_FSE", "yes"), ("VLLM_FSE_FUSED_MAX_TOKENS", "many")])
def test_a_bad_plugin_variable_is_refused_even_with_fse_off(monkeypatch, name, value):
    from vllm_fse.core import decision

    monkeypatch.delenv("VLLM_FSE", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(decision.FseSettingError, match=rf"^{name}={value!r} is not accepted"):
        decision.fse_requested()


def test_a_bad_vllm_fse_stops_vllms_plugin_loading_with_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-c", "from vllm.plugins import load_general_plugins; load_general_plugins()"],
        env={**os.environ, "VLLM_FSE": "yes"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "FseSettingError: VLLM_FSE='yes' is not accepted: use 0 (unfused), 1 (always fused) or auto" in proc.stderr


def test_vllm_plugins_allowlist_naming_fse_loads_it():
    result = _python(RESOLVE_AFTER_VLLM_PLUGIN_LOADING, env={"VLLM_PLUGINS": "fse", **FSE_ON})
    assert result["Glm4MoeForCausalLM"] == vllm_fse.MODEL_OVERRIDES["Glm4MoeForCausalLM"]


@pytest.mark.parametrize("allowlist", ["", "lora_filesystem_resolver"])
def test_vllm_plugins_allowlist_without_fse_keeps_upstream(allowlist):
    result = _python(RESOLVE_AFTER_VLLM_PLUGIN_LOADING, env={"VLLM_PLUGINS": allowlist, **FSE_ON})
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
        """,
        env=FSE_ON,
    )
    assert result["resolved"] == vllm_fse.MODEL_OVERRIDES["Glm4MoeForCausalLM"]
    assert result["model_modules"] == []
    assert result["log"].count("vllm-fse: plugin") == 1


def _resolved() -> dict[str, str]:
    from vllm import ModelRegistry

    return {arch: f"{ModelRegistry.models[arch].module_name}:{ModelRegistry.models[arch].class_name}"
            for arch in vllm_fse.MODEL_OVERRIDES}  # fmt: skip


def test_registering_again_after_fse_is_turned_off_puts_vllms_classes_back(monkeypatch):
    monkeypatch.setenv("VLLM_FSE", "1")
    try:
        vllm_fse.register()
        assert _resolved() == vllm_fse.MODEL_OVERRIDES
        monkeypatch.setenv("VLLM_FSE", "0")
        vllm_fse.register()
        assert _resolved() == UPSTREAM
    finally:
        vllm_fse.restore_vllm_classes()


def test_unsupported_vllm_version_without_fse_asked_for_says_nothing(monkeypatch):
    import vllm.version

    from vllm_fse import compat

    monkeypatch.setattr(vllm.version, "__version__", "0.31.2")
    monkeypatch.setattr(vllm_fse, "_reported", False)
    monkeypatch.delenv("VLLM_FSE", raising=False)
    errors = []
    monkeypatch.setattr(compat.logger, "error", lambda *a: errors.append(a))
    vllm_fse.register()
    assert _resolved() == UPSTREAM and errors == [] and vllm_fse._reported is False
    monkeypatch.setenv("VLLM_FSE", "1")
    vllm_fse.register()
    assert _resolved() == UPSTREAM and len(errors) == 1


UNSUPPORTED_VERSION = """
import vllm.version
vllm.version.__version__ = "0.31.2"
import vllm_fse
vllm_fse.register()
vllm_fse.register()
""" + PRINT_RESOLVED


def test_unsupported_vllm_version_logs_one_error_and_keeps_upstream():
    result = _python(UNSUPPORTED_VERSION, env=FSE_ON)
    assert _archs(result) == UPSTREAM
    errors = [ln for ln in result["log"].splitlines() if "ERROR" in ln and "vllm-fse" in ln]
    assert len(errors) == 1
    assert "0.31.2" in errors[0] and ">=0.32.0,<0.35" in errors[0]


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("0.32.0", True),
        ("0.32.1", True),
        ("0.33.0rc1", True),
        ("0.33.2+cpu", True),
        ("0.33.1.dev45+g1234abc", True),
        ("0.31.9", False),
        ("0.34.0", True),
        ("0.34.1.dev3", True),
        ("0.35.0", False),
        ("0.35.0.dev3", False),
        ("1.0.0", False),
        ("dev", False),
    ],
)
def test_supported_version_range_is_0_32_to_0_34(version, supported):
    assert is_supported_version(version) is supported
