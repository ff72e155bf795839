"""vllm_fse.core.decision: toggles, precedence, paths and every fallback reason.

The platform and AITER state are what cannot exist on this machine, so they are patched; the
configuration objects are plain namespaces with the fields plan_fse reads.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from vllm_fse.core import decision
from vllm_fse.core.decision import FsePath, plan_fse
from vllm_fse.loading import FormatKind

pytestmark = pytest.mark.unit


def _config(n_shared=1, quantization_config=None, eplb=False, lora=False, quant_config=None, quantization=None,
            ep_size=1, placement="linear"):  # fmt: skip
    hf = SimpleNamespace(n_routed_experts=160, n_shared_experts=n_shared, moe_intermediate_size=1536, num_hidden_layers=4)
    if quantization_config is not None:
        hf.quantization_config = quantization_config
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf, quantization=quantization),
        parallel_config=SimpleNamespace(
            enable_eplb=eplb, enable_expert_parallel=ep_size > 1, tensor_parallel_size=ep_size,
            data_parallel_size=1, expert_placement_strategy=placement,
        ),  # fmt: skip
        lora_config=object() if lora else None,
        quant_config=quant_config,
    )


@pytest.fixture
def platform(monkeypatch):
    """Set the platform: ``platform(rocm=..., aiter_moe=..., aiter_fse=...)``."""
    monkeypatch.delenv("VLLM_FSE", raising=False)
    monkeypatch.delenv("VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS", raising=False)

    def set_platform(rocm=False, aiter_moe=False, aiter_fse=False):
        monkeypatch.setattr(decision, "_on_rocm", lambda: rocm)
        monkeypatch.setattr(decision, "_aiter_moe_active", lambda: aiter_moe)
        monkeypatch.setattr(decision, "_aiter_fse_active", lambda: aiter_fse)
        if aiter_fse:
            monkeypatch.setenv("VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS", "1")

    set_platform()
    return set_platform


@pytest.fixture
def warnings(caplog):
    """Messages of the warnings vllm-fse logs (warning_once is per message: clear its cache)."""
    from vllm import logger as vllm_logger

    for fn in ("_print_warning_once", "_print_info_once"):
        cache_clear = getattr(getattr(vllm_logger, fn, None), "cache_clear", None)
        if cache_clear:
            cache_clear()
    logging.getLogger("vllm.fse").propagate = True
    caplog.set_level(logging.WARNING, logger="vllm.fse")
    yield lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    logging.getLogger("vllm.fse").propagate = False


def test_off_by_default(platform, warnings):
    plan = plan_fse(_config())
    assert plan.path is FsePath.OFF and "not requested" in plan.reason
    assert warnings() == []


def test_vllm_fse_1_turns_on_the_backend_neutral_path_with_slots_after_the_routed_experts(platform, monkeypatch):
    monkeypatch.setenv("VLLM_FSE", "1")
    plan = plan_fse(_config(n_shared=2))
    assert plan.path is FsePath.BACKEND_NEUTRAL
    assert list(plan.slots) == [160, 161]
    assert plan.format.kind is FormatKind.UNQUANTIZED


def test_vllm_fse_0_wins_over_the_upstream_rocm_toggle(platform, monkeypatch):
    platform(rocm=True, aiter_moe=True, aiter_fse=True)
    monkeypatch.setenv("VLLM_FSE", "0")
    assert plan_fse(_config()).path is FsePath.OFF


def test_upstream_toggle_with_aiter_moe_takes_the_aiter_path(platform):
    platform(rocm=True, aiter_moe=True, aiter_fse=True)
    plan = plan_fse(_config())
    assert plan.path is FsePath.AITER and "VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS=1" in plan.reason


def test_rocm_without_aiter_moe_takes_the_backend_neutral_path(platform, monkeypatch):
    platform(rocm=True)
    monkeypatch.setenv("VLLM_FSE", "1")
    assert plan_fse(_config()).path is FsePath.BACKEND_NEUTRAL


def test_vllm_fse_1_under_aiter_moe_without_the_aiter_toggle_falls_back_naming_it(platform, monkeypatch, warnings):
    platform(rocm=True, aiter_moe=True)
    monkeypatch.setenv("VLLM_FSE", "1")
    plan = plan_fse(_config())
    assert plan.path is FsePath.OFF
    (warning,) = warnings()
    assert "set VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS=1" in warning


def test_upstream_toggle_without_aiter_moe_falls_back_with_a_warning(platform, monkeypatch, warnings):
    platform(rocm=True)
    monkeypatch.setenv("VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS", "1")
    assert plan_fse(_config()).path is FsePath.OFF
    (warning,) = warnings()
    assert "needs AITER MoE" in warning


def test_upstream_toggle_means_nothing_off_rocm(platform, monkeypatch, warnings):
    monkeypatch.setenv("VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS", "1")
    assert plan_fse(_config()).path is FsePath.OFF
    assert warnings() == []


@pytest.mark.parametrize("n_shared", [0, None])
def test_model_without_shared_experts_stays_off(platform, monkeypatch, n_shared):
    monkeypatch.setenv("VLLM_FSE", "1")
    plan = plan_fse(_config(n_shared=n_shared))
    assert plan.path is FsePath.OFF and "no shared experts" in plan.reason


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (_config(eplb=True), "EPLB is enabled"),
        (_config(lora=True), "LoRA is enabled"),
        (_config(quant_config=object(), quantization="fp8"), "online quantization (fp8)"),
        (_config(quantization_config={"quant_method": "awq"}, quant_config=object()), "quantization method 'awq'"),
        (
            _config(
                quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128], "ignored_layers": ["model.layers.3.mlp.shared_experts"]},
                quant_config=object(),
            ),
            "keeps the shared experts unquantized",
        ),
    ],
)
def test_each_refusal_falls_back_with_one_warning_naming_it(platform, monkeypatch, warnings, config, reason):
    monkeypatch.setenv("VLLM_FSE", "1")
    plan = plan_fse(config)
    assert plan.path is FsePath.OFF and reason in plan.reason
    (warning,) = warnings()
    assert reason in warning and "running the shared experts unfused" in warning


def test_fp8_block_checkpoint_is_fused_with_its_block_size(platform, monkeypatch):
    monkeypatch.setenv("VLLM_FSE", "1")
    plan = plan_fse(
        _config(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}, quant_config=object())
    )
    assert plan.path is FsePath.BACKEND_NEUTRAL
    assert plan.format.kind is FormatKind.FP8_BLOCK and plan.format.block_size == (128, 128)


@pytest.mark.parametrize("value", ["yes", "2", "-1", "on", "fused"])
def test_a_malformed_toggle_is_an_error_naming_the_variable_value_and_accepted_values(platform, monkeypatch, value):
    monkeypatch.setenv("VLLM_FSE", value)
    with pytest.raises(decision.FseSettingError) as error:
        plan_fse(_config())
    message = str(error.value)
    assert message.startswith(f"VLLM_FSE={value!r} is not accepted") and "0" in message and "auto" in message


@pytest.mark.parametrize("value", ["-2", "1e9x", "1.5", "four", "0x10"])
def test_a_malformed_fused_max_tokens_is_an_error_naming_the_variable_and_accepted_values(
    platform, monkeypatch, value
):
    monkeypatch.setenv("VLLM_FSE", "auto")
    monkeypatch.setenv("VLLM_FSE_FUSED_MAX_TOKENS", value)
    with pytest.raises(decision.FseSettingError, match=rf"^VLLM_FSE_FUSED_MAX_TOKENS={value!r} is not accepted: use a whole number of tokens >= 0"):
        plan_fse(_config())


def test_auto_is_the_backend_neutral_path_with_a_per_step_switch(platform, monkeypatch):
    monkeypatch.setenv("VLLM_FSE", "auto")
    plan = plan_fse(_config())
    assert plan.path is FsePath.BACKEND_NEUTRAL and plan.switch is decision.FseSwitch.AUTO
    assert plan.fused_max_tokens is None and plan.reason == "requested by VLLM_FSE=auto"
    monkeypatch.setenv("VLLM_FSE_FUSED_MAX_TOKENS", "0")
    assert plan_fse(_config()).fused_max_tokens == 0


def test_vllm_fse_1_stays_always_fused_whatever_the_switch_override(platform, monkeypatch):
    monkeypatch.setenv("VLLM_FSE", "1")
    monkeypatch.setenv("VLLM_FSE_FUSED_MAX_TOKENS", "8")
    plan = plan_fse(_config())
    assert plan.switch is decision.FseSwitch.ALWAYS_FUSED and plan.fused_max_tokens is None


def test_auto_on_the_aiter_path_runs_always_fused_and_says_so(platform, monkeypatch, warnings):
    platform(rocm=True, aiter_moe=True, aiter_fse=True)
    monkeypatch.setenv("VLLM_FSE", "auto")
    plan = plan_fse(_config())
    assert plan.path is FsePath.AITER and plan.switch is decision.FseSwitch.ALWAYS_FUSED
    assert any("auto runs always fused on the ROCm AITER path" in w for w in warnings())


@pytest.mark.parametrize("ep_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n_shared", [1, 2])
def test_expert_parallel_places_each_shared_slot_on_exactly_one_rank(ep_size, n_shared):
    """The backend-neutral layer has n_routed + n_shared experts; vLLM's placement must give
    every shared slot one owner, so each token's shared expert is computed exactly once."""
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    n_routed = 160
    slots = range(n_routed, n_routed + n_shared)
    owners = {slot: 0 for slot in slots}
    for rank in range(ep_size):
        _, expert_map, _ = determine_expert_map(ep_size, rank, n_routed + n_shared)
        for slot in slots:
            owners[slot] += 1 if expert_map is None else int(expert_map[slot] >= 0)
    assert set(owners.values()) == {1}


