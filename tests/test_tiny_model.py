"""The embedded tiny GLM-4 MoE checkpoint has the real GLM layout and is fit for equivalence tests."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from vllm_fse.tiny_model import EOS_TOKEN, PRESETS, write_tiny_model

pytestmark = pytest.mark.unit


def _tensors(model_dir) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _digest(model_dir) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model_dir.iterdir())
        if p.is_file()
    }


def test_same_spec_gives_byte_identical_files_and_seed_changes_weights(tmp_path):
    spec = PRESETS["tiny-mtp"]
    a = _digest(write_tiny_model(tmp_path / "a", spec))
    b = _digest(write_tiny_model(tmp_path / "b", spec))
    c = _digest(write_tiny_model(tmp_path / "c", dataclasses.replace(spec, seed=1)))
    assert a == b
    assert c["model.safetensors"] != a["model.safetensors"]
    assert c["tokenizer.json"] == a["tokenizer.json"]


@pytest.mark.parametrize("n_shared", [1, 2, 3])
def test_layout_matches_real_glm_checkpoint(tmp_path, n_shared):
    spec = dataclasses.replace(PRESETS["tiny-mtp"], n_shared_experts=n_shared)
    t = _tensors(write_tiny_model(tmp_path, spec))
    h, inter, n = spec.hidden_size, spec.moe_intermediate_size, spec.num_hidden_layers
    for layer in range(n + spec.mtp_layers):
        p = f"model.layers.{layer}.mlp"
        if layer < spec.first_k_dense_replace:
            assert t[f"{p}.gate_proj.weight"].shape == (spec.intermediate_size, h)
            assert not any(k.startswith(f"{p}.experts") for k in t)
            continue
        experts = {int(m.group(1)) for k in t if (m := re.match(rf"{re.escape(p)}\.experts\.(\d+)\.", k))}
        assert experts == set(range(spec.n_routed_experts))
        for e in range(spec.n_routed_experts):
            assert t[f"{p}.experts.{e}.gate_proj.weight"].shape == (inter, h)
            assert t[f"{p}.experts.{e}.up_proj.weight"].shape == (inter, h)
            assert t[f"{p}.experts.{e}.down_proj.weight"].shape == (h, inter)
        # Shared experts are one MLP, widened n_shared times.
        assert t[f"{p}.shared_experts.gate_proj.weight"].shape == (inter * n_shared, h)
        assert t[f"{p}.shared_experts.up_proj.weight"].shape == (inter * n_shared, h)
        assert t[f"{p}.shared_experts.down_proj.weight"].shape == (h, inter * n_shared)
        assert t[f"{p}.gate.weight"].shape == (spec.n_routed_experts, h)
        assert t[f"{p}.gate.e_score_correction_bias"].shape == (spec.n_routed_experts,)
    mtp = f"model.layers.{n}"
    assert t[f"{mtp}.eh_proj.weight"].shape == (h, 2 * h)
    for name in ("enorm", "hnorm", "shared_head.norm"):
        assert t[f"{mtp}.{name}.weight"].shape == (h,)
    assert t[f"{mtp}.shared_head.head.weight"].shape == (spec.vocab_size, h)
    assert f"model.layers.{n + 1}.eh_proj.weight" not in t


def test_without_mtp_there_is_no_layer_beyond_num_hidden_layers(tmp_path):
    spec = PRESETS["tiny"]
    t = _tensors(write_tiny_model(tmp_path, spec))
    assert not any(k.startswith(f"model.layers.{spec.num_hidden_layers}.") for k in t)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype_knob_sets_tensor_and_config_dtype(tmp_path, dtype):
    spec = dataclasses.replace(PRESETS["tiny"], dtype=dtype)
    model_dir = write_tiny_model(tmp_path, spec)
    assert {str(v.dtype) for v in _tensors(model_dir).values()} == {f"torch.{dtype}"}
    assert json.loads((model_dir / "config.json").read_text())["torch_dtype"] == dtype


def test_tokenizer_vocabulary_matches_the_model_and_round_trips_text(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    model_dir = write_tiny_model(tmp_path, PRESETS["tiny"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    assert len(tok) == config.vocab_size == PRESETS["tiny"].vocab_size
    text = "What is the capital of France? Paris, of course."
    assert tok.decode(tok(text).input_ids) == text
    assert tok.eos_token == EOS_TOKEN and config.eos_token_id == tok.eos_token_id


def test_cli_knobs_reach_the_config(tmp_path):
    out = tmp_path / "m"
    subprocess.run(
        [
            sys.executable, "-m", "vllm_fse.cli", "tiny-model", str(out),
            "--n-shared-experts", "2", "--routed-scaling-factor", "1.0",
            "--norm-topk-prob", "false", "--num-hidden-layers", "4",
            "--n-routed-experts", "16", "--dtype", "bfloat16", "--mtp-layers", "1",
        ],
        check=True,
        capture_output=True,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["n_shared_experts"] == 2
    assert config["routed_scaling_factor"] == 1.0
    assert config["norm_topk_prob"] is False
    assert config["num_hidden_layers"] == 4
    assert config["n_routed_experts"] == 16
    assert config["torch_dtype"] == "bfloat16"
    assert config["num_nextn_predict_layers"] == 1


def test_logits_are_peaked_and_the_shared_expert_matters(tmp_path):
    """Random weights must not give flat logits, or any two implementations would agree."""
    from transformers import AutoModelForCausalLM

    model_dir = write_tiny_model(tmp_path, PRESETS["tiny"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logprobs = model(ids).logits.log_softmax(-1)
        top2 = logprobs.topk(2, dim=-1).values
        # Flat would be log(1/512) = -6.2 for every token.
        assert top2[..., 0].exp().mean() > 0.2
        assert (top2[..., 0] - top2[..., 1]).mean() > 0.5
        # Zeroing the shared experts must move the logits a lot: an FSE slot with a wrong
        # weight or zero weights cannot hide.
        for layer in model.model.layers:
            if hasattr(layer.mlp, "shared_experts"):
                layer.mlp.shared_experts.down_proj.weight.zero_()
        changed = model(ids).logits.log_softmax(-1)
        assert (changed - logprobs).abs().max() > 1.0
        assert (changed.argmax(-1) != logprobs.argmax(-1)).float().mean() > 0.1
