"""What the CPU is: its model name and the vector ISA features that decide which kernels run.

Pure Python (no torch, no vLLM): the benchmark tools record it, and the auto switch point's cache
is keyed by it. Cloud machines report the same model name ("AMD EPYC") with and without AVX-512,
where bf16 GEMMs differ by several times, so the name alone says too little.
"""

from __future__ import annotations

import functools
import platform

# Features that change which CPU kernels vLLM, oneDNN and torch pick.
ISA_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "asimd", "sve")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_isa() -> list[str]:
    """The :data:`ISA_FEATURES` this CPU has, in that order."""
    flags = _cpuinfo()[1]
    return [f for f in ISA_FEATURES if f in flags]


def cpu_description() -> str:
    """``model [features]``, e.g. ``AMD EPYC [avx2]``."""
    return f"{cpu_model()} [{' '.join(cpu_isa()) or 'no listed vector features'}]"