@pytest.mark.parametrize("value", ["0", "-2", "1e9x", "two", "1.5"])
def test_a_malformed_replica_count_is_an_error_naming_the_variable_and_accepted_values(platform, monkeypatch, value):
    monkeypatch.setenv("VLLM_FSE", "1")
    monkeypatch.setenv("VLLM_FSE_SHARED_REPLICAS", value)
    with pytest.raises(decision.FseSettingError, match=rf"^VLLM_FSE_SHARED_REPLICAS={value!r} is not accepted: use a whole number >= 1"):
        plan_fse(_config())


def test_replicas_widen_the_slot_range_and_default_to_one_copy(platform, monkeypatch):
    monkeypatch.setenv("VLLM_FSE", "1")
    assert plan_fse(_config(n_shared=2)).slots == range(160, 162)
    monkeypatch.setenv("VLLM_FSE_SHARED_REPLICAS", "3")
    plan = plan_fse(_config(n_shared=2))
    assert plan.shared_replicas == 3 and plan.slots == range(160, 166)


# Replica defaults and placement under expert parallelism: tests/test_replicas.py.


def test_replicas_are_ignored_on_the_aiter_path_with_a_warning(platform, monkeypatch, warnings):
    platform(rocm=True, aiter_moe=True, aiter_fse=True)
    monkeypatch.setenv("VLLM_FSE_SHARED_REPLICAS", "4")
    assert plan_fse(_config()).shared_replicas == 1
    assert any("VLLM_FSE_SHARED_REPLICAS=4 is ignored on the ROCm AITER path" in w for w in warnings())


