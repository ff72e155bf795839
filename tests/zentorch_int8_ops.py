"""zentorch's own int8 ops on plain tensors (run in a process with zentorch on PYTHONPATH: importing
it switches vLLM's platform): how FSE on and off quantize a shared expert's activations, and
zentorch's weight caches. Prints one JSON object; tests/test_quantized_int8.py asserts on it.

Usage: PYTHONPATH=.venv/zentorch .venv/bin/python tests/zentorch_int8_ops.py CHECKPOINT_DIR SHARED_PREFIX
(e.g. model.layers.1.mlp.shared_expert of tiny-qwen2-moe-int8).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
import zentorch  # noqa: F401  (registers torch.ops.zentorch)
from safetensors.torch import load_file

from quantized_probes import clear_zentorch_weight_caches

ZT = torch.ops.zentorch


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric dynamic int8 per token (vLLM's scaled_int8_quant): scale amax/127, round, dequantize."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 127.0
    return (xf / scale).round().clamp(-127, 127) * scale


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def qlinear(x, weight, scale):
    return ZT.zentorch_dynamic_qlinear(x, weight, scale.reshape(-1).to(torch.bfloat16).contiguous(), None)


def fused_moe(x, w13, w2, w13_scale, w2_scale, topk_ids, topk_weights):
    out = torch.empty_like(x)
    ZT.zentorch_fused_moe(
        out, x, w13, w2, None, None, topk_weights, topk_ids, False, "silu", w13_scale, w2_scale
    )  # fmt: skip
    return out


def shared_expert(checkpoint: str, prefix: str, tokens: int = 1024) -> dict[str, float]:
    """The checkpoint's shared expert on random bf16 tokens: unfused as vLLM runs it (merged gate/up
    and down through ``zentorch_dynamic_qlinear``, the whole width per token), fused as FSE runs it
    (``zentorch_fused_moe``, its slots as experts, each token to every slot with weight 1), exact
    (dequantized, float32, no activation quantization), and torch emulations of per-token int8."""
    t = load_file(f"{checkpoint}/model.safetensors")
    width = json.load(open(f"{checkpoint}/config.json"))["moe_intermediate_size"]
    (g, gs), (u, us), (w2, s2) = ((t[f"{prefix}.{p}.weight"], t[f"{prefix}.{p}.weight_scale"]) for p in ("gate_proj", "up_proj", "down_proj"))
    n = g.shape[0] // width
    x = torch.randn(tokens, g.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def deq(w, s):
        return w.float() * s.float()

    rows = [slice(j * width, (j + 1) * width) for j in range(n)]
    # Unfused: SiluAndMul in bf16 between the two int8 linears.
    gate_up = qlinear(x, torch.cat([g, u]), torch.cat([gs, us]))
    h = (F.silu(gate_up[:, : g.shape[0]].float()) * gate_up[:, g.shape[0] :].float()).to(torch.bfloat16)
    unfused = qlinear(h, w2, s2)
    fused = fused_moe(
        x,
        torch.stack([torch.cat([g[r], u[r]]) for r in rows]).contiguous(),
        torch.stack([w2[:, r] for r in rows]).contiguous(),
        torch.stack([torch.cat([gs[r], us[r]]).float().flatten() for r in rows]).contiguous(),
        torch.stack([s2.float().flatten()] * n).contiguous(),
        torch.arange(n, dtype=torch.int32).expand(tokens, n).contiguous(),
        torch.ones(tokens, n),
    )
    exact_h = F.silu(x.float() @ deq(g, gs).T) * (x.float() @ deq(u, us).T)
    exact = exact_h @ deq(w2, s2).T
    # Emulations of the down projection's input quantization: per token over the whole width (the
    # unfused down projection) or over each slot's share (one expert of the fused kernel). Fed the
    # same bf16 intermediate as the op they are compared with (a bf16 rounding upstream moves
    # int8 rounding decisions): the unfused one's h, and for the fused kernel gate/up from the
    # per-token int8 input in float32, SiluAndMul, rounded once to bf16.
    def down(intermediate, per_slot):
        if per_slot:
            return sum(fake_quant_per_token(intermediate[:, r]) @ deq(w2[:, r], s2).T for r in rows)
        return fake_quant_per_token(intermediate) @ deq(w2, s2).T

    xq = fake_quant_per_token(x)
    h_fused = (F.silu(xq @ deq(g, gs).T) * (xq @ deq(u, us).T)).to(torch.bfloat16)
    return {
        "slots": n,
        "unfused_vs_exact": rel(unfused, exact),
        "fused_vs_exact": rel(fused, exact),
        "fused_vs_unfused": rel(fused, unfused),
        "unfused_vs_emulated_whole_width": rel(unfused, down(h, per_slot=False)),
        "unfused_vs_emulated_per_slot": rel(unfused, down(h, per_slot=True)),
        "fused_vs_emulated_per_slot": rel(fused, down(h_fused, per_slot=True)),
        "fused_vs_emulated_whole_width": rel(fused, down(h_fused, per_slot=False)),
    }


def weight_caches() -> dict[str, float]:
    """New int8 values written into weight buffers zentorch has computed with (the same addresses):
    relative error of the next call vs the same values in fresh buffers, without and after
    :func:`quantized_probes.clear_zentorch_weight_caches`."""
    gen = torch.Generator().manual_seed(1)

    def int8(*shape):
        return torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)

    x = torch.randn(16, 256, generator=gen).to(torch.bfloat16)
    scale = torch.full((512,), 0.01, dtype=torch.bfloat16)
    experts, hidden, inter = 4, 256, 64
    ids = torch.tensor([[0, 1]] * 16, dtype=torch.int32)
    weights = torch.full((16, 2), 0.5)
    w13_scale, w2_scale = torch.full((experts, 2 * inter), 0.01), torch.full((experts, hidden), 0.01)
    out = {}
    for clear in (False, True):
        w = int8(512, 256)
        qlinear(x, w, scale)
        w13, w2 = int8(experts, 2 * inter, hidden), int8(experts, hidden, inter)
        fused_moe(x, w13, w2, w13_scale, w2_scale, ids, weights)
        new_w, new_w13, new_w2 = int8(512, 256), int8(experts, 2 * inter, hidden), int8(experts, hidden, inter)
        w.copy_(new_w), w13.copy_(new_w13), w2.copy_(new_w2)
        if clear:
            clear_zentorch_weight_caches()
        linear_stale, moe_stale = qlinear(x, w, scale), fused_moe(x, w13, w2, w13_scale, w2_scale, ids, weights)
        clear_zentorch_weight_caches()
        tag = "after_clearing" if clear else "without_clearing"
        out[f"linear_{tag}"] = rel(linear_stale, qlinear(x, new_w.clone(), scale))
        out[f"fused_moe_{tag}"] = rel(moe_stale, fused_moe(x, new_w13.clone(), new_w2.clone(), w13_scale, w2_scale, ids, weights))
    return out


if __name__ == "__main__":
    print(json.dumps({"shared_expert": shared_expert(sys.argv[1], sys.argv[2]), "weight_caches": weight_caches()}))
