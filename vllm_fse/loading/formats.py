"""Weight formats of the shared-expert tensors that the splitter knows how to cut into slots.

Pure Python: the format is read from the checkpoint's ``quantization_config`` (the dict in
``config.json``), so the decision whether FSE can work is made before any weight is read.
"""

from __future__ import annotations

import enum
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


class FormatKind(enum.Enum):
    UNQUANTIZED = "unquantized"
    FP8_BLOCK = "fp8 block-quantized"
    FP8_PER_TENSOR = "fp8 per-tensor"
    PER_CHANNEL = "per-channel quantized"


@dataclass(frozen=True)
class SharedExpertFormat:
    """What tensors a shared-expert projection has and how each one splits.

    ``tensors`` maps the checkpoint suffix after ``{proj}.`` (``weight``, ``weight_scale_inv``,
    ...) to how it splits; ``weight`` itself is always split along the intermediate dim.
    """

    kind: FormatKind
    tensors: tuple[tuple[str, ScaleSplit | None], ...] = (("weight", None),)
    block_size: tuple[int, int] | None = None  # (rows, cols) of a quantization block

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
    )


def _weight_and_scale(kind: FormatKind, scale_split: ScaleSplit, static_activation_scale: bool) -> SharedExpertFormat:
    tensors: tuple[tuple[str, ScaleSplit | None], ...] = (("weight", None), ("weight_scale", scale_split))
    if static_activation_scale:  # one activation scale per projection: every slot gets it
        tensors += (("input_scale", ScaleSplit.WHOLE),)
    return SharedExpertFormat(kind, tensors)


def fp8_per_tensor(static_activation_scale: bool) -> SharedExpertFormat:
    return _weight_and_scale(FormatKind.FP8_PER_TENSOR, ScaleSplit.WHOLE, static_activation_scale)


def per_channel(static_activation_scale: bool) -> SharedExpertFormat:
    return _weight_and_scale(FormatKind.PER_CHANNEL, ScaleSplit.OUTPUT_CHANNELS, static_activation_scale)


def _excludes_shared_experts(patterns: list[str] | None) -> str | None:
    for pattern in patterns or ():
        if "shared_expert" in pattern:
            return pattern
    return None


def shared_expert_format(quantization_config: dict | None) -> SharedExpertFormat:
    """The shared experts' format from a HF ``quantization_config`` dict (None: unquantized).

    Raises :class:`UnsupportedSharedExpertFormat`, naming the format, for anything else.
    """
    if not quantization_config:
        return UNQUANTIZED
    method = quantization_config.get("quant_method")
    if method == "fp8":
        excluded = _excludes_shared_experts(
            quantization_config.get("ignored_layers") or quantization_config.get("modules_to_not_convert")
        )
        if excluded:
            raise UnsupportedSharedExpertFormat(
                f"fp8 checkpoint keeps the shared experts unquantized ({excluded!r} is ignored) "
                "while the routed experts are fp8: one fused tensor cannot hold both"
            )
        static = quantization_config.get("activation_scheme", "dynamic") == "static"
        block = quantization_config.get("weight_block_size")
        if block is not None:
            if static:
                raise UnsupportedSharedExpertFormat(
                    "fp8 block-quantized weights with static activation scales"
                )
            return fp8_block(tuple(block))
        return fp8_per_tensor(static_activation_scale=static)
    if method == "compressed-tensors":
        return _compressed_tensors_format(quantization_config)
    raise UnsupportedSharedExpertFormat(f"quantization method {method!r}")


def _compressed_tensors_format(config: dict) -> SharedExpertFormat:
    excluded = _excludes_shared_experts(config.get("ignore"))
    if excluded:
        raise UnsupportedSharedExpertFormat(
            f"compressed-tensors checkpoint ignores {excluded!r}: shared and routed experts "
            "differ in format"
        )
    groups = list((config.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise UnsupportedSharedExpertFormat(
            f"compressed-tensors with {len(groups)} config groups (only one is supported)"
        )
    weights = groups[0].get("weights") or {}
    activations = groups[0].get("input_activations") or {}
    strategy, bits, kind = weights.get("strategy"), weights.get("num_bits"), weights.get("type")
    described = f"compressed-tensors {kind}{bits} weights with strategy {strategy!r}"
    static = bool(activations) and not activations.get("dynamic", True)
    if static and activations.get("strategy") != "tensor":
        raise UnsupportedSharedExpertFormat(f"{described} and static {activations.get('strategy')} activation scales")
    if bits != 8:
        raise UnsupportedSharedExpertFormat(described)
    if strategy == "channel":
        return per_channel(static_activation_scale=static)
    if strategy == "tensor" and kind == "float":
        return fp8_per_tensor(static_activation_scale=static)
    if strategy == "block" and kind == "float":
        if static:
            raise UnsupportedSharedExpertFormat(f"{described} and static activation scales")
        return fp8_block(tuple(weights["block_structure"]), scale_suffix="weight_scale")
    raise UnsupportedSharedExpertFormat(described)
