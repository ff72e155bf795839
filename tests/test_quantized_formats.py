"""The format table (vllm_fse.loading.formats.FORMATS): real quantization configs are read as vLLM
reads them, every refusal happens at plan time with one warning naming the format and the reason,
and docs/quantization.md shows the table the code has."""

from __future__ import annotations

import copy
import logging
import pathlib
from types import SimpleNamespace

import pytest

from vllm_fse.core import decision
from vllm_fse.core.decision import FsePath, plan_fse
from vllm_fse.loading import (
    FORMATS,
    ROWS,
    UNQUANTIZED,
    UnsupportedSharedExpertFormat,
    format_table_markdown,
    fp8_block,
    per_channel,
    shared_expert_format,
)

pytestmark = pytest.mark.unit

DOCS = pathlib.Path(__file__).parent.parent / "docs" / "quantization.md"


def _ct(weights: dict, activations: dict | None = None, fmt: str = "int-quantized", ignore=("lm_head",), targets=("Linear",)):
    group = {"targets": list(targets), "weights": weights, "format": fmt}
    if activations is not None:
        group["input_activations"] = activations
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": group}, "ignore": list(ignore)}


INT8_CHANNEL = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}
INT8_TOKEN = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True}
# llm-compressor's recipe for Qwen MoE models: router and shared-expert gate stay unquantized.
QWEN_IGNORE = ("lm_head", "re:.*mlp.gate$", "re:.*mlp.shared_expert_gate$")
QWEN_W8A8 = _ct(INT8_CHANNEL, INT8_TOKEN, ignore=QWEN_IGNORE)
W8A16 = _ct(INT8_CHANNEL, None, fmt="pack-quantized")
W4A16 = _ct({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True}, None,
            fmt="pack-quantized")  # fmt: skip
# Kimi-K2-Thinking: INT4 routed experts, everything else (the shared experts too) unquantized.
KIMI_K2_THINKING = _ct(
    {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True}, None,
    fmt="pack-quantized",
    ignore=("lm_head", r"re:.*self_attn.*", r"re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"),
)  # fmt: skip
FP8_BLOCK = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


# -- issue 25, bug 1: the shared-expert gate is not the shared expert ---------------------------


@pytest.mark.parametrize("shared_expert_name", ["shared_expert", "shared_experts"])
def test_the_qwen_ignore_list_naming_the_shared_expert_gate_leaves_the_int8_shared_expert_fused(shared_expert_name):
    assert shared_expert_format(QWEN_W8A8, shared_expert_name, range(4)) == per_channel(False)


@pytest.mark.parametrize("key", ["modules_to_not_convert", "ignored_layers"])
def test_an_fp8_skip_list_naming_the_shared_expert_gate_leaves_the_shared_expert_fused(key):
    config = {**FP8_BLOCK, key: ["lm_head", "model.layers.1.mlp.gate", "model.layers.1.mlp.shared_expert_gate"]}
    assert shared_expert_format(config, "shared_expert", range(4)) == fp8_block((128, 128))


@pytest.mark.parametrize(
    "entry",
    ["model.layers.2.mlp.shared_expert.gate_proj", "model.layers.2.mlp.shared_expert", "shared_expert",
     "re:.*shared_expert\\..*"],
)  # fmt: skip
def test_an_fp8_skip_list_naming_the_shared_expert_itself_is_mixed_precision(entry):
    config = {**FP8_BLOCK, "ignored_layers": [entry]}
    with pytest.raises(UnsupportedSharedExpertFormat, match="keeps the shared experts unquantized") as e:
        shared_expert_format(config, "shared_expert", range(4))
    assert str(e.value).startswith(FORMATS["mixed"].name) and repr(entry) in str(e.value)


# -- issue 25, bug 2: W8A16 is refused by the format check, not at load -------------------------


def test_w8a16_pack_quantized_is_refused_by_the_format_check():
    with pytest.raises(UnsupportedSharedExpertFormat) as e:
        shared_expert_format(W8A16)
    assert str(e.value).startswith(FORMATS["w8a16"].name) and "'pack-quantized'" in str(e.value)


