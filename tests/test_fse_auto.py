"""``VLLM_FSE=auto`` on the real vLLM CPU engine, in vLLM's default (compiled) mode: lossless on
both sides of the switch point, both paths really run (counted in the live model), tensor
parallel ranks agree, the MTP draft switches too, the measured switch point is cached, and bad
values of the plugin's variables stop the engine with a message naming them.

A small forced switch point (``VLLM_FSE_FUSED_MAX_TOKENS=4``) makes prefill steps (the prompts
are longer than 4 tokens) run split and decode steps of the 4 prompts run fused. Compiled, both
paths are traced into the graph under ``torch.cond``; eager, they run inside the opaque op.
TP 1 compiles with Inductor, as vLLM does by default; the MTP draft and the cache test run the same
Dynamo graph on the eager backend (CI time: what they protect is traced, not generated code).
"""

from __future__ import annotations

import pytest
from conftest import DEFAULT_PROMPTS, DYNAMO_EAGER_BACKEND, SCORE_TEXTS, engine_run, run_engines
from equivalence import compare_outputs, compare_scores

from vllm_fse.tiny_model import PRESETS

pytestmark = pytest.mark.e2e

SWITCH = {"VLLM_FSE": "auto", "VLLM_FSE_FUSED_MAX_TOKENS": "4"}
COMPILED = {"enforce_eager": False}
N_SHARED = 2
assert len(DEFAULT_PROMPTS) == 4


def _switch_runs(model, dtype: str, tp: int) -> list[dict]:
    # TP 2 runs eager (CI time: two compiling workers per engine); the ranks' agreement on the
    # path does not depend on the mode, and TP 1 covers the compiled mode.
    common = dict(dtype=dtype, score_texts=SCORE_TEXTS, tensor_parallel_size=tp, **(COMPILED if tp == 1 else {}))
    return [
        engine_run(model, env={"VLLM_FSE": "0"}, probes=("describe_model",), **common),
        engine_run(
            model,
            env=SWITCH,
            probes=("describe_model", "reset_switch_calls"),
            after_probes=("switch_state",),
            **common,
        ),
    ]


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def switched(request, tiny_model, tmp_path_factory):
    """{dtype: (off, auto)} for one tensor-parallel size (fp32 compiled at TP 1, bf16 eager at TP 2:
    compiled engines are slow to start, and neither changes which path runs)."""
    tp = request.param
    model = tiny_model("tiny", n_shared_experts=N_SHARED, routed_scaling_factor=2.5)
    dtypes = ("float32",) if tp == 1 else ("bfloat16",)
    runs = [run for dtype in dtypes for run in _switch_runs(model, dtype, tp)]
    results = run_engines(runs, tmp_path_factory.mktemp(f"auto-tp{tp}"))
    for result in results:
        assert "error" not in result, result["traceback"]
    return tp, {dtype: (results[2 * i], results[2 * i + 1]) for i, dtype in enumerate(dtypes)}


def test_auto_is_lossless_on_both_sides_of_the_switch_point(switched):
    _, by_dtype = switched
    for dtype, (off, auto) in by_dtype.items():
        compare_outputs(off["outputs"], auto["outputs"], dtype)  # prefill split, decode fused
        compare_scores(off["scores"], auto["scores"], dtype)  # long prompts: split


def test_both_paths_ran_and_every_rank_took_the_same_ones(switched):
    tp, by_dtype = switched
    for dtype, (_, auto) in by_dtype.items():
        states = auto["after:switch_state"]
        assert len(states) == tp
        for state in states:
            assert state["auto"] and state["fused_max_tokens"] == 4
            assert state["source"] == "VLLM_FSE_FUSED_MAX_TOKENS=4"
            assert state["describe"] == "auto: fused for steps of <= 4 tokens, split above (VLLM_FSE_FUSED_MAX_TOKENS=4)"
            # Per MoE layer call during generation and scoring: decode fused, prefill split.
            assert state["calls"]["fused"] > 0 and state["calls"]["split"] > 0, (dtype, state)
            # Compiled (TP 1): both paths traced into the graph, chosen and counted there; eager
            # (TP 2): both paths inside the opaque op.
            if tp == 1:
                assert state["chosen_in"]["graph"] > 0 and state["chosen_in"]["op"] == 0, state
            else:
                assert state["chosen_in"]["op"] > 0 and state["chosen_in"]["graph"] == 0, state
        assert all(s["calls"] == states[0]["calls"] for s in states), states


