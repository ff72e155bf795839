"""Where the split path's dense MLP keeps its weights: on the shared slot where the backend left the
slot as the same matrices (no second copy of the shared expert), in its own copy otherwise, with
the reason. Plain tensors: the GPU backends that keep plain slots cannot run here, and on CPU vLLM's
kernels repack both sides (the e2e side of that is in ``tests/test_fse_auto.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_fse.auto.switch_point import SwitchPoint
from vllm_fse.core.layer import SharedSlotExperts
from vllm_fse.core.plan_log import split_path_memory
from vllm_fse.core.split_storage import slot_views

pytestmark = pytest.mark.unit

HIDDEN, INTER, N_ROUTED = 16, 4, 4


class _Routed(torch.nn.Module):
    """The FusedMoE parameters the split MLP may read: ``w13_weight[e]`` is ``[gate; up]`` of
    expert ``e``, ``w2_weight[e]`` its down projection (vLLM's layout before any repacking)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, expert_map: torch.Tensor | None = None) -> None:
        super().__init__()
        self.w13_weight = torch.nn.Parameter(w13, requires_grad=False)
        self.w2_weight = torch.nn.Parameter(w2, requires_grad=False)
        self.expert_map = expert_map

    def forward_modular(self, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        raise AssertionError("not called here")


class _SplitMlp(torch.nn.Module):
    """The model's dense shared-expert MLP: stacked gate/up, then down (as vLLM's ``*MLP``)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(HIDDEN, 2 * INTER, bias=bias)
        self.down_proj = torch.nn.Linear(INTER, HIDDEN, bias=False)
        with torch.no_grad():
            self.gate_up_proj.weight.copy_(gate_up)
            self.down_proj.weight.copy_(down)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(torch.nn.functional.silu(gate) * up)


def _experts(n_experts: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_experts, 2 * INTER, HIDDEN, generator=gen), torch.randn(n_experts, HIDDEN, INTER, generator=gen)


def _layer(routed: _Routed, mlp: _SplitMlp, n_shared: int = 1, replicas: int = 1) -> SharedSlotExperts:
    runner = torch.nn.Module()
    runner.layer_name = "model.layers.1.mlp.experts"
    runner.routed_experts = routed
    return SharedSlotExperts(runner, SwitchPoint.auto_switch(4, 64), n_routed=N_ROUTED, n_shared=n_shared,
                             slot_weight=0.4, split_mlp=mlp, replicas=replicas)  # fmt: skip


def test_the_split_mlp_reads_the_shared_slot_that_holds_the_same_matrices():
    w13, w2 = _experts(N_ROUTED + 1)
    routed, mlp = _Routed(w13, w2), _SplitMlp(w13[N_ROUTED], w2[N_ROUTED])
    x = torch.randn(3, HIDDEN)
    before = mlp(x)
    layer = _layer(routed, mlp)

    assert layer.read_split_weights_from_slot() is True
    assert layer.split_weights_slot == N_ROUTED and layer.split_copy_reason is None
    # The projections are views of the slot: one storage, the same numbers.
    assert mlp.gate_up_proj.weight.data_ptr() == routed.w13_weight[N_ROUTED].data_ptr()
    assert mlp.down_proj.weight.data_ptr() == routed.w2_weight[N_ROUTED].data_ptr()
    assert mlp.gate_up_proj.weight.untyped_storage().data_ptr() == routed.w13_weight.untyped_storage().data_ptr()
    torch.testing.assert_close(mlp(x), before, rtol=0, atol=0)
    assert split_path_memory({1: SimpleNamespace(experts=SimpleNamespace(fse_shared_slots=layer))}) == (
        "split path: the dense MLP reads the shared slot's weights, no copy"
    )


def test_a_slot_repacked_for_a_kernel_keeps_the_copy_and_names_the_tensor():
    w13, w2 = _experts(N_ROUTED + 1)
    # A kernel's blocked layout: same numbers, other shape (as vLLM's CPU MoE prepack or oneDNN's
    # packing, which leaves the dense weight empty).
    routed = _Routed(w13.transpose(1, 2).contiguous(), w2)
    mlp = _SplitMlp(w13[N_ROUTED], w2[N_ROUTED])
    own = mlp.gate_up_proj.weight.data_ptr()
    layer = _layer(routed, mlp)

    assert layer.read_split_weights_from_slot() is False
    assert layer.split_weights_slot is None
    assert layer.split_copy_reason == (
        f"gate_up_proj.weight is [{2 * INTER}, {HIDDEN}] (strides [{HIDDEN}, 1]) float32 on cpu, "
        f"w13_weight[{N_ROUTED}] is [{HIDDEN}, {2 * INTER}] (strides [{2 * INTER}, 1]) float32 on cpu: repacked for a kernel"
    )
    assert mlp.gate_up_proj.weight.data_ptr() == own
    blocks = {1: SimpleNamespace(experts=SimpleNamespace(fse_shared_slots=layer))}
    assert sum(p.numel() * 4 for p in mlp.parameters()) == 768
    assert split_path_memory(blocks) == (
        "split path: one dense shared-expert copy per MoE layer, 768 B in all "
        f"({layer.split_copy_reason})"
    )


def test_a_dense_weight_packed_into_a_gemm_handle_keeps_the_copy_counted_as_built():
    # vLLM's CPU GEMMs (oneDNN, sgl) keep the packed weight in their handle and leave an empty
    # ``weight``; the copy still costs what the MLP was built with.
    w13, w2 = _experts(N_ROUTED + 1)
    mlp = _SplitMlp(w13[N_ROUTED], w2[N_ROUTED])
    layer = _layer(_Routed(w13, w2), mlp)
    mlp.gate_up_proj.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    assert layer.read_split_weights_from_slot() is False
    assert layer.split_copy_reason == (
        f"gate_up_proj.weight is [0] (strides [1]) float32 on cpu, w13_weight[{N_ROUTED}] is [{2 * INTER}, {HIDDEN}] "
        f"(strides [{HIDDEN}, 1]) float32 on cpu: repacked for a kernel"
    )
    blocks = {1: SimpleNamespace(experts=SimpleNamespace(fse_shared_slots=layer))}
    assert split_path_memory(blocks).startswith("split path: one dense shared-expert copy per MoE layer, 768 B in all (")


def test_same_layout_other_numbers_keeps_the_copy():
    w13, w2 = _experts(N_ROUTED + 1)
    other_down = w2[N_ROUTED] + 1
    layer = _layer(_Routed(w13, w2), _SplitMlp(w13[N_ROUTED], other_down))
    assert layer.read_split_weights_from_slot() is False
    assert layer.split_copy_reason == f"down_proj.weight differs from w2_weight[{N_ROUTED}]"
    # Nothing was re-pointed half-way: gate_up stays the MLP's own too.
    assert layer.split_mlp.gate_up_proj.weight.data_ptr() != layer.runner.routed_experts.w13_weight[N_ROUTED].data_ptr()


def test_a_parameter_without_a_per_expert_twin_keeps_the_copy():
    w13, w2 = _experts(N_ROUTED + 1)
    layer = _layer(_Routed(w13, w2), _SplitMlp(w13[N_ROUTED], w2[N_ROUTED], bias=True))
    assert layer.read_split_weights_from_slot() is False
    assert layer.split_copy_reason == "gate_up_proj.bias has no per-expert twin w13_bias"


def test_under_expert_parallelism_the_local_index_of_the_shared_slot_is_read():
    # This rank holds experts 2, 3 and the shared slot 4 at local indices 0, 1, 2.
    w13, w2 = _experts(3)
    expert_map = torch.tensor([-1, -1, 0, 1, 2], dtype=torch.int32)
    layer = _layer(_Routed(w13, w2, expert_map), _SplitMlp(w13[2], w2[2]))
    assert layer.read_split_weights_from_slot() is True
    assert layer.split_weights_slot == N_ROUTED
    assert layer.split_mlp.gate_up_proj.weight.data_ptr() == layer.runner.routed_experts.w13_weight[2].data_ptr()


def test_a_replica_held_here_serves_when_the_first_is_elsewhere():
    # Two replicas of the shared expert (slots 4 and 5); this rank holds only the second, at local 1.
    w13, w2 = _experts(2)
    expert_map = torch.tensor([0, -1, -1, -1, -1, 1], dtype=torch.int32)
    layer = _layer(_Routed(w13, w2, expert_map), _SplitMlp(w13[1], w2[1]), replicas=2)
    assert layer.read_split_weights_from_slot() is True
    assert layer.split_weights_slot == N_ROUTED + 1


def test_shared_slots_on_other_ranks_or_several_slots_keep_the_copy():
    w13, w2 = _experts(N_ROUTED)
    elsewhere = torch.tensor([0, 1, 2, 3, -1], dtype=torch.int32)
    layer = _layer(_Routed(w13, w2, elsewhere), _SplitMlp(w13[0], w2[0]))
    assert layer.read_split_weights_from_slot() is False
    assert layer.split_copy_reason == "the shared slots are held by other expert-parallel ranks"

    # DeepSeek-V2's two shared experts: one MLP of twice the width, two slots of one width each.
    w13, w2 = _experts(N_ROUTED + 2)
    layer = _layer(_Routed(w13, w2), _SplitMlp(w13[N_ROUTED], w2[N_ROUTED]), n_shared=2)
    assert layer.read_split_weights_from_slot() is False
    assert layer.split_copy_reason == "the split MLP spans 2 slots"


def test_slot_views_pair_every_projection_parameter_with_its_slot():
    w13, w2 = _experts(N_ROUTED + 1)
    routed, mlp = _Routed(w13, w2), _SplitMlp(w13[N_ROUTED], w2[N_ROUTED])
    pairs = slot_views(mlp, routed, N_ROUTED)
    assert [p is q for (p, _), q in zip(pairs, (mlp.gate_up_proj.weight, mlp.down_proj.weight))] == [True, True]
    assert [v.data_ptr() for _, v in pairs] == [routed.w13_weight[N_ROUTED].data_ptr(), routed.w2_weight[N_ROUTED].data_ptr()]
