"""The family-neutral core's rules, on plain numbers: the shared-slot scaling that makes the
fused sum equal upstream's unfused one in every mode, and which checkpoint layers hold MoE blocks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_fse.core.construction import moe_layer_indices, shared_slot_scaling

pytestmark = pytest.mark.unit


def _upstream_unfused(routed: torch.Tensor, shared: torch.Tensor, rsf: float, to_output: bool, dtype) -> torch.Tensor:
    """What vLLM's runner returns unfused (``_maybe_apply_routed_scale_to_output``); ``routed``
    is the weighted routed sum with rsf already folded in when ``to_output`` is False."""
    if to_output and rsf != 1.0:
        if dtype == torch.float16:
            return routed + shared * (1.0 / rsf)  # overflow guard: the shared output is divided
        return routed * rsf + shared
    return routed + shared


def _fused(routed: torch.Tensor, shared: torch.Tensor, rsf: float, to_output: bool, dtype) -> torch.Tensor:
    """The widened layer: the shared slot inside the kernel's sum, then the runner's output scale
    (the runner sees no separate shared output, so it always scales when the scale is not 1)."""
    slot_weight, output_scale = shared_slot_scaling(rsf, to_output, dtype)
    total = routed + slot_weight * shared
    return total * output_scale if to_output and output_scale != 1.0 else total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("to_output", [True, False])
@pytest.mark.parametrize("rsf", [1.0, 1.8, 2.5, 16.0])
def test_fused_sum_equals_upstreams_unfused_sum_in_every_mode(rsf, to_output, dtype):
    gen = torch.Generator().manual_seed(0)
    routed, shared = torch.randn(4, 8, generator=gen, dtype=torch.float64), torch.randn(4, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        _fused(routed, shared, rsf, to_output, dtype), _upstream_unfused(routed, shared, rsf, to_output, dtype)
    )


def test_a_slot_weight_of_rsf_is_what_the_rule_prevents():
    # Seed 001's review: weighting the shared slot like a routed expert scales it by rsf twice.
    assert shared_slot_scaling(2.5, True, torch.bfloat16) == (0.4, 2.5)
    assert shared_slot_scaling(2.5, False, torch.bfloat16) == (1.0, 2.5)
    assert shared_slot_scaling(16.0, True, torch.float16) == (1 / 16, 1.0)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        # GLM-4.5: dense layers before first_k_dense_replace, one MTP layer after the last.
        (dict(num_hidden_layers=4, first_k_dense_replace=1, num_nextn_predict_layers=1), {1, 2, 3, 4}),
        # MoE every moe_layer_freq-th layer, the MTP layer (5) by the same rule as upstream's.
        (dict(num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2, num_nextn_predict_layers=1), {2, 4}),
        (dict(num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=2, num_nextn_predict_layers=1), {2, 4}),
        (dict(num_hidden_layers=3, first_k_dense_replace=0, num_nextn_predict_layers=0), {0, 1, 2}),
    ],
)
def test_moe_layers_follow_upstreams_rule_with_mtp_layers_included(config, expected):
    assert moe_layer_indices(SimpleNamespace(**config)) == expected


def test_the_draft_model_is_found_under_model_runner_v2_and_the_v1_runners():
    """vLLM's Model Runner V2 (its default on GPU) holds the draft as ``speculator``, the V1
    runners (CPU here) as ``drafter``; the introspection probes find it under either."""
    from types import SimpleNamespace

    from vllm_fse.introspect import _drafter_model

    draft = object()
    v1 = SimpleNamespace(model_runner=SimpleNamespace(drafter=SimpleNamespace(model=draft)))
    v2 = SimpleNamespace(model_runner=SimpleNamespace(speculator=SimpleNamespace(model=draft)))
    assert _drafter_model(v1) is draft
    assert _drafter_model(v2) is draft
    assert _drafter_model(SimpleNamespace(worker=v2)) is draft  # a WorkerWrapper


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"num_hidden_layers": 4, "num_experts": 8}, {0, 1, 2, 3}),
        ({"num_hidden_layers": 4, "num_experts": 8, "mlp_only_layers": [0]}, {1, 2, 3}),
        ({"num_hidden_layers": 4, "num_experts": 8, "decoder_sparse_step": 2}, {1, 3}),
        ({"num_hidden_layers": 4, "num_experts": 0}, set()),
        # Qwen3-Next's MTP layers are mtp.layers.K, numbered from 0 like the main layers.
        ({"num_hidden_layers": 1, "num_experts": 8, "num_nextn_predict_layers": 2}, {0, 1}),
    ],
)
def test_qwen_moe_layers_follow_upstreams_rule(config, expected):
    from vllm_fse.models.qwen_moe import qwen_moe_layer_indices

    assert qwen_moe_layer_indices(SimpleNamespace(**config)) == expected


def test_split_path_keeps_the_slot_weight_when_inductor_compiles_it():
    """The split branch adds the shared MLP's output at the slot weight. Inductor's post-grad
    pass rewrites ``add(mm(a, b), c)`` into ``addmm`` and drops the add's ``alpha`` (torch 2.13
    and 2.14), so with a dense MLP Inductor can see into (vLLM 0.34's CPU linear without oneDNN
    is ``F.linear``) ``torch.add(out, shared, alpha=w)`` came out as ``out + shared``: wrong
    tokens with VLLM_FSE=auto in vLLM 0.34's compiled CPU mode."""
    from vllm_fse.core.layer import SharedSlotExperts

    torch.manual_seed(0)
    w_shared, w_routed = torch.randn(64, 32), torch.randn(64, 32)
    stand_in = SimpleNamespace(
        split_mlp=lambda x: torch.nn.functional.linear(x, w_shared),
        gate=None,
        _forward_modular=lambda x, weights, ids: torch.nn.functional.linear(x, w_routed),
        slot_weight=0.4,
    )
    x = torch.randn(7, 32)
    weights, ids = torch.ones(7, 2), torch.zeros(7, 2, dtype=torch.int64)

    def split(x):
        return SharedSlotExperts._split_traced(stand_in, x, weights, ids)

    torch._dynamo.reset()
    compiled = torch.compile(split, backend="inductor", fullgraph=True)(x)
    expected = x @ w_routed.T + 0.4 * (x @ w_shared.T)
    torch.testing.assert_close(split(x), expected)
    torch.testing.assert_close(compiled, expected)
