"""The on-disk cache of measured switch points, keyed by everything the timings depend on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vllm_fse.auto.switch_point import SwitchedLayer
from vllm_fse.hardware import cpu_description

# Part of the cache key: a change of the calibration rule (vllm_fse.auto.calibration) re-measures
# instead of reusing old switch points.
CALIBRATION_RULE = 2

CACHE_FILE = "switch-points.json"


def device_description(device: torch.device) -> str:
    """The device model, on CPU with its vector ISA features (see :mod:`vllm_fse.hardware`)."""
    if device.type != "cpu":
        return f"{device.type}:{torch.cuda.get_device_name(device)}"
    return cpu_description()


def cache_key(layer: SwitchedLayer, x: torch.Tensor) -> str:
    """Everything the timings depend on: machine, build, layer shapes, dtype, TP, kernels."""
    from vllm import __version__ as vllm_version

    from vllm_fse.version import __version__ as fse_version

    routed = layer.runner.routed_experts
    cfg = layer.runner.moe_config
    return json.dumps(
        {
            "device": device_description(x.device),
            "threads": torch.get_num_threads() if x.device.type == "cpu" else None,
            "dtype": str(x.dtype).removeprefix("torch."),
            "tp": cfg.tp_size,
            "hidden": int(x.shape[-1]),
            "w13": list(routed.w13_weight.shape),
            "w2": list(routed.w2_weight.shape),
            "experts": f"{layer.n_routed}+{layer.n_shared}" + (f"x{layer.replicas}" if layer.replicas > 1 else "")
            + (" gated" if layer.gate is not None else ""),
            "kernel": type(routed.quant_method).__name__,
            "max_num_batched_tokens": layer.switch.max_num_batched_tokens,
            "rule": CALIBRATION_RULE,
            "versions": f"vllm {vllm_version}, torch {torch.__version__}, vllm-fse {fse_version}",
        },
        sort_keys=True,
    )


def read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_cache(path: Path, key: str, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = read_cache(path)
    cache[key] = entry
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(path)
