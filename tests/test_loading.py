"""vllm_fse.loading on plain tensors: exact splits, views, slot verification, specific errors."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vllm_fse.loading as loading
from vllm_fse.loading import (
    PROJECTIONS,
    UNQUANTIZED,
    MissingSlotWeightsError,
    SharedExpertLayout,
    SharedExpertWeightError,
    SlotTracker,
    UnsupportedSharedExpertFormat,
    fp8_block,
    fp8_per_tensor,
    per_channel,
    shared_expert_format,
    split_shared_experts,
)

pytestmark = pytest.mark.unit

N_ROUTED = 8


def _layout(n_shared=2, hidden=16, inter=8, moe_layers=(1, 2), fmt=UNQUANTIZED) -> SharedExpertLayout:
    return SharedExpertLayout(
        n_routed_experts=N_ROUTED,
        n_shared_experts=n_shared,
        hidden_size=hidden,
        moe_intermediate_size=inter,
        moe_layers=frozenset(moe_layers),
        format=fmt,
    )


def _shared(layout: SharedExpertLayout, layer: int, dtype=torch.float32, gen=None) -> dict[str, torch.Tensor]:
    packed = layout.moe_intermediate_size * layout.n_shared_experts
    h = layout.hidden_size
    p = f"model.layers.{layer}.mlp.shared_experts"
    return {
        f"{p}.gate_proj.weight": torch.randn(packed, h, generator=gen).to(dtype),
        f"{p}.up_proj.weight": torch.randn(packed, h, generator=gen).to(dtype),
        f"{p}.down_proj.weight": torch.randn(h, packed, generator=gen).to(dtype),
    }


def _rejoin(out: dict[str, torch.Tensor], layout: SharedExpertLayout, layer: int, proj: str, suffix="weight"):
    chunks = [out[f"model.layers.{layer}.mlp.experts.{s}.{proj}.{suffix}"] for s in layout.slots]
    return torch.cat(chunks, dim=1 if proj == "down_proj" else 0)


@settings(max_examples=40, deadline=None)
@given(
    n_shared=st.integers(1, 4),
    hidden=st.integers(1, 24),
    inter=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_split_then_rejoin_is_exact_and_chunks_are_views(n_shared, hidden, inter, dtype, seed):
    layout = _layout(n_shared, hidden, inter, moe_layers=(3,))
    original = _shared(layout, 3, dtype, torch.Generator().manual_seed(seed))
    out = dict(split_shared_experts(original.items(), layout))
    assert len(out) == 3 * n_shared
    for proj in ("gate_proj", "up_proj", "down_proj"):
        source = original[f"model.layers.3.mlp.shared_experts.{proj}.weight"]
        assert torch.equal(_rejoin(out, layout, 3, proj), source)
        for s in layout.slots:
            chunk = out[f"model.layers.3.mlp.experts.{s}.{proj}.weight"]
            assert chunk.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
            assert chunk.shape == ((hidden, inter) if proj == "down_proj" else (inter, hidden))


def test_other_tensors_pass_through_untouched_and_in_order():
    layout = _layout()
    items = [
        ("model.embed_tokens.weight", torch.randn(4, 16)),
        *_shared(layout, 1).items(),
        ("model.layers.1.mlp.experts.0.gate_proj.weight", torch.randn(8, 16)),
        ("model.layers.1.mlp.gate.e_score_correction_bias", torch.randn(8)),
        ("lm_head.weight", torch.randn(4, 16)),
    ]
    out = list(split_shared_experts(iter(items), layout))
    passthrough = [(n, t) for n, t in out if ".experts.8." not in n and ".experts.9." not in n]
    expected = [(n, t) for n, t in items if "shared_experts" not in n]
    assert [n for n, _ in passthrough] == [n for n, _ in expected]
    assert all(a is b for (_, a), (_, b) in zip(passthrough, expected))
    # Slots appear where the shared tensor stood, gate before up before down.
    assert [n for n, _ in out][1:7] == [
        f"model.layers.1.mlp.experts.{s}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj") for s in (8, 9)
    ]


def test_streaming_holds_nothing_back():
    """Each slot is yielded before the next checkpoint tensor is read."""
    layout = _layout(n_shared=2)
    shared = list(_shared(layout, 1).items())
    consumed = []

    def source():
        for item in shared:
            consumed.append(item[0])
            yield item

    stream = split_shared_experts(source(), layout)
    next(stream)
    assert consumed == [shared[0][0]]


@pytest.mark.parametrize("n_shared", [0, None])
def test_no_shared_experts_means_pass_through(n_shared):
    layout = _layout(n_shared=n_shared)
    items = [("model.layers.1.mlp.shared_experts.gate_proj.weight", torch.randn(3, 5))]
    assert list(split_shared_experts(iter(items), layout)) == items


def test_mtp_layer_beyond_num_hidden_layers_splits_like_any_moe_layer():
    layout = _layout(moe_layers=(1, 2, 3))  # 3 = the MTP layer of a 3-layer model
    out = dict(split_shared_experts(_shared(layout, 3).items(), layout))
    assert set(out) == {
        f"model.layers.3.mlp.experts.{s}.{p}.weight" for s in (8, 9) for p in ("gate_proj", "up_proj", "down_proj")
    }


@pytest.mark.parametrize("replicas", [2, 3])
def test_every_replica_slot_gets_its_shared_experts_chunk_and_the_tracker_expects_them_all(replicas):
    layout = dataclasses.replace(_layout(n_shared=2), shared_replicas=replicas)
    assert layout.slots == range(N_ROUTED, N_ROUTED + 2 * replicas)
    tensors = _shared(layout, 1)
    out = dict(split_shared_experts(tensors.items(), layout))
    gate = tensors["model.layers.1.mlp.shared_experts.gate_proj.weight"]
    for r in range(replicas):
        for j in range(2):  # replica r holds shared expert j in slot n_routed + r * n_shared + j
            got = out[f"model.layers.1.mlp.experts.{N_ROUTED + r * 2 + j}.gate_proj.weight"]
            assert torch.equal(got, gate[j * 8 : (j + 1) * 8])
    tracker = SlotTracker.for_layers(layout, [1])
    assert {t.slot for t in tracker.expected} == set(layout.slots)


def test_shared_slot_ids_round_robin_tokens_over_replicas():
    from vllm_fse.core.replicas import shared_slot_ids

    assert shared_slot_ids(5, 8, 2, 1).tolist() == [[8, 9]] * 5
    assert shared_slot_ids(5, 8, 2, 2).tolist() == [[8, 9], [10, 11], [8, 9], [10, 11], [8, 9]]
    assert shared_slot_ids(4, 8, 1, 3).tolist() == [[8], [9], [10], [8]]


# -- quantized formats ------------------------------------------------------------------------


def test_fp8_block_splits_weight_and_block_scales_on_block_edges():
    block = (4, 4)
    layout = _layout(n_shared=2, hidden=16, inter=8, moe_layers=(1,), fmt=fp8_block(block))
    p = "model.layers.1.mlp.shared_experts"
    weights = {
        f"{p}.gate_proj.weight": torch.randn(16, 16).to(torch.float8_e4m3fn),
        f"{p}.gate_proj.weight_scale_inv": torch.randn(4, 4),
        f"{p}.down_proj.weight": torch.randn(16, 16).to(torch.float8_e4m3fn),
        f"{p}.down_proj.weight_scale_inv": torch.randn(4, 4),
    }
    out = dict(split_shared_experts(weights.items(), layout))
    assert out["model.layers.1.mlp.experts.9.gate_proj.weight"].dtype == torch.float8_e4m3fn
    for proj in ("gate_proj", "down_proj"):
        for suffix in ("weight", "weight_scale_inv"):
            rejoined = _rejoin(out, layout, 1, proj, suffix)
            assert torch.equal(rejoined.float(), weights[f"{p}.{proj}.{suffix}"].float())
    assert out["model.layers.1.mlp.experts.8.gate_proj.weight_scale_inv"].shape == (2, 4)
    assert out["model.layers.1.mlp.experts.9.down_proj.weight_scale_inv"].shape == (4, 2)


def test_fp8_block_chunk_not_on_block_edge_is_refused():
    layout = _layout(n_shared=2, hidden=16, inter=6, moe_layers=(1,), fmt=fp8_block((4, 4)))
    name = "model.layers.1.mlp.shared_experts.gate_proj.weight_scale_inv"
    with pytest.raises(SharedExpertWeightError, match=r"do not fall on the 4-wide quantization blocks") as e:
        list(split_shared_experts([(name, torch.randn(3, 4))], layout))
    assert name in str(e.value) and "[3, 4]" in str(e.value) and "n_shared_experts=2" in str(e.value)


def test_fp8_per_tensor_scale_goes_whole_to_every_slot():
    layout = _layout(n_shared=3, moe_layers=(1,), fmt=fp8_per_tensor(static_activation_scale=True))
    p = "model.layers.1.mlp.shared_experts.up_proj"
    scale, act = torch.tensor(0.5), torch.tensor([2.0])
    weight = torch.randn(24, 16).to(torch.float8_e4m3fn)
    out = dict(
        split_shared_experts(
            [(f"{p}.weight", weight), (f"{p}.weight_scale", scale), (f"{p}.input_scale", act)], layout
        )
    )
    for s in layout.slots:
        assert out[f"model.layers.1.mlp.experts.{s}.up_proj.weight_scale"] is scale
        assert out[f"model.layers.1.mlp.experts.{s}.up_proj.input_scale"] is act


def test_per_channel_scales_split_for_gate_up_and_stay_whole_for_down():
    layout = _layout(n_shared=2, hidden=16, inter=8, moe_layers=(1,), fmt=per_channel(static_activation_scale=False))
    p = "model.layers.1.mlp.shared_experts"
    gate_scale, down_scale = torch.randn(16, 1), torch.randn(16)
    int8 = torch.zeros(16, 16, dtype=torch.int8)
    out = dict(
        split_shared_experts(
            [
                (f"{p}.gate_proj.weight_scale", gate_scale),  # scale before weight: shards may do that
                (f"{p}.gate_proj.weight", int8),
                (f"{p}.down_proj.weight", int8),
                (f"{p}.down_proj.weight_scale", down_scale),
            ],
            layout,
        )
    )
    assert torch.equal(out["model.layers.1.mlp.experts.9.gate_proj.weight_scale"], gate_scale[8:])
    assert out["model.layers.1.mlp.experts.8.down_proj.weight_scale"] is down_scale
    assert out["model.layers.1.mlp.experts.9.down_proj.weight_scale"] is down_scale


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (None, UNQUANTIZED),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}, fp8_block((128, 128))),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, fp8_per_tensor(False)),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {
                    "group_0": {
                        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
                    }
                },
                "ignore": ["lm_head"],
            },
            per_channel(False, row="fp8-channel"),
        ),
    ],
)
def test_format_is_read_from_the_hf_quantization_config(config, expected):
    assert shared_expert_format(config) == expected


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"quant_method": "awq", "bits": 4}, "'awq'"),
        ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
        ({"quant_method": "mxfp4"}, "'mxfp4'"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "ignored_layers": ["model.layers.0.mlp.shared_experts"]}, "shared_experts"),
        ({"quant_method": "fp8", "activation_scheme": "static"}, "static activation scales"),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}},
            },
            "compressed-tensors int4 weights, strategy 'group'",
        ),
    ],
)
def test_unsupported_formats_are_refused_by_name(config, named):
    with pytest.raises(UnsupportedSharedExpertFormat, match=named.replace("[", r"\[")):
        shared_expert_format(config)


def test_tensor_outside_the_format_is_refused_by_name():
    layout = _layout(moe_layers=(1,))
    name = "model.layers.1.mlp.shared_experts.gate_proj.qweight"
    with pytest.raises(UnsupportedSharedExpertFormat, match="'qweight' is not part of the checkpoint's unquantized"):
        list(split_shared_experts([(name, torch.zeros(2, 2, dtype=torch.int32))], layout))


def test_integer_weight_in_unquantized_checkpoint_is_refused():
    layout = _layout(n_shared=1, hidden=4, inter=2, moe_layers=(1,))
    with pytest.raises(UnsupportedSharedExpertFormat, match="torch.int8 in an unquantized checkpoint"):
        list(split_shared_experts([("model.layers.1.mlp.shared_experts.up_proj.weight", torch.zeros(2, 4, dtype=torch.int8))], layout))


# -- bad input --------------------------------------------------------------------------------


def test_size_not_divisible_by_n_shared_names_tensor_shape_and_n_shared():
    layout = _layout(n_shared=3, hidden=16, inter=8, moe_layers=(1,))
    name = "model.layers.1.mlp.shared_experts.down_proj.weight"
    with pytest.raises(SharedExpertWeightError) as e:
        list(split_shared_experts([(name, torch.randn(16, 25))], layout))
    message = str(e.value)
    assert name in message and "[16, 25]" in message and "n_shared_experts=3" in message
    assert "dim 1 of size 25 is not divisible" in message


def test_shape_contradicting_the_config_names_the_expected_shape():
    layout = _layout(n_shared=2, hidden=16, inter=8, moe_layers=(1,))
    name = "model.layers.1.mlp.shared_experts.gate_proj.weight"
    with pytest.raises(SharedExpertWeightError, match=r"expected shape \[16, 16\]") as e:
        list(split_shared_experts([(name, torch.randn(12, 16))], layout))
    assert "[12, 16]" in str(e.value) and "moe_intermediate_size=8" in str(e.value)


def test_shared_expert_tensor_for_a_dense_layer_is_an_error():
    layout = _layout(moe_layers=(1, 2))
    name = "model.layers.0.mlp.shared_experts.gate_proj.weight"
    with pytest.raises(SharedExpertWeightError, match=r"layer 0 has no MoE block \(MoE layers: \[1, 2\]\)"):
        list(split_shared_experts([(name, torch.randn(16, 16))], layout))


def test_scale_without_its_weight_is_an_error_at_end_of_stream():
    layout = _layout(n_shared=2, hidden=16, inter=8, moe_layers=(1,), fmt=fp8_block((4, 4)))
    name = "model.layers.1.mlp.shared_experts.up_proj.weight_scale_inv"
    with pytest.raises(SharedExpertWeightError, match="layer 1 up_proj has weight_scale_inv but no weight"):
        list(split_shared_experts([(name, torch.randn(4, 4))], layout))


def test_unknown_shared_expert_projection_is_refused():
    layout = _layout(moe_layers=(1,))
    name = "model.layers.1.mlp.shared_experts.gate_up_proj.weight"
    with pytest.raises(UnsupportedSharedExpertFormat, match="unknown shared-expert projection"):
        list(split_shared_experts([(name, torch.randn(32, 16))], layout))


# -- slot verification ------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(n_shared=st.integers(1, 4), data=st.data())
def test_tracker_reports_exactly_the_dropped_slot_tensors(n_shared, data):
    layout = _layout(n_shared=n_shared, moe_layers=(1, 2, 3))
    tracker = SlotTracker.for_layers(layout, layout.moe_layers)
    items = sorted(tracker.expected)
    dropped = set(data.draw(st.lists(st.sampled_from(items), unique=True, max_size=len(items))))
    for item in items:
        if item not in dropped:
            tracker.mark_loaded(item.layer, item.slot, item.proj, item.suffix)
    if not dropped:
        tracker.verify()
        return
    with pytest.raises(MissingSlotWeightsError) as e:
        tracker.verify()
    message = str(e.value)
    assert f"{len(dropped)} fused shared-expert slot tensor(s)" in message
    for item in dropped:
        assert str(item) in message
    assert tracker.missing() == sorted(dropped)


def test_tracker_names_slots_like_layer_3_slot_160_down_proj_weight():
    layout = SharedExpertLayout(160, 1, 16, 8, frozenset({3}))
    tracker = SlotTracker.for_layers(layout, [3])
    for proj in ("gate_proj", "up_proj"):
        tracker.mark_loaded(3, 160, proj, "weight")
    with pytest.raises(MissingSlotWeightsError, match="layer 3 slot 160 down_proj.weight"):
        tracker.verify()


def test_tracker_ignores_slots_this_rank_does_not_hold():
    layout = _layout(n_shared=2, moe_layers=(1,))
    tracker = SlotTracker.for_layers(layout, [1], slots=[8])  # slot 9 lives on another EP rank
    for proj in ("gate_proj", "up_proj", "down_proj"):
        tracker.mark_loaded(1, 8, proj, "weight")
        tracker.mark_loaded(1, 9, proj, "weight")
    tracker.verify()
    assert 9 not in {t.slot for t in tracker.loaded}


def test_tracker_expects_scales_of_quantized_formats():
    layout = _layout(n_shared=1, moe_layers=(1,), fmt=fp8_block((4, 4)))
    tracker = SlotTracker.for_layers(layout, [1])
    for proj in ("gate_proj", "up_proj", "down_proj"):
        tracker.mark_loaded(1, 8, proj, "weight")
    with pytest.raises(MissingSlotWeightsError, match="layer 1 slot 8 down_proj.weight_scale_inv"):
        tracker.verify()


def test_loading_package_imports_no_vllm():
    root = pathlib.Path(loading.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "vllm" or n.startswith("vllm.") for n in names), f"{path.name} imports {names}"


def test_dense_copy_passes_each_packed_tensor_on_whole_after_its_chunks():
    """VLLM_FSE=auto: the split path's dense MLP loads the packed tensor itself (no copy)."""
    layout = dataclasses.replace(_layout(n_shared=2), dense_copy="fse_split_mlp")
    gate = torch.randn(16, 16)
    out = list(split_shared_experts([("model.layers.1.mlp.shared_experts.gate_proj.weight", gate)], layout))
    assert [name for name, _ in out] == [
        f"model.layers.1.mlp.experts.{N_ROUTED}.gate_proj.weight",
        f"model.layers.1.mlp.experts.{N_ROUTED + 1}.gate_proj.weight",
        "model.layers.1.mlp.fse_split_mlp.gate_proj.weight",
    ]
    assert out[-1][1] is gate