def test_auto_model_holds_the_fused_layer_and_a_split_mlp(switched):
    tp, by_dtype = switched
    tiny = PRESETS["tiny"]
    for _, auto in by_dtype.values():
        for rank in auto["describe_model"]:
            assert rank["fse_path"] == "BACKEND_NEUTRAL"
            assert rank["compilation_backend"] == ("inductor" if tp == 1 else None)  # vLLM's default mode at TP 1
            if tp == 1:  # FSE in vLLM's compiled CPU mode: vllm_fse.patches, entries 6 and 10
                assert rank["inductor_reorder_for_peak_memory"] is False
                assert rank["freed_cpu_heap"].startswith("kept"), rank["freed_cpu_heap"]
            else:  # eager: no torch.cond branch, the process's allocator is left alone
                assert rank["freed_cpu_heap"] is None
            for layer in rank["moe_layers"]:
                assert layer["has_shared_experts_mlp"] is False and layer["has_split_mlp"] is True
                # Set by the model's post-load hook: one MLP of both shared experts' width has no
                # single slot to read, so it keeps its copy (tests/test_split_storage.py: where it reads one).
                assert layer["split_weights_slot"] is None
                assert layer["split_copy_reason"] == f"the split MLP spans {N_SHARED} slots"
                assert layer["w13_shape"][0] == tiny.n_routed_experts + N_SHARED
                assert layer["shared_slot_weight"] == pytest.approx(1 / 2.5)


def test_fse_off_leaves_vllms_compile_options_and_the_allocator_alone(switched):
    _, by_dtype = switched
    for off, _ in by_dtype.values():
        for rank in off["describe_model"]:
            assert rank["fse_path"] is None and rank["class"].startswith("vllm.model_executor.models.")
            assert rank["inductor_reorder_for_peak_memory"] is None
            assert rank["freed_cpu_heap"] is None  # the off engine ran first in its process


def test_the_plan_line_states_the_switch_point_and_the_split_copy(switched):
    _, by_dtype = switched
    for _, auto in by_dtype.values():
        assert "requested by VLLM_FSE=auto" in auto["log"]
        assert "auto: fused for steps of <= 4 tokens, split above (VLLM_FSE_FUSED_MAX_TOKENS=4); split path: one " \
               "dense shared-expert copy per MoE layer," in auto["log"]  # fmt: skip
        assert f"in all (the split MLP spans {N_SHARED} slots)" in auto["log"]


def test_mtp_draft_switches_too_and_decoding_stays_lossless(tiny_model, tmp_path):
    model = tiny_model("tiny-mtp", n_shared_experts=N_SHARED)
    mtp = {"speculative_config": {"method": "mtp", "num_speculative_tokens": 2}}
    # Traced: the draft's MoE layer has both paths under torch.cond too (Dynamo's graph on the eager
    # backend: CI time; TP 1 above runs Inductor's code of the same construct).
    common = dict(max_tokens=24, metrics=True, disable_log_stats=False, **COMPILED)
    # Speculative decoding with FSE off equals plain decoding (tests/test_mtp.py).
    off, auto = run_engines(
        [
            engine_run(model, env={"VLLM_FSE": "0", **DYNAMO_EAGER_BACKEND}, **common, **mtp),
            engine_run(
                model,
                env={**SWITCH, **DYNAMO_EAGER_BACKEND},
                worker_probes=("reset_drafter_switch_calls",),
                after_worker_probes=("drafter_switch_state",),
                probes=("describe_model", "reset_switch_calls"),
                after_probes=("switch_state",),
                **common,
                **mtp,
            ),
        ],
        tmp_path,
    )
    for result in (off, auto):
        assert "error" not in result, result["traceback"]
    assert [o["token_ids"] for o in auto["outputs"]] == [o["token_ids"] for o in off["outputs"]]
    accepted = "vllm:spec_decode_num_accepted_tokens"
    assert auto["metrics"][accepted] == off["metrics"][accepted] > 0
    assert auto["describe_model"][0]["compilation_backend"] == "eager"  # VLLM_CPU_CI_ENV still means this
    (target,) = auto["after:switch_state"]
    (draft,) = auto["after:drafter_switch_state"]
    # Target: verify steps carry 4 x 3 tokens (split); draft: 4-token proposal steps (fused),
    # and its pass over the prompts (split).
    for state in (target, draft):
        assert state["fused_max_tokens"] == 4
        assert state["calls"]["split"] > 0, state
        assert state["chosen_in"]["graph"] > 0 and state["chosen_in"]["op"] == 0, state
    assert draft["calls"]["fused"] > 0, draft


