"""The benchmark and accuracy tools' logic on plain data: paired statistics, the interleaved
schedule, resume, arm checks, the report and the per-sample accuracy comparison."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from vllm_fse.bench import sweep
from vllm_fse.bench.accuracy import compare_task
from vllm_fse.bench.arms import arm_environments, check_arm, fse_states
from vllm_fse.bench.report import write_report
from vllm_fse.bench.stats import group_ratio, paired_delta, paired_proportion_delta, t975
from vllm_fse.bench.tasks import fse_arith

pytestmark = pytest.mark.unit


# -- statistics ------------------------------------------------------------------------------


def test_consistent_improvement_is_significant_and_better():
    d = paired_delta([20.0, 21.0, 19.0, 20.5, 20.0], [18.0, 18.9, 17.1, 18.45, 18.0])
    assert d.delta_pct == pytest.approx(-10.0, abs=1e-9)
    assert d.significant and d.verdict(lower_is_better=True) == "better"
    assert d.verdict(lower_is_better=False) == "worse"
    assert d.median_a == 20.0 and d.median_b == 18.0


def test_delta_within_machine_noise_is_called_noise():
    # +-10% run-to-run spread, no real effect: the interval must contain zero.
    d = paired_delta([20.0, 22.0, 18.0, 21.0, 19.0], [21.0, 19.0, 20.0, 19.5, 21.5])
    assert d.ci_low_pct < 0 < d.ci_high_pct
    assert not d.significant and d.verdict(lower_is_better=True) == "noise"


def test_small_real_effect_is_resolved_under_large_common_drift():
    # The machine drifts by +-15% between repeats, but each pair shares the drift: a 3% effect
    # is still resolved because the statistics work on paired ratios.
    drift = [1.0, 1.15, 0.85, 1.1, 0.9, 1.05, 0.95]
    off = [20.0 * k for k in drift]
    on = [x * 0.97 * (1.003 if i % 2 else 0.997) for i, x in enumerate(off)]
    d = paired_delta(off, on)
    assert d.verdict(lower_is_better=True) == "better"
    assert -4.0 < d.delta_pct < -2.0


def test_single_pair_has_no_interval():
    d = paired_delta([10.0], [9.0])
    assert d.ci_low_pct is None and d.verdict(lower_is_better=True) == "noise"
    assert d.ci_text() == "n=1, no CI"


@pytest.mark.parametrize("a,b", [([1.0, 2.0], [1.0]), ([], []), ([0.0, 1.0], [1.0, 1.0])])
def test_paired_delta_rejects_bad_samples(a, b):
    with pytest.raises(ValueError):
        paired_delta(a, b)


def test_t_quantiles():
    assert t975(4) == pytest.approx(2.776)
    assert t975(1000) == pytest.approx(1.96)


def test_group_ratio_puts_the_unit_to_unit_spread_into_its_interval():
    # Three engines per arm whose speeds differ by a few percent: a 3% shift between the arms'
    # geometric means is not resolved, the same shift between tightly agreeing engines is.
    loose = group_ratio([10.0, 10.4, 9.6], [10.3, 10.7, 9.9])
    assert loose.ratio == pytest.approx(1.03, abs=1e-3)
    assert loose.ci_low < 1 < loose.ci_high and not loose.significant
    assert loose.spread_a_pct == pytest.approx(4.0, abs=0.1)
    tight = group_ratio([10.0, 10.01, 9.99], [10.3, 10.31, 10.29])
    assert tight.significant and tight.ci_low > 1.02 and tight.ci_high < 1.04


def test_group_ratio_of_single_values_has_no_interval_and_rejects_bad_input():
    single = group_ratio([10.0], [9.0])
    assert single.ratio == pytest.approx(0.9) and single.ci_low is None and not single.significant
    assert single.ci_text() == "n=1+1, no CI"
    for a, b in (([], [1.0]), ([1.0, -1.0], [1.0])):
        with pytest.raises(ValueError):
            group_ratio(a, b)


def test_paired_proportion_delta():
    same = paired_proportion_delta([1, 0, 1, 0], [1, 0, 1, 0])
    assert same.delta == 0 and same.stderr_delta == 0 and same.within_stderr
    flipped = paired_proportion_delta([1, 0, 1, 0, 1, 1, 0, 0], [1, 0, 1, 0, 1, 1, 0, 1])
    assert flipped.delta == pytest.approx(1 / 8)
    assert flipped.stderr_delta > 0
    assert flipped.acc_a == pytest.approx(0.5) and flipped.stderr_a > 0


# -- schedule, resume, arms -----------------------------------------------------------------


CELLS = sweep.grid([(256, 64), (1024, 128)], [1, 4, 16])


def test_both_servers_schedule_pairs_arms_within_each_cell_and_alternates_the_leader():
    runs = sweep.schedule(CELLS, repeats=5, servers="both")
    assert Counter((r.rep, r.cell, r.arm) for r in runs) == Counter(
        {(rep, c, arm): 1 for rep in range(5) for c in CELLS for arm in ("off", "on")}
    )
    pairs = [runs[i : i + 2] for i in range(0, len(runs), 2)]
    assert all(a.cell == b.cell and a.rep == b.rep and {a.arm, b.arm} == {"off", "on"} for a, b in pairs)
    leaders = Counter(a.arm for a, _ in pairs)
    assert leaders["off"] == leaders["on"]
    for cell in CELLS:  # every cell is led by each arm in turn
        led = [a.arm for a, _ in pairs if a.cell == cell]
        assert all(x != y for x, y in zip(led, led[1:]))


def test_alternate_schedule_runs_one_server_per_block():
    runs = sweep.schedule(CELLS, repeats=2, servers="alternate")
    blocks = [runs[i : i + len(CELLS)] for i in range(0, len(runs), len(CELLS))]
    assert [{r.arm for r in b} for b in blocks] == [{"off"}, {"on"}, {"on"}, {"off"}]
    assert all([r.cell for r in b] == CELLS for b in blocks)


def test_grid_parsing_and_prompt_counts():
    assert sweep.parse_io("1024/128") == (1024, 128)
    with pytest.raises(Exception, match="ISL/OSL"):
        sweep.parse_io("1024x128")
    assert sweep.num_prompts(sweep.Cell(256, 64, 1), 4, 8) == 8
    assert sweep.num_prompts(sweep.Cell(256, 64, 16), 4, 8) == 64


def _config(**overrides) -> sweep.SweepConfig:
    base = dict(
        model="/m", tokenizer="/m", cells=CELLS[:2], repeats=2, prompts_per_concurrency=4, min_prompts=8,
        num_warmups=1, seed=0, server_args=["--max-model-len", "1216"],
        arm_env=arm_environments({}, {}, {}), servers="both",
    )  # fmt: skip
    return sweep.SweepConfig(**{**base, **overrides})


def test_resume_skips_finished_runs_and_refuses_a_changed_configuration(tmp_path: Path):
    config = _config()
    sweep.prepare_out_dir(tmp_path, config, overwrite=False)
    sweep.write_manifest(tmp_path, config, {})
    all_runs = list(sweep.pending_runs(config, tmp_path))
    assert len(all_runs) == 2 * 2 * 2
    done = all_runs[0]
    sweep._write_json(done.path(tmp_path), {"result": {}})
    assert done not in list(sweep.pending_runs(config, tmp_path))
    # More repeats extend the same sweep; other changes would mix incomparable runs.
    sweep.prepare_out_dir(tmp_path, _config(repeats=5), overwrite=False)
    with pytest.raises(SystemExit, match="server_args"):
        sweep.prepare_out_dir(tmp_path, _config(server_args=["--enforce-eager"]), overwrite=False)
    sweep.prepare_out_dir(tmp_path, _config(server_args=["--enforce-eager"]), overwrite=True)
    assert not done.path(tmp_path).exists()


def test_arm_environments_layer_both_then_own():
    env = arm_environments({"A": "1"}, {"B": "off"}, {"VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS": "1"})
    assert env["off"] == {"VLLM_FSE": "0", "A": "1", "B": "off"}
    assert env["on"] == {"VLLM_FSE": "1", "A": "1", "VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS": "1"}


ON_LOG = (
    "INFO [fused_shared_experts.py:296] vllm-fse: FseGlm4MoeForCausalLM FSE on (backend-neutral router "
    "append; requested by VLLM_FSE=1): 5 MoE layers [1..5], shared slots 64..64\n"
    "INFO [fused_shared_experts.py:296] vllm-fse: FseGlm4MoeMTP FSE on (backend-neutral router append; ...)\n"
)


def test_arm_check_accepts_a_server_that_runs_its_arm():
    assert check_arm("on", ON_LOG, Path("x.log")) == {"FseGlm4MoeForCausalLM": "on", "FseGlm4MoeMTP": "on"}


def test_arm_check_rejects_a_fallback_and_an_on_log_without_the_plugin_and_takes_no_plan_line_as_off():
    fallback = ON_LOG.replace("FseGlm4MoeMTP FSE on (", "FseGlm4MoeMTP FSE off (")
    with pytest.raises(RuntimeError, match="FseGlm4MoeMTP"):
        check_arm("on", fallback, Path("x.log"))
    with pytest.raises(RuntimeError, match="no vllm-fse plan line"):
        check_arm("on", "INFO plain vLLM\n", Path("x.log"))
    # FSE not asked for: the plugin registers nothing and logs no plan line (vLLM's own classes).
    assert check_arm("off", "INFO plain vLLM\n", Path("x.log")) == {}
    with pytest.raises(RuntimeError, match="arm 'off': the server runs with FSE"):
        check_arm("off", ON_LOG, Path("x.log"))
    assert fse_states(ON_LOG.replace(" on (", " off (")) == {"FseGlm4MoeForCausalLM": "off", "FseGlm4MoeMTP": "off"}


# -- report ---------------------------------------------------------------------------------


def _fake_result(tpot: float) -> dict:
    return {"mean_tpot_ms": tpot, "p99_tpot_ms": tpot * 1.2, "output_throughput": 1000 / tpot,
            "total_token_throughput": 5000 / tpot}  # fmt: skip


def test_report_writes_the_seeds_table_noise_table_and_plot(tmp_path: Path):
    config = _config(cells=[sweep.Cell(256, 64, 1), sweep.Cell(256, 64, 4)], repeats=5)
    sweep.prepare_out_dir(tmp_path, config, overwrite=False)
    sweep.write_manifest(tmp_path, config, {})
    drift = [1.0, 1.1, 0.9, 1.05, 0.95]
    for run in sweep.schedule(config.cells, 5, "both"):
        base = 20.0 * drift[run.rep]
        if run.cell.concurrency == 1:  # a real 10% gain at MC 1, noise at MC 4
            tpot = base * (0.9 if run.arm == "on" else 1.0)
        else:
            tpot = base * (1.0 + (0.08 if (run.rep + (run.arm == "on")) % 2 else -0.08))
        sweep._write_json(run.path(tmp_path), {"rep": run.rep, "arm": run.arm, "cell": vars(run.cell),
                                               "result": _fake_result(tpot)})  # fmt: skip
    md = write_report(tmp_path).read_text()
    assert "| ISL | OSL | MC | TPOT mean (ms) FSE=0 -> FSE=1 (Δ) | TPOT p99 (ms) FSE=0 -> FSE=1 (Δ) |" in md
    assert "| 256 | 64 | 1 | 20.00 -> 18.00 (**-10.0%**)" in md  # medians, bold: beyond noise
    row4 = next(line for line in md.splitlines() if line.startswith("| 256 | 64 | 4 | 5 |"))
    assert "| noise |" in row4
    seeds4 = next(line for line in md.splitlines() if line.startswith("| 256 | 64 | 4 | ") and "->" in line)
    assert "**" not in seeds4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["mean_tpot_ms"]["verdict"] for c in summary["cells"]] == ["better", "noise"]
    png = tmp_path / "deltas.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_three_arms_rotate_and_each_arm_is_reported_against_off(tmp_path: Path):
    arms = ["off", "on", "auto"]
    config = _config(cells=[sweep.Cell(256, 64, 1)], repeats=3, arms=arms,
                     arm_env=arm_environments({}, {}, {}, {"X": "1"}, arms))  # fmt: skip
    assert config.arm_env["auto"] == {"VLLM_FSE": "auto", "X": "1"}
    runs = sweep.schedule(config.cells, 3, "both", arms)
    assert [r.arm for r in runs] == ["off", "on", "auto", "on", "auto", "off", "auto", "off", "on"]
    sweep.prepare_out_dir(tmp_path, config, overwrite=False)
    sweep.write_manifest(tmp_path, config, {})
    drift = [1.0, 1.1, 0.9]
    for run in runs:
        tpot = 20.0 * drift[run.rep] * {"off": 1.0, "on": 0.9, "auto": 0.8}[run.arm]
        sweep._write_json(run.path(tmp_path), {"rep": run.rep, "arm": run.arm, "cell": vars(run.cell),
                                               "result": _fake_result(tpot)})  # fmt: skip
    md = write_report(tmp_path).read_text()
    assert "## auto vs FSE=0" in md and "## FSE=1 vs FSE=0" in md
    assert "| 256 | 64 | 1 | 20.00 -> 16.00 (**-20.0%**)" in md
    assert "| 256 | 64 | 1 | 20.00 -> 18.00 (**-10.0%**)" in md
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["comparisons"]) == {"on", "auto"} and summary["cells"] == summary["comparisons"]["on"]
    assert (tmp_path / "deltas-auto.png").is_file() and (tmp_path / "deltas.png").is_file()


def test_auto_arm_check_needs_the_per_step_switch_in_every_plan_line():
    auto_log = ON_LOG.replace("requested by VLLM_FSE=1): 5 MoE layers [1..5], shared slots 64..64",
                              "requested by VLLM_FSE=auto): 5 MoE layers; auto: fused for steps of <= 64 tokens")
    with pytest.raises(RuntimeError, match="without the per-step switch"):
        check_arm("auto", auto_log, Path("x.log"))  # the MTP line lacks it
    both = auto_log.replace("(backend-neutral router append; ...)", "(...); auto: every step split (...)")
    assert check_arm("auto", both, Path("x.log")) == {"FseGlm4MoeForCausalLM": "on", "FseGlm4MoeMTP": "on"}


# -- accuracy comparison --------------------------------------------------------------------


def _mc_sample(doc: int, lls: list[float], acc: float) -> dict:
    return {"doc_id": doc, "filtered_resps": [[ll, False] for ll in lls], "acc": acc}


def _results(task: str) -> dict:
    return {"results": {task: {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": task}}}


def test_accuracy_comparison_passes_equal_loglikelihoods():
    samples = {arm: [_mc_sample(d, [-1.0 - d, -2.0], d % 2) for d in range(6)] for arm in ("off", "on")}
    samples["on"][3]["filtered_resps"][0][0] += 5e-4  # within fp32 tolerance
    c = compare_task("t", samples, {"off": _results("t"), "on": _results("t")}, atol=1e-3)
    assert c.ll_samples == 6 and c.ll_max_abs_diff == pytest.approx(5e-4) and c.ll_over_tolerance == 0
    assert c.metrics["acc,none"].delta == 0 and c.passed()


def test_accuracy_comparison_flags_a_loglikelihood_mismatch():
    samples = {arm: [_mc_sample(d, [-1.0, -2.0], 1.0) for d in range(4)] for arm in ("off", "on")}
    samples["on"][2]["filtered_resps"][1][0] = -2.3
    c = compare_task("t", samples, {"off": _results("t"), "on": _results("t")}, atol=1e-3)
    assert c.ll_over_tolerance == 1 and not c.passed()


def test_accuracy_comparison_counts_identical_generations():
    def gen(doc: int, text: str, em: float) -> dict:
        # One row per filter, as lm-eval logs them: the strict filter misses the second answer.
        return [{"doc_id": doc, "filter": "strict-match", "resps": [[text]], "exact_match": em},
                {"doc_id": doc, "filter": "flexible-extract", "resps": [[text]], "exact_match": 1.0}]  # fmt: skip

    samples = {"off": gen(0, "a #### 4", 1.0) + gen(1, "b 4", 0.0), "on": gen(0, "a #### 4", 1.0) + gen(1, "c 4", 0.0)}
    row = {"exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.5,
           "exact_match,flexible-extract": 1.0, "exact_match_stderr,flexible-extract": 0.0}  # fmt: skip
    results = {"results": {"g": row}}
    c = compare_task("g", samples, {"off": results, "on": results}, atol=1e-3)
    assert (c.generations, c.generations_identical, c.ll_samples) == (2, 1, 0)
    assert c.metrics["exact_match,strict-match"].acc_a == 0.5
    assert c.metrics["exact_match,flexible-extract"].acc_a == 1.0


def test_shipped_task_data_is_what_the_generator_makes():
    items = fse_arith.build_items()
    assert fse_arith.DATA.read_text() == fse_arith.render_jsonl(items)
    assert Counter(i["split"] for i in items) == fse_arith.SPLITS
    for item in items:
        answer = item["answer"].rsplit("#### ", 1)[1]
        assert item["choices"][item["label"]] == answer and len(set(item["choices"])) == 4


def test_crossover_decode_schedule_pairs_adjacent_steps_and_rotates_the_leader():
    from vllm_fse.bench.crossover import FLOOR, MODES, decode_schedule

    arms = MODES + (FLOOR, "off")
    cycles = decode_schedule(arms, 12)
    assert len(cycles) == 12
    assert all(sorted(cycle) == sorted(arms) for cycle in cycles)  # one step per arm per cycle
    assert [cycle[0] for cycle in cycles[: len(arms)]] == list(arms)  # each arm leads in turn


def _moe_model(layer_cls):
    """A model with one layer of ``layer_cls`` over stand-in experts whose output says the path:
    routed top-k r -> x * r, fused (shared slot 4 at weight 1) -> x * (r + 5), split (the MLP
    is 2 * identity) -> x * (r + 2)."""
    import torch

    from vllm_fse.auto.switch_point import SwitchPoint

    class Routed(torch.nn.Module):
        quant_method = None

        def forward_modular(self, x, topk_weights, topk_ids):
            return x * (topk_weights * (topk_ids + 1)).sum(1, keepdim=True)

    runner = torch.nn.Module()
    runner.layer_name = "model.layers.1.mlp.experts"
    runner.routed_experts = Routed()
    mlp = torch.nn.Linear(4, 4, bias=False).requires_grad_(False)
    mlp.weight.copy_(2 * torch.eye(4))
    slots = layer_cls(runner, SwitchPoint.auto_switch(8, 64), n_routed=4, n_shared=1, slot_weight=1.0, split_mlp=mlp)
    slots._experts, slots._mlp = slots._forward_modular, slots.split_mlp  # bound: no CPU kernels here
    model = torch.nn.Module()
    model.block = runner
    model.fse_switch = slots.switch
    return model, slots


def test_crossover_routed_mode_runs_the_routed_experts_alone_in_the_graph_and_other_modes_restore_it():
    import torch
    from torch._dynamo.testing import CompileCounter

    from vllm_fse.bench.crossover import ALWAYS, FLOOR, set_mode
    from vllm_fse.bench.routed_only import ROUTED_ONLY_CONFIG, RoutedOnlySharedSlotExperts
    from vllm_fse.core.layer import LAYER_CLASS_KEY, SharedSlotExperts, layer_class

    # The hook: the bench config builds the bench layer; none, the core's; anything else is refused.
    assert layer_class(None) is layer_class({}) is SharedSlotExperts
    assert layer_class(ROUTED_ONLY_CONFIG) is RoutedOnlySharedSlotExperts
    with pytest.raises(ValueError, match="not a subclass of SharedSlotExperts"):
        layer_class({LAYER_CLASS_KEY: "torch.nn:Linear"})
    plain, _ = _moe_model(SharedSlotExperts)
    with pytest.raises(RuntimeError, match=LAYER_CLASS_KEY):
        set_mode(plain, FLOOR)  # a compiled graph without the routed branch would measure split
    set_mode(plain, "split")  # the lossless modes need no bench layer

    model, slots = _moe_model(RoutedOnlySharedSlotExperts)
    # As vLLM's compiled CPU mode: the layer's expert call traced whole (torch.cond on live buffers).
    counter = CompileCounter()
    traced = torch.compile(slots._op_entry, backend=counter, fullgraph=True)
    x, w = torch.rand(2, 4), torch.rand(2, 3)
    ids = torch.tensor([[0, 1, 2], [1, 2, 3]], dtype=torch.int32)
    r = x * (w * (ids + 1)).sum(1, keepdim=True)
    expected = {FLOOR: r, "split": r + 2 * x, "fused": r + 5 * x, "auto": r + 5 * x}  # auto: 2 <= 8 tokens
    for mode in (FLOOR, "split", "fused", "auto", FLOOR):
        set_mode(model, mode)
        slots.switch.reset_calls()
        torch.testing.assert_close(slots(x, w, ids), expected[mode], msg=f"{mode}, eager")
        torch.testing.assert_close(traced(x, w, ids), expected[mode], msg=f"{mode}, traced")
        # A routed-only step is no lossless path: counted neither in the op nor in the graph.
        path = {FLOOR: None, "split": "split"}.get(mode, "fused")
        assert slots.switch.calls == {p: 2 * (p == path) for p in ("fused", "split")}, mode
    assert counter.frame_count == 1  # one graph holds every mode: the flag is read live
    assert slots.switch.fused_max_tokens == 0  # FLOOR runs split underneath
    set_mode(model, "fused")
    assert slots.switch.fused_max_tokens == ALWAYS and not slots.routed_only
    set_mode(model, "auto")
    assert slots.switch.fused_max_tokens == 8  # back to the calibrated switch point


# -- engine-groups and the prefill profile (arms of in-process engines) ------------------------


def test_an_arms_compilation_config_must_name_an_arm_and_be_a_json_object():
    from vllm_fse.bench.engines import parse_compilation_configs

    parsed = parse_compilation_configs(['off_same={"inductor_compile_config": {"a": false}}'], ["off", "off_same"])
    assert parsed == {"off_same": {"inductor_compile_config": {"a": False}}}
    for bad, said in ((["auto={}"], "NAME one of"), (["off={"], "not JSON"), (["off=[1]"], "a JSON object")):
        with pytest.raises(SystemExit, match=said):
            parse_compilation_configs(bad, ["off", "off_same"])


def test_an_engine_arm_is_a_name_a_vllm_fse_value_and_its_environment():
    import argparse

    from vllm_fse.bench.engines import EngineArm, parse_engine_arm

    assert parse_engine_arm("split=auto,VLLM_FSE_FUSED_MAX_TOKENS=0") == EngineArm(
        "split", "auto", {"VLLM_FSE_FUSED_MAX_TOKENS": "0"}
    )
    for bad in ("off", "=0", "split=auto,VLLM_FSE_FUSED_MAX_TOKENS"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_engine_arm(bad)


def test_prefill_lengths_split_a_step_into_as_few_even_requests_as_fit():
    from vllm_fse.bench.engines import prefill_lengths

    assert prefill_lengths(4096, 2048) == [2048, 2048]
    assert prefill_lengths(5000, 2048) == [1667, 1667, 1666]
    assert prefill_lengths(256, 2048) == [256]


def test_the_aa_control_is_the_baseline_under_another_name_and_is_reported_against_it():
    from vllm_fse.bench.engine_groups import AA, arm_pairs, row_line, summarize, with_aa_control
    from vllm_fse.bench.engines import parse_engine_arm

    arms = with_aa_control([parse_engine_arm("off=0,X=1"), parse_engine_arm("auto=auto")])
    assert [(a.name, a.fse, a.env) for a in arms] == [("off", "0", {"X": "1"}), ("auto", "auto", {}), (AA, "0", {"X": "1"})]
    with pytest.raises(SystemExit, match="named 'aa'"):
        with_aa_control([parse_engine_arm("aa=0")])
    names = [a.name for a in arms]
    assert arm_pairs(names) == [("off", "auto"), ("off", AA), ("auto", AA)]
    # One engine per arm, built off, auto, aa; 4 cycles. auto is 10% slower than off; aa as off.
    off, auto, aa = [10.0, 11.0, 9.0, 10.0], [11.0, 12.1, 9.9, 11.0], [10.0, 11.0, 9.0, 10.0]
    steps = [[(ms, 5) for ms in off], [(ms, 7) for ms in auto], [(ms, 5) for ms in aa]]
    row = summarize(names, steps, names)
    assert row["engine_median_ms"] == {"off": [10.0], "auto": [11.0], AA: [10.0]}
    assert row["minor_faults_per_step"] == {"off": [5], "auto": [7], AA: [5]}
    # With one engine per arm the group ratio has no interval; the paired one, over the cycles, has.
    assert row["ratios"]["auto/off"]["ci"] is None
    assert row["ratios"]["auto/off"]["paired"]["ratio"] == pytest.approx(1.1)
    assert row["ratios"]["auto/off"]["paired"]["significant"]
    assert row["ratios"][f"{AA}/off"]["paired"]["ratio"] == pytest.approx(1.0)
    line = row_line("batch 1", row, "off")
    assert "aa/off 1.000" in line and "<- A/A control" in line and "minor faults per step off 5, auto 7, aa 5" in line


def test_engine_groups_with_several_engines_per_arm_put_their_spread_in_the_interval():
    from vllm_fse.bench.engine_groups import summarize

    names = ["off", "fused"]
    medians = {"off": [10.0, 10.4, 9.8], "fused": [9.2, 9.5, 9.0]}
    build = ["off", "fused"] * 3
    steps = [[(medians[arm][i // 2], 0)] * 3 for i, arm in enumerate(build)]
    row = summarize(build, steps, names)
    entry = row["ratios"]["fused/off"]
    assert "paired" not in entry and entry["ci"][0] < entry["ratio"] < entry["ci"][1] < 1.0
    assert row["engine_spread_pct"]["off"] > 0


def test_profiled_kernels_of_any_graph_or_cond_branch_are_one_operator():
    from vllm_fse.bench.profile_prefill import op_key

    assert op_key("graph_1_cpp_fused_add_mean_3") == op_key("cpp_fused_add_mean_12") == "cpp_fused_add_mean_N"
    assert op_key("_C::cpu_fused_moe") == "_C::cpu_fused_moe"


def test_prefill_profile_report_totals_categories_and_ranks_differences():
    from vllm_fse.bench.profile_prefill import report_lines

    per_step = {"off": {"_C::cpu_fused_moe": 10.0, "aten::mm": 5.0}, "auto": {"_C::cpu_fused_moe": 12.0, "aten::mm": 5.5}}
    calls = {"off": {"_C::cpu_fused_moe": 5, "aten::mm": 10}, "auto": {"_C::cpu_fused_moe": 5, "aten::mm": 10}}
    lines = report_lines(["off", "auto"], 4096, 2, {"off": [100.0], "auto": [103.0]}, {"off": [10], "auto": [30]},
                         per_step, calls, top=5)  # fmt: skip
    text = "\n".join(lines)
    assert "median wall ms): off 100.0, auto 103.0" in text and "faults per step (median): off 10, auto 30" in text
    assert "MoE experts kernel" in text and "GEMM" in text
    diff = lines.index("auto - off, self CPU ms per step (calls per step):")
    assert lines[diff + 1].split()[-1] == "_C::cpu_fused_moe"  # the largest difference first
    assert "total self CPU difference: +2.5 ms per step" in text
