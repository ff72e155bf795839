"""Split the checkpoint's packed shared-expert tensors into appended routed-expert slots.

GLM-4.x and DeepSeek-V2/V3 (and the models built on them) pack their ``n_shared_experts`` shared
experts into one MLP:
``mlp.shared_experts.{gate,up}_proj.weight`` is ``[moe_intermediate_size * n_shared, hidden]`` and
``down_proj.weight`` is ``[hidden, moe_intermediate_size * n_shared]``. Chunk ``j`` of the
intermediate dim is shared expert ``j``, which FSE loads as routed slot
``mlp.experts.{n_routed_experts + j}`` (and, with replicas, also as slot
``n_routed_experts + r * n_shared + j`` of replica ``r``). (The packed MLP computes the sum of the chunks' outputs,
so routing a token to every slot at weight 1 reproduces it exactly.)

Qwen2-MoE, Qwen3-Next and Qwen3.5 name the MLP ``mlp.shared_expert`` (one gated MLP of width
``shared_expert_intermediate_size``): its width need not be a multiple of the slot width, and the
last chunk is then zero-padded (zero rows of gate/up and zero columns of down add nothing).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from vllm_fse.loading.formats import (
    UNQUANTIZED,
    ScaleSplit,
    SharedExpertFormat,
    UnsupportedSharedExpertFormat,
)


class SharedExpertWeightError(ValueError):
    """A shared-expert tensor that contradicts the model config or the weight format."""


class MissingSlotWeightsError(SharedExpertWeightError):
    """Fused shared-expert slots that loading left unfilled (they would run as zeros)."""


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)



def _shared_expert_pattern(module: str) -> re.Pattern:
    return re.compile(rf"^(?P<head>(?:.*\.)?layers\.(?P<layer>\d+)\.mlp\.){re.escape(module)}\.(?P<rest>.+)$")


@dataclass(frozen=True)
class SharedExpertLayout:
    """What the splitter needs to know about the model.

    ``moe_layers`` are the decoder-layer indices with a MoE block, MTP layers included; a
    shared-expert tensor for any other layer is an error.
    """

    n_routed_experts: int
    n_shared_experts: int | None
    hidden_size: int
    moe_intermediate_size: int
    moe_layers: frozenset[int]
    format: SharedExpertFormat = UNQUANTIZED
    # Also pass each packed shared-expert tensor on whole, renamed to ``mlp.{dense_copy}.*``:
    # the weights of a dense MLP that runs the shared experts when a step is split.
    dense_copy: str | None = None
    # Copies of each shared expert: replica r holds shared expert j in slot
    # ``n_routed + r * n_shared + j``.
    shared_replicas: int = 1
    # The checkpoint's packed shared-expert module under ``mlp.`` and its intermediate width
    # (None: ``moe_intermediate_size * n_shared_experts``; less: the last slot is zero-padded).
    shared_expert_name: str = "shared_experts"
    shared_width: int | None = None

    @property
    def packed_width(self) -> int:
        if self.shared_width is not None:
            return self.shared_width
        return self.moe_intermediate_size * (self.n_shared_experts or 0)

    @property
    def padding(self) -> int:
        """Zero rows appended to the last slot."""
        return self.moe_intermediate_size * (self.n_shared_experts or 0) - self.packed_width

    @property
    def enabled(self) -> bool:
        return bool(self.n_shared_experts)

    @property
    def slots(self) -> range:
        return range(
            self.n_routed_experts, self.n_routed_experts + (self.n_shared_experts or 0) * self.shared_replicas
        )

    def slot_names(self, head: str, j: int, rest: str) -> list[str]:
        """The names shared expert ``j``'s tensor is loaded under: one per replica."""
        n = self.n_shared_experts
        return [f"{head}experts.{self.n_routed_experts + r * n + j}.{rest}" for r in range(self.shared_replicas)]


@dataclass(frozen=True, order=True)
class SlotTensor:
    """One tensor that one fused slot must receive."""

    layer: int
    slot: int
    proj: str
    suffix: str

    def __str__(self) -> str:
        return f"layer {self.layer} slot {self.slot} {self.proj}.{self.suffix}"


def _describe(name: str, tensor: torch.Tensor, layout: SharedExpertLayout) -> str:
    return f"{name!r} (shape {list(tensor.shape)}, dtype {tensor.dtype}, n_shared_experts={layout.n_shared_experts})"


