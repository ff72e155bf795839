"""GLM-4 MTP draft model with FSE on the real vLLM CPU engine: lossless speculative decoding,
same acceptance as FSE off, slots filled from the MTP layer's own shared experts."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import engine_run, run_engines, run_keyed_engines
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_fse.tiny_model import PRESETS

pytestmark = pytest.mark.e2e

SPEC = PRESETS["tiny-mtp"]
MTP_LAYER = SPEC.num_hidden_layers
N_SHARED = 2
MAX_TOKENS = 32


def _mtp(k: int) -> dict:
    return {"speculative_config": {"method": "mtp", "num_speculative_tokens": k}}


@pytest.fixture(scope="module")
def mtp_runs(tiny_model, tmp_path_factory):
    model = tiny_model("tiny-mtp", n_shared_experts=N_SHARED)
    runs = {"plain": engine_run(model, env={"VLLM_FSE": "0"}, max_tokens=MAX_TOKENS)}
    for k in (1, 2):
        for fse in ("0", "1"):
            runs[(k, fse)] = engine_run(
                model,
                env={"VLLM_FSE": fse},
                max_tokens=MAX_TOKENS,
                metrics=True,
                disable_log_stats=False,
                worker_probes=("describe_drafter",) + (("drafter_slot_weights",) if fse == "1" else ()),
                **_mtp(k),
            )
    return model, run_keyed_engines(runs, tmp_path_factory.mktemp("mtp"))


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("fse", ["0", "1"], ids=["fse-off", "fse-on"])
def test_speculative_decoding_is_lossless(mtp_runs, k, fse):
    _, results = mtp_runs
    plain = [o["token_ids"] for o in results["plain"]["outputs"]]
    spec = [o["token_ids"] for o in results[(k, fse)]["outputs"]]
    assert spec == plain


@pytest.mark.parametrize("k", [1, 2])
def test_acceptance_with_fse_equals_fse_off(mtp_runs, k):
    _, results = mtp_runs
    names = (
        "vllm:spec_decode_num_drafts",
        "vllm:spec_decode_num_draft_tokens",
        "vllm:spec_decode_num_accepted_tokens",
        "vllm:spec_decode_num_accepted_tokens_per_pos",
    )
    off = {n: results[(k, "0")]["metrics"][n] for n in names}
    on = {n: results[(k, "1")]["metrics"][n] for n in names}
    assert on == off
    # The tiny MTP layer is built to be accepted now and then: 0 would prove nothing.
    assert 0 < off["vllm:spec_decode_num_accepted_tokens"] < off["vllm:spec_decode_num_draft_tokens"]


@pytest.mark.parametrize("k", [1, 2])
def test_live_draft_model_has_the_shared_slots(mtp_runs, k):
    _, results = mtp_runs
    (on,) = results[(k, "1")]["describe_drafter"]
    (off,) = results[(k, "0")]["describe_drafter"]
    assert on["class"] == "vllm_fse.models.glm4_moe_mtp:FseGlm4MoeMTP"
    assert on["fse_path"] == "BACKEND_NEUTRAL"
    assert off["class"] == "vllm.model_executor.models.glm4_moe_mtp:Glm4MoeMTP" and off["fse_path"] is None
    (layer,) = on["moe_layers"]
    assert layer["name"] == f"model.layers.{MTP_LAYER}.mtp_block.mlp"
    assert layer["has_shared_experts_mlp"] is False
    assert layer["w13_shape"][0] == SPEC.n_routed_experts + N_SHARED
    assert layer["top_k"] == SPEC.num_experts_per_tok + N_SHARED
    assert off["moe_layers"][0]["w13_shape"][0] == SPEC.n_routed_experts


def test_draft_slots_hold_the_mtp_layers_own_shared_expert_chunks(mtp_runs):
    model, results = mtp_runs
    (slots,) = results[(2, "1")]["drafter_slot_weights"]
    got = slots[f"model.layers.{MTP_LAYER}.mtp_block.mlp"]
    inter = SPEC.moe_intermediate_size
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        p = f"model.layers.{MTP_LAYER}.mlp.shared_experts"
        gate, up, down = (f.get_tensor(f"{p}.{w}_proj.weight") for w in ("gate", "up", "down"))
    for j in range(N_SHARED):
        rows = slice(j * inter, (j + 1) * inter)
        expected_w13 = torch.cat([gate[rows], up[rows]]).float()
        # Repacked per expert by the CPU MoE kernel: compare values as multisets.
        assert torch.equal(got["w13"][j].flatten().sort().values, expected_w13.flatten().sort().values)
        assert torch.equal(got["w2"][j].flatten().sort().values, down[:, rows].float().flatten().sort().values)


def test_mtp_layer_without_shared_expert_tensors_fails_at_load(tiny_model, tmp_path):
    source = tiny_model("tiny-mtp", n_shared_experts=N_SHARED)
    target = tmp_path / "no-mtp-shared"
    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    for name in [n for n in tensors if n.startswith(f"model.layers.{MTP_LAYER}.mlp.shared_experts.")]:
        del tensors[name]
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    (result,) = run_engines([engine_run(target, env={"VLLM_FSE": "1"}, **_mtp(1))], tmp_path)
    error = result.get("error", "")
    assert error.startswith("MissingSlotWeightsError"), error
    for j in range(N_SHARED):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"layer {MTP_LAYER} slot {SPEC.n_routed_experts + j} {proj}.weight" in error


@pytest.mark.rocm
def test_rocm_aiter_fse_with_mtp_is_lossless(tiny_model, tmp_path):
    model = tiny_model("tiny-mtp", n_shared_experts=N_SHARED)
    aiter = {"VLLM_ROCM_USE_AITER": "1", "VLLM_ROCM_USE_AITER_MOE": "1", "VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS": "1"}
    plain, spec = run_engines(
        [
            engine_run(model, env=aiter, dtype="bfloat16", max_tokens=MAX_TOKENS),
            engine_run(model, env=aiter, dtype="bfloat16", max_tokens=MAX_TOKENS, worker_probes=("describe_drafter",), **_mtp(2)),
        ],
        tmp_path,
    )
    assert spec["describe_drafter"][0]["fse_path"] == "AITER"
    assert [o["token_ids"] for o in spec["outputs"]] == [o["token_ids"] for o in plain["outputs"]]
