"""Operator categories of a torch profile, shared by the decode and prefill profiles."""

from __future__ import annotations

# Operator categories (CPU build names; first match wins). vLLM's default CPU mode runs the model
# as one compiled graph, so time is attributed per operator rather than per module: the unfused
# shared-expert MLP shows up as extra GEMM calls, FSE's extra slot as expert-kernel time.
CATEGORIES = (
    ("MoE experts kernel", ("cpu_fused_moe", "fused_moe", "fused_experts")),
    ("GEMM", ("onednn_mm", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "gemm")),
    ("attention", ("attention", "attn", "kv_cache")),
    ("routing", ("topk", "sigmoid", "softmax", "grouped_topk")),
    ("norm and activation", ("rms_norm", "silu", "gelu", "layer_norm")),
    ("graph and Python glue", ("CompiledFxGraph", "Pregraph", "AOTDispatcher", "Torch-Compiled Region")),
)
OTHER = "other"


def category(op_name: str) -> str:
    lowered = op_name.lower()
    for name, needles in CATEGORIES:
        if any(n.lower() in lowered for n in needles):
            return name
    return OTHER