def _check_weight(name: str, proj: str, tensor: torch.Tensor, layout: SharedExpertLayout) -> None:
    packed = layout.packed_width
    expected = (
        (layout.hidden_size, packed) if proj == "down_proj" else (packed, layout.hidden_size)
    )
    split_dim = 1 if proj == "down_proj" else 0
    if layout.shared_width is not None:
        if tuple(tensor.shape) != expected:
            raise SharedExpertWeightError(
                f"{_describe(name, tensor, layout)}: expected shape {list(expected)} = "
                f"{'[hidden_size, shared_expert_intermediate_size]' if proj == 'down_proj' else '[shared_expert_intermediate_size, hidden_size]'}"
                f" with hidden_size={layout.hidden_size}, shared_expert_intermediate_size={packed}"
            )
    elif tensor.dim() == 2 and tensor.shape[split_dim] % layout.n_shared_experts:
        raise SharedExpertWeightError(
            f"{_describe(name, tensor, layout)}: dim {split_dim} of size {tensor.shape[split_dim]} "
            f"is not divisible by n_shared_experts={layout.n_shared_experts}"
        )
    elif tuple(tensor.shape) != expected:
        raise SharedExpertWeightError(
            f"{_describe(name, tensor, layout)}: expected shape {list(expected)} = "
            f"{'[hidden_size, moe_intermediate_size * n_shared_experts]' if proj == 'down_proj' else '[moe_intermediate_size * n_shared_experts, hidden_size]'}"
            f" with hidden_size={layout.hidden_size}, moe_intermediate_size={layout.moe_intermediate_size}"
        )
    if layout.format is UNQUANTIZED and tensor.dtype not in _FLOAT_DTYPES:
        raise UnsupportedSharedExpertFormat(
            f"{_describe(name, tensor, layout)}: dtype {tensor.dtype} in an unquantized checkpoint"
        )