@pytest.mark.parametrize(("n_routed", "n_shared", "ep_size"), [(256, 1, 8), (64, 2, 4), (160, 1, 4), (8, 2, 2)])
def test_round_robin_placement_gives_every_ep_rank_an_equal_share_of_the_shared_work(n_routed, n_shared, ep_size):
    """With one replica per rank, tokens round-robin over the replicas and vLLM's round-robin
    placement puts the replicas' slots on different ranks: every rank computes the same number of
    shared-expert token rows (without replicas, one rank computes them all)."""
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    from vllm_fse.core.replicas import shared_slot_ids

    def shared_rows_per_rank(replicas: int) -> list[int]:
        maps = [determine_expert_map(ep_size, r, n_routed + n_shared * replicas, "round_robin")[1] for r in range(ep_size)]
        ids = shared_slot_ids(4 * ep_size, n_routed, n_shared, replicas)  # 4 steps' worth of tokens
        owners = [[rank for rank in range(ep_size) if maps[rank][slot] >= 0] for slot in ids.flatten().tolist()]
        assert all(len(o) == 1 for o in owners)  # each slot computed exactly once
        return [sum(o == [rank] for o in owners) for rank in range(ep_size)]

    spread = shared_rows_per_rank(ep_size)
    assert len(set(spread)) == 1 and sum(spread) == 4 * ep_size * n_shared
    assert sum(1 for rows in shared_rows_per_rank(1) if rows) <= n_shared  # unreplicated: n_shared ranks at most


def test_an_explicitly_monolithic_moe_backend_falls_back_with_the_hint(platform, monkeypatch, warnings):
    monkeypatch.setenv("VLLM_FSE", "1")
    config = _config()
    config.kernel_config = SimpleNamespace(moe_backend="flashinfer_trtllm")
    plan = plan_fse(config)
    assert plan.path is FsePath.OFF
    assert "--moe-backend flashinfer_trtllm routes inside its kernel" in plan.reason and "triton" in plan.reason
    config.kernel_config.moe_backend = "triton"
    assert plan_fse(config).path is FsePath.BACKEND_NEUTRAL