def test_measured_switch_point_is_cached_and_reused_by_model_and_draft(tiny_model, tmp_path):
    model = tiny_model("tiny-mtp")
    cache = tmp_path / "cache"
    env = {"VLLM_FSE": "auto", "VLLM_FSE_CACHE": str(cache)}
    probes = dict(after_probes=("switch_state",), after_worker_probes=("drafter_switch_state",), max_tokens=4,
                  speculative_config={"method": "mtp", "num_speculative_tokens": 2})  # fmt: skip
    # Measured by the traced engine (before its first forward, outside the graph; eager backend: CI
    # time), read back by the eager one (at its op's first call): the key holds no execution mode.
    first, second = run_engines(
        [
            engine_run(model, env={**env, **DYNAMO_EAGER_BACKEND}, **probes, **COMPILED),
            engine_run(model, env=env, **probes),
        ],
        tmp_path,
    )
    for result in (first, second):
        assert "error" not in result, result["traceback"]
    (measured,), (cached,) = first["after:switch_state"], second["after:switch_state"]
    assert measured["source"].startswith("measured at startup in ") and str(cache) in measured["source"]
    assert cached["source"] == f"cached in {cache / 'switch-points.json'}"
    assert cached["fused_max_tokens"] == measured["fused_max_tokens"]
    assert cached["measured"] == measured["measured"] and measured["measured"][0]["tokens"] == 1
    assert cached["resolve_s"] < 1.0
    assert measured["chosen_in"]["graph"] > 0 and cached["chosen_in"]["op"] > 0
    assert (cache / "switch-points.json").is_file()
    # The drafts resolve too. The traced draft's class is compiled as a whole (support_torch_compile
    # on the model class, whose __call__ then skips nn.Module hooks): unresolved, it ran split on
    # every step while the target ran fused.
    (traced_draft,), (eager_draft,) = first["after:drafter_switch_state"], second["after:drafter_switch_state"]
    for draft, ran_in in ((traced_draft, "graph"), (eager_draft, "op")):
        assert draft["fused_max_tokens"] is not None and draft["source"], draft
        assert draft["chosen_in"][ran_in] > 0, draft


BAD_VALUES = [
    ({"VLLM_FSE": "yes"}, "VLLM_FSE='yes' is not accepted: use 0 (unfused), 1 (always fused) or auto"),
    (
        {"VLLM_FSE": "auto", "VLLM_FSE_FUSED_MAX_TOKENS": "1e9x"},
        "VLLM_FSE_FUSED_MAX_TOKENS='1e9x' is not accepted: use a whole number of tokens >= 0",
    ),
    (
        {"VLLM_FSE": "auto", "VLLM_FSE_FUSED_MAX_TOKENS": "-2"},
        "VLLM_FSE_FUSED_MAX_TOKENS='-2' is not accepted: use a whole number of tokens >= 0",
    ),
    ({"VLLM_FSE": "1", "VLLM_FSE_SHARED_REPLICAS": "0"}, "VLLM_FSE_SHARED_REPLICAS='0' is not accepted: use a whole number >= 1"),
]


def test_bad_values_stop_the_engine_with_the_variable_named(tiny_model, tmp_path):
    results = run_engines([engine_run(tiny_model("tiny"), env=env) for env, _ in BAD_VALUES], tmp_path)
    for (_, message), result in zip(BAD_VALUES, results):
        assert result.get("error", "").startswith("FseSettingError: " + message), result.get("error")