def _block_chunks(
    name: str, proj: str, tensor: torch.Tensor, layout: SharedExpertLayout
) -> list[torch.Tensor]:
    """Per-slot views of a block-scale tensor; chunk edges must fall on block edges."""
    block_rows, block_cols = layout.format.block_size
    n, inter, hidden = layout.n_shared_experts, layout.moe_intermediate_size, layout.hidden_size
    split_dim, block = (1, block_cols) if proj == "down_proj" else (0, block_rows)

    def blocks(size: int, edge: int) -> int:
        return -(-size // edge)

    expected = (
        (blocks(hidden, block_rows), blocks(inter * n, block_cols))
        if proj == "down_proj"
        else (blocks(inter * n, block_rows), blocks(hidden, block_cols))
    )
    if tuple(tensor.shape) != expected:
        raise SharedExpertWeightError(
            f"{_describe(name, tensor, layout)}: expected block-scale shape {list(expected)} for "
            f"block size {list(layout.format.block_size)}, hidden_size={hidden}, "
            f"moe_intermediate_size={inter}"
        )
    if n > 1 and inter % block:
        raise SharedExpertWeightError(
            f"{_describe(name, tensor, layout)}: shared-expert chunks of {inter} along dim "
            f"{split_dim} do not fall on the {block}-wide quantization blocks "
            f"(block size {list(layout.format.block_size)})"
        )
    per_slot = inter // block if n > 1 else tensor.shape[split_dim]
    return [tensor.narrow(split_dim, j * per_slot, per_slot) for j in range(n)]


def _scale_chunks(
    name: str, proj: str, suffix: str, split: ScaleSplit, tensor: torch.Tensor, layout: SharedExpertLayout
) -> list[torch.Tensor]:
    n = layout.n_shared_experts
    if split is ScaleSplit.LIKE_WEIGHT_BLOCKS:
        return _block_chunks(name, proj, tensor, layout)
    if split in _PACKED_SPLITS:
        return _packed_chunks(name, proj, split, tensor, layout)
    if split is ScaleSplit.WHOLE:
        if tensor.numel() != 1:
            raise SharedExpertWeightError(
                f"{_describe(name, tensor, layout)}: expected a per-tensor (single-element) {suffix}"
            )
        return [tensor] * n
    # Per output channel: gate/up outputs are the packed intermediate dim, down's is hidden.
    rows = layout.moe_intermediate_size * n if proj != "down_proj" else layout.hidden_size
    if tensor.dim() not in (1, 2) or tensor.shape[0] != rows or tensor.numel() != rows:
        raise SharedExpertWeightError(
            f"{_describe(name, tensor, layout)}: expected a per-channel {suffix} of shape "
            f"[{rows}] or [{rows}, 1]"
        )
    if proj == "down_proj":
        return [tensor] * n
    inter = layout.moe_intermediate_size
    return [tensor.narrow(0, j * inter, inter) for j in range(n)]


_PACKED_SPLITS = (ScaleSplit.PACKED_INPUT, ScaleSplit.GROUPS, ScaleSplit.ZERO_POINTS, ScaleSplit.SHAPE)


def _packed_chunks(
    name: str, proj: str, split: ScaleSplit, tensor: torch.Tensor, layout: SharedExpertLayout
) -> list[torch.Tensor]:
    """Per-slot pieces of a compressed-tensors ``pack-quantized`` tensor (see
    :func:`~vllm_fse.loading.formats.packed_int`). A slot edge must fall on a whole int32 of
    packed values and on a whole scale group; ``weight_shape`` is rewritten, not sliced."""
    fmt = layout.format
    n, inter, hidden = layout.n_shared_experts, layout.moe_intermediate_size, layout.hidden_size
    pack, group = fmt.pack_factor, fmt.group_size
    down = proj == "down_proj"
    out_dim, in_dim = (hidden, inter * n) if down else (inter * n, hidden)

    def ceil(a: int, b: int) -> int:
        return -(-a // b)

    def cut(dim: int, width: int, unit: int, what: str) -> list[torch.Tensor]:
        if n > 1 and width % unit:
            raise SharedExpertWeightError(
                f"{_describe(name, tensor, layout)}: shared-expert chunks of {width} along dim {dim} do not "
                f"fall on whole {what} of {unit} (moe_intermediate_size={inter})"
            )
        per_slot = width // unit if n > 1 else tensor.shape[dim]
        return [tensor.narrow(dim, j * per_slot, per_slot) for j in range(n)]

    if split is ScaleSplit.SHAPE:
        if tensor.dim() != 1 or tensor.tolist() != [out_dim, in_dim]:
            raise SharedExpertWeightError(
                f"{_describe(name, tensor, layout)}: expected weight_shape {[out_dim, in_dim]} "
                f"(hidden_size={hidden}, moe_intermediate_size={inter})"
            )
        slot_shape = [hidden, inter] if down else [inter, hidden]
        return [torch.tensor(slot_shape, dtype=tensor.dtype) for _ in range(n)]
    if split is ScaleSplit.PACKED_INPUT:
        expected = (out_dim, ceil(in_dim, pack))
        what = "packed int32 columns"
    elif split is ScaleSplit.GROUPS:
        expected = (out_dim, 1 if group is None else ceil(in_dim, group))
        what = "scale columns"
    else:
        expected = (ceil(out_dim, pack), 1 if group is None else ceil(in_dim, group))
        what = "packed zero-point rows"
    if tuple(tensor.shape) != expected:
        raise SharedExpertWeightError(
            f"{_describe(name, tensor, layout)}: expected {what} of shape {list(expected)} for {pack} values per "
            f"int32 and group size {group or 'per channel'} (hidden_size={hidden}, moe_intermediate_size={inter})"
        )
    if split is ScaleSplit.ZERO_POINTS and not down:
        return cut(0, inter, pack, "int32s of packed values")
    if not down:
        return cut(0, inter, 1, "rows")
    if split is ScaleSplit.PACKED_INPUT:
        return cut(1, inter, pack, "int32s of packed values")
    if group is None:  # one scale (zero point) per output channel: hidden, whole for every slot
        return [tensor] * n
    return cut(1, inter, group, "scale groups")


def split_shared_experts(
    weights: Iterable[tuple[str, torch.Tensor]], layout: SharedExpertLayout
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``weights``, replacing each shared-expert tensor by its per-slot chunks.

    Everything else passes through untouched and in order. Chunks are views of the checkpoint
    tensor (scalar and down-proj per-channel scales are the same tensor for every slot), so
    nothing is copied and nothing is held beyond the tensor at hand. With
    ``layout.dense_copy`` the packed tensor itself follows its chunks under that module name.
    """
    if not layout.enabled:
        yield from weights
        return
    if layout.padding and layout.format is not UNQUANTIZED:
        raise UnsupportedSharedExpertFormat(
            f"zero-padding a {layout.format} shared expert of width {layout.packed_width} to "
            f"{layout.n_shared_experts} slots of {layout.moe_intermediate_size}"
        )
    module = layout.shared_expert_name
    pattern = _shared_expert_pattern(module)
    seen: dict[tuple[int, str], set[str]] = {}
    for name, tensor in weights:
        if f".{module}." not in name and not name.startswith(f"{module}."):
            yield name, tensor
            del tensor  # see below
            continue
        match = pattern.match(name)
        if match is None:
            raise UnsupportedSharedExpertFormat(
                f"{_describe(name, tensor, layout)}: not a layers.N.mlp.{module} tensor"
            )
        layer = int(match["layer"])
        proj, _, suffix = match["rest"].partition(".")
        if proj not in PROJECTIONS or not suffix:
            raise UnsupportedSharedExpertFormat(
                f"{_describe(name, tensor, layout)}: unknown shared-expert projection "
                f"(expected one of {', '.join(PROJECTIONS)})"
            )
        if layer not in layout.moe_layers:
            raise SharedExpertWeightError(
                f"{_describe(name, tensor, layout)}: layer {layer} has no MoE block "
                f"(MoE layers: {sorted(layout.moe_layers)})"
            )
        try:
            split = layout.format.split_of(suffix)
        except KeyError:
            raise UnsupportedSharedExpertFormat(
                f"{_describe(name, tensor, layout)}: {suffix!r} is not part of the checkpoint's "
                f"{layout.format} format"
            ) from None
        seen.setdefault((layer, proj), set()).add(suffix)
        if split is None:
            _check_weight(name, proj, tensor, layout)
            split_dim = 1 if proj == "down_proj" else 0
            chunks = _weight_chunks(tensor, split_dim, layout)
        else:
            chunks = _scale_chunks(name, proj, suffix, split, tensor, layout)
        for j, chunk in enumerate(chunks):
            for slot_name in layout.slot_names(match["head"], j, match["rest"]):
                yield slot_name, chunk
        if layout.dense_copy:
            yield f"{match['head']}{layout.dense_copy}.{match['rest']}", tensor
        # Hold nothing while the next tensor is read: a checkpoint tensor is a view of its
        # shard's memory map, which must be free to close when the reader moves to the next shard.
        del tensor, chunks, chunk
    weight = layout.format.suffixes[0]  # ``weight``, or ``weight_packed``
    orphans = sorted(
        f"layer {layer} {proj} has {', '.join(sorted(suffixes))} but no {weight}"
        for (layer, proj), suffixes in seen.items()
        if weight not in suffixes
    )
    if orphans:
        raise SharedExpertWeightError(
            f"shared-expert scales without their weight (n_shared_experts={layout.n_shared_experts}): "
            + "; ".join(orphans)
        )


def _weight_chunks(tensor: torch.Tensor, split_dim: int, layout: SharedExpertLayout) -> list[torch.Tensor]:
    """Slot ``j``'s chunk of a packed weight: a view, except a zero-padded last chunk."""
    inter, n = layout.moe_intermediate_size, layout.n_shared_experts
    chunks = [tensor.narrow(split_dim, j * inter, inter) for j in range(n - 1)]
    last = tensor.narrow(split_dim, (n - 1) * inter, inter - layout.padding)
    if layout.padding:
        pad = [0, 0, 0, 0]  # F.pad: (left, right) of the last dim, then (top, bottom) of the first
        pad[3 if split_dim == 0 else 1] = layout.padding
        last = torch.nn.functional.pad(last, pad)
    return chunks + [last]


@dataclass
class SlotTracker:
    """The slot tensors each MoE layer must receive, and which of them loading delivered.

    Mark what the model's weight loader actually stored (not what the splitter yielded), then
    call :meth:`verify`. ``expected`` is what this rank holds: under pipeline or expert
    parallelism, build it from the local layers and slots only.
    """

    expected: frozenset[SlotTensor]
    loaded: set[SlotTensor] = field(default_factory=set)

    @classmethod
    def for_layers(
        cls, layout: SharedExpertLayout, layers: Iterable[int], slots: Iterable[int] | None = None
    ) -> SlotTracker:
        slots = list(layout.slots if slots is None else slots)
        expected = frozenset(
            SlotTensor(layer, slot, proj, suffix)
            for layer in layers
            for slot in slots
            for proj in PROJECTIONS
            for suffix in layout.format.suffixes
        )
        return cls(expected)

    def mark_loaded(self, layer: int, slot: int, proj: str, suffix: str) -> None:
        item = SlotTensor(layer, slot, proj, suffix)
        if item in self.expected:
            self.loaded.add(item)

    def missing(self) -> list[SlotTensor]:
        return sorted(self.expected - self.loaded)

    def verify(self) -> None:
        missing = self.missing()
        if missing:
            raise MissingSlotWeightsError(
                f"{len(missing)} fused shared-expert slot tensor(s) were never loaded and would run "
                "as zeros (their shared-expert tensors are missing from the checkpoint or were "
                "dropped on the way): "
                + ", ".join(str(m) for m in missing)
            )