def test_int8_weights_without_activation_quantization_are_w8a16_whatever_the_format_says():
    with pytest.raises(UnsupportedSharedExpertFormat, match="W8A16"):
        shared_expert_format(_ct(INT8_CHANNEL, None, fmt="int-quantized"))


# -- the rest of the table --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "row"),
    [
        (W4A16, "w4a16"),
        (KIMI_K2_THINKING, "mixed"),
        ({"quant_method": "awq", "bits": 4}, "awq"),
        ({"quant_method": "gptq", "bits": 4, "desc_act": False}, "gptq"),
        ({"quant_method": "gptq", "bits": 4, "desc_act": True}, "gptq-desc-act"),
        ({"quant_method": "mxfp4"}, "other"),
        ({**FP8_BLOCK, "activation_scheme": "static"}, "static-activations"),
        ({"quant_method": "fp8", "activation_scheme": "static"}, "static-activations"),
        (_ct(INT8_CHANNEL, {**INT8_TOKEN, "strategy": "tensor", "dynamic": False}), "static-activations"),
        (_ct({**INT8_CHANNEL, "strategy": "tensor"}, INT8_TOKEN), "other"),
    ],
)
def test_each_refused_format_names_its_row(config, row):
    with pytest.raises(UnsupportedSharedExpertFormat) as e:
        shared_expert_format(config, "shared_experts", range(1, 3))
    assert str(e.value).startswith(FORMATS[row].name) and FORMATS[row].handling in str(e.value)


def test_kimi_k2_thinking_names_the_pattern_that_keeps_its_shared_experts_unquantized():
    with pytest.raises(UnsupportedSharedExpertFormat, match=r"keeps the shared experts unquantized \('re:\.\*shared_experts"):
        shared_expert_format(KIMI_K2_THINKING, "shared_experts", range(1, 3))


def test_a_config_group_for_the_routed_experts_only_is_mixed_precision():
    config = _ct(INT8_CHANNEL, INT8_TOKEN, targets=(r"re:.*mlp\.experts\..*",))
    with pytest.raises(UnsupportedSharedExpertFormat, match="targeted by no config group"):
        shared_expert_format(config, "shared_experts", range(1, 3))


def test_two_config_groups_with_one_scheme_for_routed_and_shared_are_fused():
    config = _ct(INT8_CHANNEL, INT8_TOKEN, targets=(r"re:.*mlp\.experts\..*",))
    config["config_groups"]["group_1"] = {**config["config_groups"]["group_0"], "targets": ["Linear"]}
    assert shared_expert_format(config, "shared_experts", range(1, 3)) == per_channel(False)


def test_one_layer_left_unquantized_is_mixed_precision_naming_the_layer():
    config = _ct(INT8_CHANNEL, INT8_TOKEN, ignore=("lm_head", r"re:model\.layers\.2\.mlp\..*"))
    with pytest.raises(UnsupportedSharedExpertFormat, match=r"layer 2 routed gate_proj: unquantized"):
        shared_expert_format(config, "shared_experts", range(1, 4))


def test_a_moe_left_wholly_unquantized_is_the_unquantized_format():
    config = {**FP8_BLOCK, "modules_to_not_convert": ["mlp.experts", "mlp.shared_experts"]}
    assert shared_expert_format(config, "shared_experts", range(1, 3)) is UNQUANTIZED


def test_the_qwen35_language_model_prefix_is_read_too():
    config = _ct(INT8_CHANNEL, INT8_TOKEN, ignore=("model.language_model.layers.0.mlp.shared_expert.up_proj",))
    with pytest.raises(UnsupportedSharedExpertFormat, match="mixed precision"):
        shared_expert_format(config, "shared_expert", range(1))