# -- Qwen: one gated shared expert, any width --------------------------------------------------


def _qwen_layout(width: int, inter: int = 4, hidden: int = 8, **kw) -> SharedExpertLayout:
    return SharedExpertLayout(
        n_routed_experts=6, n_shared_experts=-(-width // inter), hidden_size=hidden, moe_intermediate_size=inter,
        moe_layers=frozenset({0, 1}), shared_expert_name="shared_expert", shared_width=width, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("width", [4, 8, 10])
def test_a_wide_gated_shared_expert_becomes_slots_that_sum_to_it_with_zero_padding(width):
    """m slots of width I, the last one zero-padded, compute exactly the MLP of width m*I - pad."""
    layout = _qwen_layout(width)
    g = torch.Generator().manual_seed(width)
    p = "model.language_model.layers.1.mlp.shared_expert"  # Qwen3.5's multimodal checkpoint prefix
    packed = {f"{p}.gate_proj.weight": torch.randn(width, 8, generator=g), f"{p}.up_proj.weight": torch.randn(width, 8, generator=g),
              f"{p}.down_proj.weight": torch.randn(8, width, generator=g)}  # fmt: skip
    gate = ("model.language_model.layers.1.mlp.shared_expert_gate.weight", torch.randn(1, 8, generator=g))
    out = dict(split_shared_experts([*packed.items(), gate], layout))
    assert out[gate[0]] is gate[1]  # the gate is not a shared-expert tensor: it passes through
    slots = range(6, 6 + layout.n_shared_experts)
    x = torch.randn(5, 8, generator=g)

    def mlp(gate_w, up_w, down_w):
        return (torch.nn.functional.silu(x @ gate_w.T) * (x @ up_w.T)) @ down_w.T

    q = "model.language_model.layers.1.mlp.experts"
    fused = sum(mlp(*(out[f"{q}.{s}.{proj}.weight"] for proj in PROJECTIONS)) for s in slots)
    torch.testing.assert_close(fused, mlp(*packed.values()), rtol=1e-5, atol=1e-5)
    pad = layout.padding
    assert pad == -width % 4
    if pad:
        last = slots[-1]
        assert not out[f"{q}.{last}.gate_proj.weight"][-pad:].any() and not out[f"{q}.{last}.down_proj.weight"][:, -pad:].any()


def test_a_gated_shared_expert_of_the_wrong_width_names_the_config_field():
    layout = _qwen_layout(10)
    with pytest.raises(SharedExpertWeightError, match=r"shared_expert_intermediate_size=10"):
        list(split_shared_experts([("model.layers.0.mlp.shared_expert.up_proj.weight", torch.zeros(12, 8))], layout))


def test_zero_padding_a_quantized_shared_expert_is_refused():
    with pytest.raises(UnsupportedSharedExpertFormat, match="zero-padding"):
        list(split_shared_experts([], _qwen_layout(10, format=fp8_per_tensor(static_activation_scale=False))))


# -- compressed-tensors pack-quantized (W4A16 / W8A16): the exact cut, on tensors ---------------


def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(values.to(torch.int8), bits, packed_dim=dim)


def _unpack(packed: torch.Tensor, bits: int, shape, dim: int) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=dim)


@pytest.mark.parametrize(("bits", "group", "zero_points"), [(4, 8, False), (4, 8, True), (4, None, False), (8, 4, True)])
def test_pack_quantized_shared_experts_cut_exactly_on_packing_units_and_groups(bits, group, zero_points):
    """Every slot unpacks to its rows/columns of the packed MLP's int values, with its own scales
    and zero points, and gets its own ``weight_shape`` (rewritten, not sliced)."""
    from vllm_fse.loading import packed_int

    n, inter, hidden = 2, 16, 32
    layout = _layout(n_shared=n, hidden=hidden, inter=inter, moe_layers=(1,), fmt=packed_int(bits, group, zero_points))
    g = torch.Generator().manual_seed(bits)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    p = "model.layers.1.mlp.shared_experts"
    values, tensors = {}, {}
    for proj in PROJECTIONS:
        out, inp = (hidden, inter * n) if proj == "down_proj" else (inter * n, hidden)
        values[proj] = torch.randint(low, high + 1, (out, inp), generator=g)
        groups = 1 if group is None else inp // group
        tensors[f"{p}.{proj}.weight_packed"] = _pack(values[proj], bits, 1)
        tensors[f"{p}.{proj}.weight_scale"] = torch.rand(out, groups, generator=g)
        tensors[f"{p}.{proj}.weight_shape"] = torch.tensor([out, inp])
        if zero_points:
            values[proj, "zp"] = torch.randint(low, high + 1, (out, groups), generator=g)
            tensors[f"{p}.{proj}.weight_zero_point"] = _pack(values[proj, "zp"], bits, 0)
    out = dict(split_shared_experts(tensors.items(), layout))
    for j, slot in enumerate(layout.slots):
        q = f"model.layers.1.mlp.experts.{slot}"
        for proj in PROJECTIONS:
            down = proj == "down_proj"
            shape = out[f"{q}.{proj}.weight_shape"].tolist()
            assert shape == ([hidden, inter] if down else [inter, hidden])
            cols = slice(j * inter, (j + 1) * inter)
            want = values[proj][:, cols] if down else values[proj][cols]
            assert torch.equal(_unpack(out[f"{q}.{proj}.weight_packed"], bits, shape, 1).long(), want)
            scale = tensors[f"{p}.{proj}.weight_scale"]
            if down:
                want_scale = scale if group is None else scale[:, j * inter // group : (j + 1) * inter // group]
            else:
                want_scale = scale[cols]
            assert torch.equal(out[f"{q}.{proj}.weight_scale"], want_scale)
            if zero_points:
                zp = values[proj, "zp"]
                want_zp = zp[:, j * inter // group : (j + 1) * inter // group] if down else zp[cols]
                got = _unpack(out[f"{q}.{proj}.weight_zero_point"], bits, want_zp.shape, 0)
                assert torch.equal(got.long(), want_zp)
    tracker = SlotTracker.for_layers(layout, [1])
    assert {t.suffix for t in tracker.expected} == set(layout.format.suffixes)


@pytest.mark.parametrize(
    ("inter", "group", "suffix", "unit"),
    [(12, 4, "weight_packed", "int32s of packed values of 8"), (16, 32, "weight_scale", "scale groups of 32")],
)
def test_a_pack_quantized_slot_edge_inside_a_packing_unit_or_group_is_refused_by_name(inter, group, suffix, unit):
    from vllm_fse.loading import packed_int

    layout = _layout(n_shared=2, hidden=64, inter=inter, moe_layers=(1,), fmt=packed_int(4, group, False))
    name = f"model.layers.1.mlp.shared_experts.down_proj.{suffix}"
    cols = -(-2 * inter // 8) if suffix == "weight_packed" else -(-2 * inter // group)
    tensor = torch.zeros(64, cols, dtype=torch.int32 if suffix == "weight_packed" else torch.float32)
    with pytest.raises(SharedExpertWeightError, match=f"do not fall on whole {unit}") as e:
        list(split_shared_experts([(name, tensor)], layout))
    assert name in str(e.value) and "moe_intermediate_size" in str(e.value)


def test_a_pack_quantized_weight_shape_that_contradicts_the_config_is_an_error():
    from vllm_fse.loading import packed_int

    layout = _layout(n_shared=2, hidden=16, inter=8, moe_layers=(1,), fmt=packed_int(4, 8, False))
    name = "model.layers.1.mlp.shared_experts.gate_proj.weight_shape"
    with pytest.raises(SharedExpertWeightError, match=r"expected weight_shape \[16, 16\]"):
        list(split_shared_experts([(name, torch.tensor([12, 16]))], layout))
