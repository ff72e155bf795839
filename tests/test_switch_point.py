"""The auto switch point on plain objects: the token ladder, the rule that picks the switch point
from timings, the rule's wording, the prefilled slot buffers, the cache file and its key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_fse.auto import cache, calibration
from vllm_fse.auto.calibration import ladder, measure_switch_point
from vllm_fse.auto.switch_point import ALWAYS, SwitchPoint
from vllm_fse.core.slot_buffers import SlotBuffers

pytestmark = pytest.mark.unit


def test_ladder_doubles_up_to_and_including_the_batch_limit():
    assert ladder(1) == [1]
    assert ladder(8) == [1, 2, 4, 8]
    assert ladder(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def _layer(max_tokens: int = 8192):
    return SimpleNamespace(switch=SwitchPoint.auto_switch(None, max_tokens))


def _timings(monkeypatch, fused_wins) -> list[int]:
    """Make ``time_paths`` report fused faster exactly where ``fused_wins(tokens)``."""
    asked: list[int] = []

    def fake_time_paths(layer, tokens, like_x, like_ids, reps):
        asked.append(tokens)
        return (1.0, 2.0) if fused_wins(tokens) else (2.0, 1.0)

    monkeypatch.setattr(calibration, "time_paths", fake_time_paths)
    return asked


def test_switch_point_is_the_last_size_fused_won_before_split_won_twice_in_a_row(monkeypatch):
    asked = _timings(monkeypatch, lambda t: t <= 32)
    fused_max, rows = measure_switch_point(_layer(), None, None)
    assert fused_max == 32
    assert asked == [1, 2, 4, 8, 16, 32, 64, 128]  # stops after two split wins
    assert [r["tokens"] for r in rows] == asked and rows[0] == {"tokens": 1, "fused_us": 1e6, "split_us": 2e6}


def test_one_noisy_split_win_does_not_end_the_fused_range(monkeypatch):
    _timings(monkeypatch, lambda t: t != 8 and t <= 64)
    assert measure_switch_point(_layer(), None, None)[0] == 64


def test_fused_everywhere_means_fused_up_to_the_batch_limit(monkeypatch):
    _timings(monkeypatch, lambda t: True)
    assert measure_switch_point(_layer(max_tokens=300), None, None)[0] == 300


def test_split_from_the_first_size_means_always_split(monkeypatch):
    _timings(monkeypatch, lambda t: False)
    assert measure_switch_point(_layer(), None, None)[0] == 0


def _clock(monkeypatch):
    """Every ``perf_counter`` call advances one second: a size takes 1 s, so a 9.5 s budget
    times sizes 1, 2 and 4 and stops before 8 (elapsed 10 s + 2 x 1 s)."""
    clock = iter(range(1000))
    monkeypatch.setattr(calibration.time, "perf_counter", lambda: float(next(clock)))


def test_an_exhausted_budget_runs_the_untimed_sizes_fused_when_fused_won_the_last_two_sizes(monkeypatch):
    _clock(monkeypatch)
    _timings(monkeypatch, lambda t: True)
    fused_max, rows = measure_switch_point(_layer(), None, None, budget_s=9.5)
    assert [r["tokens"] for r in rows] == [1, 2, 4]
    assert fused_max == 8192


def test_an_exhausted_budget_leaves_the_untimed_sizes_split_after_a_recent_split_win(monkeypatch):
    _clock(monkeypatch)
    _timings(monkeypatch, lambda t: t != 2)
    fused_max, rows = measure_switch_point(_layer(), None, None, budget_s=9.5)
    assert [r["tokens"] for r in rows] == [1, 2, 4]
    assert fused_max == 4  # fused won only the last size: not enough to extrapolate


def test_an_exhausted_budget_after_one_size_leaves_the_untimed_sizes_split(monkeypatch):
    _clock(monkeypatch)
    _timings(monkeypatch, lambda t: True)
    fused_max, rows = measure_switch_point(_layer(), None, None, budget_s=3.5)
    assert fused_max == rows[-1]["tokens"] == 1


@pytest.mark.parametrize(
    ("switch", "text"),
    [
        (SwitchPoint.always_fused(2048), "every step fused"),
        (SwitchPoint.auto_switch(0, 2048), "auto: every step split (VLLM_FSE_FUSED_MAX_TOKENS=0)"),
        (SwitchPoint.auto_switch(64, 2048), "auto: fused for steps of <= 64 tokens, split above (VLLM_FSE_FUSED_MAX_TOKENS=64)"),
        (SwitchPoint.auto_switch(4096, 2048), "auto: every step fused (up to max_num_batched_tokens=2048) (VLLM_FSE_FUSED_MAX_TOKENS=4096)"),
    ],
)
def test_the_switch_rule_is_described_as_it_acts(switch, text):
    assert switch.resolved and switch.describe() == text


def test_switch_routes_by_token_count():
    switch = SwitchPoint.auto_switch(16, 2048)
    assert switch.fused_for(1) and switch.fused_for(16) and not switch.fused_for(17)
    assert not SwitchPoint.auto_switch(0, 2048).fused_for(1)
    assert SwitchPoint.always_fused(2048).fused_for(10**9)


def test_an_unresolved_switch_announces_the_plan_once_resolved():
    switch = SwitchPoint.auto_switch(None, 2048)
    said = []
    switch.announce_when_resolved(lambda: said.append(switch.describe()))
    assert not switch.resolved and said == []
    resolved = SwitchPoint.auto_switch(8, 2048)
    resolved.announce_when_resolved(lambda: said.append(resolved.describe()))
    assert said == ["auto: fused for steps of <= 8 tokens, split above (VLLM_FSE_FUSED_MAX_TOKENS=8)"]


def test_slot_buffers_hold_the_shared_slots_once_and_are_reused():
    buffers = SlotBuffers(16)
    layer = SimpleNamespace(n_routed=6, n_shared=2, replicas=1, slot_weight=0.4)
    weights, ids = torch.rand(3, 4), torch.randint(0, 6, (3, 4), dtype=torch.int32)
    ids_view, weights_view = buffers.views(layer, 3, weights, ids)
    assert ids_view.shape == weights_view.shape == (3, 6) and ids_view.is_contiguous()
    assert ids_view.dtype == torch.int32 and weights_view.dtype == torch.float32
    assert ids_view[:, 4:].tolist() == [[6, 7]] * 3
    assert torch.all(weights_view[:, 4:] == 0.4)
    again, _ = buffers.views(layer, 5, weights, ids)
    assert again.data_ptr() == ids_view.data_ptr()  # no per-step allocation
    bigger, _ = buffers.views(layer, 40, weights, ids)  # beyond max_num_batched_tokens: grows
    assert bigger.shape == (40, 6) and bigger[:, 4:].tolist() == [[6, 7]] * 40


def test_cache_file_round_trips_and_keeps_other_keys(tmp_path):
    path = tmp_path / "c" / "switch-points.json"
    cache.write_cache(path, "a", {"fused_max_tokens": 3, "measured": []})
    cache.write_cache(path, "b", {"fused_max_tokens": 5, "measured": [{"tokens": 1}]})
    assert cache.read_cache(path) == {
        "a": {"fused_max_tokens": 3, "measured": []},
        "b": {"fused_max_tokens": 5, "measured": [{"tokens": 1}]},
    }
    path.write_text("{not json")
    assert cache.read_cache(path) == {}  # a damaged cache is measured again, not fatal


def test_cpu_description_names_the_vector_isa():
    text = cache.device_description(torch.device("cpu"))
    assert text.endswith("]") and "[" in text


def test_graph_states_follow_the_switch_point_and_its_moves():
    switch = SwitchPoint.auto_switch(None, 2048)
    state, calls = switch.graph_tensors()
    assert state.tolist() == [-1]  # unresolved: the graph runs split (unfused), never a stale N
    switch.fused_max_tokens = 64
    other, _ = switch.graph_tensors()
    assert state.tolist() == other.tolist() == [64]
    switch.fused_max_tokens = ALWAYS
    assert state.tolist() == [ALWAYS]
    switch.fused_max_tokens = 0
    assert state.tolist() == other.tolist() == [0]


def test_calls_add_the_graph_counters_to_the_op_choices():
    switch = SwitchPoint.auto_switch(8, 2048)
    _, first = switch.graph_tensors()
    _, second = switch.graph_tensors()
    first.add_(torch.tensor([3, 1]))
    second.add_(torch.tensor([2, 0]))
    switch._op_calls["split"] += 4
    assert switch.calls == {"fused": 5, "split": 5}
    assert switch.chosen_in == {"graph": 6, "op": 4}
    switch.reset_calls()
    assert switch.calls == {"fused": 0, "split": 0} and first.tolist() == [0, 0]