def test_mone_expert_substitution_falls_back(platform, monkeypatch):
    """vLLM 0.33's MoNE substitution compacts expert rows and rewrites routes in place (it cannot
    run here: 0.32 has no such module, so the module is faked with 0.33's function name)."""
    import sys
    import types

    monkeypatch.setenv("VLLM_FSE", "1")
    assert plan_fse(_config()).path is FsePath.BACKEND_NEUTRAL  # 0.32: the module does not exist
    fake = types.ModuleType("vllm.model_executor.layers.fused_moe.expert_substitution")
    fake.get_expert_substitution_spec = lambda model_config: getattr(model_config.hf_config, "approximate_experts", None)
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    assert plan_fse(_config()).path is FsePath.BACKEND_NEUTRAL  # no substitution declared
    config = _config()
    config.model_config.hf_config.approximate_experts = {"3": [7, 9]}
    plan = plan_fse(config)
    assert plan.path is FsePath.OFF and "MoNE expert substitution" in plan.reason


# -- Qwen: the gated shared expert's width decides the slots ----------------------------------------


def _qwen_config(width: int, inter: int = 512, **kw):
    config = _config(**kw)
    config.model_config.hf_config = SimpleNamespace(num_experts=64, moe_intermediate_size=inter,
                                                    shared_expert_intermediate_size=width)  # fmt: skip
    return config


@pytest.mark.parametrize(("width", "slots", "padding"), [(512, 1, 0), (2048, 4, 0), (640, 2, 384), (0, 0, 512 * 0)])
def test_a_qwen_shared_expert_is_ceil_width_over_moe_width_gated_slots(platform, monkeypatch, width, slots, padding):
    platform()
    monkeypatch.setenv("VLLM_FSE", "1")
    plan = plan_fse(_qwen_config(width))
    if not slots:
        assert plan.path is FsePath.OFF and plan.reason == "the model has no shared experts"
        return
    assert plan.path is FsePath.BACKEND_NEUTRAL and plan.slots == range(64, 64 + slots)
    assert plan.shape.gated and plan.shape.padding == padding and plan.shape.shared_width == width


def test_the_text_config_of_a_multimodal_qwen_is_the_one_read(platform, monkeypatch):
    platform()
    monkeypatch.setenv("VLLM_FSE", "1")
    config = _qwen_config(1024)
    config.model_config.hf_text_config = config.model_config.hf_config
    config.model_config.hf_config = SimpleNamespace()  # the vision-language wrapper's config
    assert plan_fse(config).slots == range(64, 66)


def test_a_padded_quantized_qwen_shared_expert_falls_back_naming_the_widths(platform, monkeypatch):
    platform()
    monkeypatch.setenv("VLLM_FSE", "1")
    config = _qwen_config(640)
    config.model_config.hf_config.quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    plan = plan_fse(config)
    assert plan.path is FsePath.OFF and "width 640 is not a multiple of moe_intermediate_size 512" in plan.reason


@pytest.mark.parametrize(("width", "capable", "path"), [(512, True, "AITER"), (1024, True, "OFF"), (512, False, "OFF")])
def test_aiter_takes_a_qwen_model_only_where_upstream_fuses_it(platform, monkeypatch, width, capable, path):
    """Upstream's AITER path fuses Qwen3-Next/Qwen3.5 with one slot; wider experts and Qwen2-MoE fall back."""
    platform(rocm=True, aiter_moe=True, aiter_fse=True)
    plan = plan_fse(_qwen_config(width), aiter_capable=capable)
    assert plan.path.name == path
    if path == "OFF":
        assert "AITER fused-shared-expert path does not cover this model" in plan.reason


# -- vLLM 0.34 (issue 27): what the plan refuses, and the AITER path's per-layer rule ------------------

