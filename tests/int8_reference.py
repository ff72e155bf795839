"""A reference for INT8 W8A8 checkpoints that has no activation quantization: the same checkpoint
dequantized offline (int8 weight x per-channel scale, exact in float32), run unfused in float32.

FSE on and FSE off of an INT8 checkpoint both quantize activations per token, but not the same
vectors: the unfused shared MLP quantizes the down projection's whole input (the shared width) per
token, the fused MoE kernel each slot's share of it. So the two arms differ by where the int8
noise falls; :func:`errors_vs_reference` measures how far each arm is from the reference.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def dequantized_checkpoint(source: Path, target: Path) -> Path:
    """Copy of the INT8 checkpoint ``source`` at ``target`` with every int8 ``weight`` replaced by
    ``weight * weight_scale`` in float32 (exact: 8 bits times a bf16 scale) and no
    ``quantization_config``."""
    if (target / "model.safetensors").exists():
        return target
    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale"):
            continue
        scale = tensors.get(name + "_scale")
        if scale is not None:
            assert t.dtype == torch.int8 and scale.shape == (t.shape[0], 1), (name, t.dtype, scale.shape)
            t = t.float() * scale.float()
        out[name] = t
    save_file(out, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    del config["quantization_config"]
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def errors_vs_reference(arm: list[dict], reference: list[dict]) -> dict:
    """Teacher-forced scores of the same texts: per position, |logprob of the actual next token|
    difference to the reference, and whether the top token is the reference's."""
    deltas: list[float] = []
    agree = 0
    for sa, sr in zip(arm, reference, strict=True):
        assert sa["token_ids"] == sr["token_ids"]
        for tok, lp_a, lp_r in zip(sa["token_ids"], sa["logprobs"], sr["logprobs"]):
            if not lp_r:  # the first token has no logprob
                continue
            deltas.append(abs(lp_a[tok] - lp_r[tok]))
            agree += max(lp_a, key=lp_a.get) == max(lp_r, key=lp_r.get)
    deltas.sort()
    return {
        "positions": len(deltas),
        "top1_agreement": agree / len(deltas),
        "mean": statistics.fmean(deltas),
        "median": statistics.median(deltas),
        "p90": deltas[int(0.9 * (len(deltas) - 1))],
        "max": deltas[-1],
    }


def main(out_dir: str) -> None:
    """The measurement behind tests/test_quantized_int8.py's bounds, with the deliberate bug
    (``swapped``: two shared slots' gate/up scales swapped in the kernel) as a fourth arm; each
    engine in its own process, two at a time. Prints each arm's error vs the reference."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import run_engines
    from test_quantized_int8 import _process_env, int8_engine_run

    from vllm_fse.tiny_model import PRESETS, write_tiny_model

    out = Path(out_dir)
    runs = {}
    for preset in ("tiny-qwen2-moe-int8", "tiny-deepseek-v2-int8"):
        model = write_tiny_model(out / preset, PRESETS[preset])
        reference = dequantized_checkpoint(model, out / f"{preset}-dequantized")
        runs[preset, "on"] = int8_engine_run(model, "on")
        runs[preset, "off"] = int8_engine_run(model, "off")
        runs[preset, "reference"] = int8_engine_run(reference, "reference")
        runs[preset, "swapped"] = int8_engine_run(
            model, "on", probes=("quantized_probes:swap_first_two_shared_slots_w13_scales",)
        )
        # FSE on vs off without int8 (the dequantized weights in bf16): what bf16 alone parts.
        runs[preset, "bf16-on"] = int8_engine_run(reference, "on")
        runs[preset, "bf16-off"] = int8_engine_run(reference, "off")

    def run_alone(key):
        work = out / "-".join(key)
        work.mkdir(parents=True, exist_ok=True)
        (result,) = run_engines([runs[key]], work, process_env=_process_env())
        assert "error" not in result, f"{key}: {result['traceback']}"
        return result

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(runs, pool.map(run_alone, runs)))
    def rounded(stats):
        return {k: round(v, 4) for k, v in stats.items()}

    for (preset, arm), result in results.items():
        if arm != "reference":
            print(preset, arm, "vs reference", rounded(errors_vs_reference(result["scores"], results[preset, "reference"]["scores"])))
    for preset, pair in {key[0]: None for key in results}.items():
        for on, off in (("on", "off"), ("bf16-on", "bf16-off")):
            print(preset, on, "vs", off, rounded(errors_vs_reference(results[preset, on]["scores"], results[preset, off]["scores"])))


if __name__ == "__main__":
    import sys

    main(sys.argv[1])