def test_the_table_has_every_format_the_issue_names_fused_or_refused():
    assert {"unquantized", "fp8-block", "fp8-per-tensor", "int8-w8a8", "w8a16", "w4a16", "awq", "gptq",
            "gptq-desc-act", "mixed", "other"} <= set(FORMATS)  # fmt: skip
    assert len(FORMATS) == len(ROWS)
    for row in ROWS:
        assert row.handling and row.verified and row.tests.startswith("tests/"), row.key


def test_the_docs_show_the_table_the_code_has():
    assert format_table_markdown() in DOCS.read_text(), (
        "docs/quantization.md is out of date: paste vllm_fse.loading.format_table_markdown()"
    )


# -- the plan: refusals before construction, one warning ----------------------------------------


def _vllm_config(quantization_config, moe_intermediate_size=128, n_shared=2, shared_expert_intermediate_size=None):
    if shared_expert_intermediate_size is None:
        hf = SimpleNamespace(n_routed_experts=8, n_shared_experts=n_shared, moe_intermediate_size=moe_intermediate_size,
                             num_hidden_layers=3, quantization_config=copy.deepcopy(quantization_config))  # fmt: skip
    else:
        hf = SimpleNamespace(num_experts=8, moe_intermediate_size=moe_intermediate_size, num_hidden_layers=3,
                             shared_expert_intermediate_size=shared_expert_intermediate_size,
                             quantization_config=copy.deepcopy(quantization_config))  # fmt: skip
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf, quantization="x"),
        parallel_config=SimpleNamespace(enable_eplb=False, enable_expert_parallel=False, tensor_parallel_size=1,
                                        data_parallel_size=1, expert_placement_strategy="linear"),  # fmt: skip
        lora_config=None,
        quant_config=object(),
    )


@pytest.fixture
def fse_on(monkeypatch, caplog):
    """VLLM_FSE=1 on a CPU-like platform; returns the plugin's warnings so far."""
    from vllm import logger as vllm_logger

    monkeypatch.setenv("VLLM_FSE", "1")
    monkeypatch.setattr(decision, "_on_rocm", lambda: False)
    for fn in ("_print_warning_once", "_print_info_once"):
        cache_clear = getattr(getattr(vllm_logger, fn, None), "cache_clear", None)
        if cache_clear:
            cache_clear()
    monkeypatch.setattr(logging.getLogger("vllm.fse"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="vllm.fse")
    return lambda: [m for r in caplog.records if r.levelno == logging.WARNING and (m := r.getMessage()).startswith("vllm-fse")]


@pytest.mark.parametrize(
    ("config", "kwargs", "row"),
    [
        (W8A16, {}, "w8a16"),
        (KIMI_K2_THINKING, {}, "mixed"),
        (FP8_BLOCK, {"moe_intermediate_size": 64}, "fp8-block-misaligned"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, {"moe_intermediate_size": 64,
                                                                    "shared_expert_intermediate_size": 96},
         "padded-quantized"),
    ],
)  # fmt: skip
def test_a_refused_format_falls_back_at_plan_time_with_one_warning_naming_format_and_reason(fse_on, config, kwargs, row):
    plan = plan_fse(_vllm_config(config, **kwargs), shared_expert_name="shared_experts")
    assert plan.path is FsePath.OFF
    (warning,) = fse_on()
    assert FORMATS[row].name in warning and FORMATS[row].handling in warning


def test_the_standard_qwen_int8_checkpoint_is_planned_fused_with_two_slots(fse_on):
    plan = plan_fse(_vllm_config(QWEN_W8A8, moe_intermediate_size=64, shared_expert_intermediate_size=128),
                    shared_expert_name="shared_expert", moe_layers=range(3))  # fmt: skip
    assert plan.path is FsePath.BACKEND_NEUTRAL and plan.format == per_channel(False) and plan.n_shared_experts == 2
    assert fse_on() == []


def test_fp8_blocks_that_fit_the_slots_are_planned_fused(fse_on):
    plan = plan_fse(_vllm_config(FP8_BLOCK, moe_intermediate_size=128))
    assert plan.path is FsePath.BACKEND_NEUTRAL and plan.format == fp8_block((128, 128))