FP8_BLOCK = {"quant_method": "fp8", "weight_block_size": [128, 128]}


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ({"quant_config": SimpleNamespace(online_quantization_config=object())}, "online_quantization_config"),
        ({"VLLM_FP8_MOE_REQUANT": "mxfp4"}, "VLLM_FP8_MOE_REQUANT=mxfp4 requantizes the routed experts"),
        ({"VLLM_RELOAD_MODE": "direct"}, "VLLM_RELOAD_MODE=direct (in-place weight reload) is not supported"),
    ],
    ids=["online-quantization", "fp8-moe-requant", "direct-reload"],
)
def test_vllm_0_34_settings_the_slots_do_not_follow_fall_back_at_plan_time(platform, monkeypatch, warnings, setting, reason):
    monkeypatch.setenv("VLLM_FSE", "1")
    quant_config = setting.pop("quant_config", object())
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    plan = plan_fse(_config(quantization_config=FP8_BLOCK, quant_config=quant_config))
    assert plan.path is FsePath.OFF and reason in plan.reason
    (warning,) = warnings()
    assert reason in warning


@pytest.mark.parametrize("setting", [{"VLLM_FP8_MOE_REQUANT": "none"}, {"VLLM_RELOAD_MODE": "layerwise"}])
def test_vllm_0_34_defaults_keep_fse_on(platform, monkeypatch, setting):
    monkeypatch.setenv("VLLM_FSE", "1")
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    assert plan_fse(_config(quantization_config=FP8_BLOCK, quant_config=object())).path is FsePath.BACKEND_NEUTRAL


@pytest.fixture
def aiter_refuses(monkeypatch, platform):
    """The AITER path, with upstream's quantization rule refusing the given MoE layers."""
    from vllm.model_executor.layers.quantization.utils import config_utils

    platform(rocm=True, aiter_moe=True, aiter_fse=True)

    def refuse(layers):
        def rule(quant_config, experts_prefix, shared_prefix, **kwargs):
            layer = int(experts_prefix.split(".")[2])
            return (False, f"{shared_prefix} is unquantized") if layer in layers else (True, None)

        monkeypatch.setattr(config_utils, "is_shared_expert_quant_fse_compatible", rule)

    return refuse


def test_aiter_fuses_every_moe_layer_its_per_layer_rule_allows(aiter_refuses):
    aiter_refuses(set())
    assert plan_fse(_config(quantization_config=FP8_BLOCK, quant_config=object())).path is FsePath.AITER


def test_aiter_refusing_every_layer_falls_back(aiter_refuses, warnings):
    aiter_refuses({0, 1, 2, 3})
    plan = plan_fse(_config(quantization_config=FP8_BLOCK, quant_config=object()))
    assert plan.path is FsePath.OFF and not plan.upstream_decides
    assert "AITER cannot fuse this checkpoint's shared experts: model.layers." in plan.reason


def test_aiter_refusing_a_later_layer_is_not_missed_by_a_layer_0_check(aiter_refuses, warnings):
    """vLLM 0.32/0.33 refuse mixed layers: the plugin then fuses none (it used to ask layer 0 only)."""
    aiter_refuses({2})
    plan = plan_fse(_config(quantization_config=FP8_BLOCK, quant_config=object()))
    assert plan.path is FsePath.OFF and not plan.upstream_decides
    assert "MoE layers [0, 1, 3] but not of [2]" in plan.reason and "all MoE layers or none" in plan.reason


def test_aiter_mixed_layers_are_left_to_vllms_per_layer_fusion_on_0_34(aiter_refuses, monkeypatch, warnings):
    aiter_refuses({2})
    monkeypatch.setattr(decision, "_vllm_fuses_per_layer", lambda: True)  # 0.34's get_fused_shared_expert_layers
    plan = plan_fse(_config(quantization_config=FP8_BLOCK, quant_config=object()))
    assert plan.path is FsePath.OFF and plan.upstream_decides
    assert "left to vLLM's per-layer AITER fusion" in plan.reason


def test_a_plan_left_to_vllm_swaps_nothing_during_construction(monkeypatch):
    import sys
    import types

    from vllm_fse.core.construction import MoeFamily, moe_construction

    upstream = types.ModuleType("fake_family")
    upstream.resolve_layer_fused_shared_expert = resolve = lambda quant_config, prefix: "upstream's answer"
    upstream.FusedMoEFactory = factory = object()
    monkeypatch.setitem(sys.modules, upstream.__name__, upstream)
    family = MoeFamily("fake", upstream.__name__, "Block", lambda **kw: None)
    for left_to_vllm, answer in ((True, "upstream's answer"), (False, False)):
        plan = decision.FsePlan(FsePath.OFF, "test", upstream_decides=left_to_vllm)
        with moe_construction(family, plan, None):
            assert upstream.resolve_layer_fused_shared_expert(None, "model.layers.2.mlp") == answer
            assert upstream.FusedMoEFactory is factory
        assert upstream.resolve_layer_fused_shared_expert is resolve
