"""Bad shared-expert tensors fail at load with vllm_fse.loading's error on the real engine,
never with a shape assert from deep inside vLLM or with silently zero slots."""

from __future__ import annotations

import pytest
from conftest import edited_checkpoint, engine_run, run_engines

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def load_failures(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-checkpoints")
    source = tiny_model("tiny", n_shared_experts=2)
    p = "model.layers.2.mlp.shared_experts"

    def unsplittable(t):  # 63 columns cannot be cut into 2 shared experts
        t[f"{p}.down_proj.weight"] = t[f"{p}.down_proj.weight"][:, :63].contiguous()

    def missing(t):
        del t["model.layers.1.mlp.shared_experts.up_proj.weight"]

    runs = [
        engine_run(edited_checkpoint(source, tmp / "unsplittable", unsplittable), env={"VLLM_FSE": "1"}),
        engine_run(edited_checkpoint(source, tmp / "missing", missing), env={"VLLM_FSE": "1"}),
    ]
    unsplittable_result, missing_result = run_engines(runs, tmp)
    return {"unsplittable": unsplittable_result, "missing": missing_result}


def test_unsplittable_shared_expert_fails_with_the_splitters_error(load_failures):
    error = load_failures["unsplittable"].get("error", "")
    assert error.startswith("SharedExpertWeightError"), error
    assert "model.layers.2.mlp.shared_experts.down_proj.weight" in error
    assert "[64, 63]" in error and "n_shared_experts=2" in error
    assert "dim 1 of size 63 is not divisible" in error


def test_missing_shared_expert_tensor_fails_slot_verification(load_failures):
    error = load_failures["missing"].get("error", "")
    assert error.startswith("MissingSlotWeightsError"), error
    assert "2 fused shared-expert slot tensor(s) were never loaded" in error
    assert "layer 1 slot 8 up_proj.weight" in error and "layer 1 slot 9 up_proj.weight" in error
