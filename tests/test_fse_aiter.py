"""The ROCm AITER path: wiring checked on CPU with AITER faked; end to end on ROCm CI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ENGINE_ENV, SCORE_TEXTS, TESTS_DIR, engine_run, run_engines
from equivalence import compare_outputs, compare_scores
from safetensors import safe_open

from vllm_fse.tiny_model import PRESETS

TINY = PRESETS["tiny"]
N_SHARED = 2


def _wiring(model_dir, tmp_path, drop: str | None = None) -> dict:
    result_path = tmp_path / f"aiter-{'drop' if drop else 'ok'}.pt"
    proc = subprocess.run(
        [sys.executable, str(TESTS_DIR / "aiter_wiring_child.py"), str(model_dir), str(result_path), *([drop] if drop else [])],
        env={**os.environ, **ENGINE_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = torch.load(result_path, weights_only=False)
    result["log"] = proc.stdout + proc.stderr
    return result


# GLM-4.x and DeepSeek-V3 (same sizes, routed_scaling_factor 2.5): one hook per upstream module.
@pytest.fixture(scope="module", params=["tiny", "tiny-deepseek-v3"])
def wiring(request, tiny_model, tmp_path_factory):
    model_dir = tiny_model(request.param, n_shared_experts=N_SHARED)
    return model_dir, _wiring(model_dir, tmp_path_factory.mktemp("aiter"))


@pytest.mark.e2e
def test_aiter_path_builds_fusedmoe_with_the_shared_slots(wiring):
    _, result = wiring
    describe = result["describe"]
    assert describe["fse_path"] == "AITER"
    for layer in describe["moe_layers"]:
        assert layer["has_shared_experts_mlp"] is False
        assert layer["w13_shape"][0] == layer["w2_shape"][0] == TINY.n_routed_experts + N_SHARED
    assert result["num_fused_shared_experts"] == N_SHARED
    # AITER's top-k buffer puts the shared slots after the routed ids, at score 1.0.
    for call in result["aiter_topk_buffers"]:
        assert call["n_routed_experts"] == TINY.n_routed_experts
        assert call["n_shared_experts"] == N_SHARED
        assert call["shared_experts_score"] == 1.0


@pytest.mark.e2e
def test_aiter_path_applies_routed_scaling_factor_to_routed_slots_only(wiring):
    """The seed PR's 48-point gsm8k bug: the runner must not scale the output (shared slot
    included) by rsf; rsf goes into the routed weights, the shared slot stays at 1.0."""
    _, result = wiring
    assert result["runner_routed_scaling_factor"] == 1.0
    assert result["router_routed_scaling_factor"] == TINY.routed_scaling_factor == 2.5
    assert "shared-slot weight 1.0, routed_scaling_factor applied by AITER" in result["log"]


@pytest.mark.e2e
def test_aiter_path_loads_the_checkpoint_chunks_into_the_slots(wiring):
    model_dir, result = wiring
    assert "load_error" not in result, result.get("load_error")
    inter = TINY.moe_intermediate_size
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for layer in range(TINY.first_k_dense_replace, TINY.num_hidden_layers):
            p = f"model.layers.{layer}.mlp.shared_experts"
            gate, up, down = (f.get_tensor(f"{p}.{w}_proj.weight") for w in ("gate", "up", "down"))
            slots = result["slots"][f"model.layers.{layer}.mlp"]
            for j in range(N_SHARED):
                rows = slice(j * inter, (j + 1) * inter)
                # Not repacked: nothing ran process_weights_after_loading here.
                assert torch.equal(slots["w13"][j], torch.cat([gate[rows], up[rows]]).float())
                assert torch.equal(slots["w2"][j], down[:, rows].float())


@pytest.mark.e2e
def test_aiter_path_refuses_a_checkpoint_missing_shared_expert_tensors(wiring, tmp_path):
    model_dir, _ = wiring
    result = _wiring(model_dir, tmp_path, drop="model.layers.2.mlp.shared_experts.down_proj.weight")
    error = result.get("load_error", "")
    assert error.startswith("MissingSlotWeightsError")
    assert "layer 2 slot 8 down_proj.weight" in error and "layer 2 slot 9 down_proj.weight" in error


# -- real hardware (skipped elsewhere by the markers, see conftest.py) -----------------------

AITER_FSE_ENV = {
    "VLLM_ROCM_USE_AITER": "1",
    "VLLM_ROCM_USE_AITER_MOE": "1",
}


@pytest.mark.rocm
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_rocm_aiter_fse_matches_unfused(tiny_model, tmp_path, dtype):
    model = tiny_model("tiny", n_shared_experts=N_SHARED)
    off, on = run_engines(
        [
            engine_run(model, env={**AITER_FSE_ENV, "VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS": "0"}, dtype=dtype, score_texts=SCORE_TEXTS),
            engine_run(
                model,
                env={**AITER_FSE_ENV, "VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS": "1"},
                dtype=dtype,
                score_texts=SCORE_TEXTS,
                probes=("describe_model",),
            ),
        ],
        tmp_path,
    )
    assert on["describe_model"][0]["fse_path"] == "AITER"
    compare_outputs(off["outputs"], on["outputs"], dtype)
    compare_scores(off["scores"], on["scores"], dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_backend_neutral_fse_matches_unfused(tiny_model, tmp_path, dtype):
    model = tiny_model("tiny", n_shared_experts=N_SHARED)
    off, on = run_engines(
        [
            engine_run(model, env={"VLLM_FSE": "0"}, dtype=dtype, score_texts=SCORE_TEXTS),
            engine_run(model, env={"VLLM_FSE": "1"}, dtype=dtype, score_texts=SCORE_TEXTS, probes=("describe_model",)),
        ],
        tmp_path,
    )
    assert on["describe_model"][0]["fse_path"] == "BACKEND_NEUTRAL"
    compare_outputs(off["outputs"], on["outputs"], dtype)
    compare_scores(off["scores"], on["scores"], dtype)
