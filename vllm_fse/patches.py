"""Every upstream vLLM name vllm-fse swaps, wraps or patches: the one list.

Each entry says what is touched, why, how, and when it can go. ``tests/test_patches.py`` checks
that every target still exists in the installed vLLM (with the parameters the plugin relies on),
so a vLLM release that moves one fails a test instead of a user's server.

The list (``PATCHES``):

1. ``resolve_layer_fused_shared_expert`` in each family's upstream module that has it
   (``vllm.model_executor.models.glm4_moe``, ``...deepseek_v2``, ``...qwen3_next``; Qwen2-MoE's
   ``...qwen2_moe`` has none: its block always hands its shared MLP to the factory): swapped while a plugin model is
   constructed (:func:`~vllm_fse.core.construction.moe_construction`), restored after.
   Why: upstream's MoE block asks it whether to fuse, and it answers only for ROCm AITER. How:
   answers from the plugin's :class:`~vllm_fse.core.decision.FsePlan`. Goes when upstream takes a
   backend-neutral decision from the model (a ``fuse_shared_experts`` argument to the block).
2. ``FusedMoEFactory`` in the same modules: swapped during construction.
   Why: to build the widened layer (``n_routed + n_shared`` experts, vLLM's router for the routed
   top-k) and attach :class:`~vllm_fse.core.layer.SharedSlotExperts`. How: a
   factory that calls the real one with the widened counts. Goes when vLLM's factory appends
   shared slots on every backend (its router-append path is ROCm-only in 0.32).
   The families' MoE blocks (``Glm4MoE``, ``DeepseekV2MoE``, ``Qwen2MoeSparseMoeBlock``,
   ``Qwen3NextSparseMoeBlock``) and dense MLPs (``Glm4MoeMLP``, ``DeepseekV2MLP``,
   ``Qwen2MoeMLP``) are read, not patched; they are checked with these entries. For Qwen the
   factory also takes the block's ``shared_experts`` (Qwen2-MoE) or ``shared_expert_gate``
   (Qwen3-Next) and keeps the gate for the per-token slot weight.
3. ``RoutedExperts.forward_modular`` of each widened layer (instance attribute, per layer).
   Why: the per-step fused/split choice must not be frozen by Dynamo (token count) and the
   shared slots must be added after vLLM's router. How: replaced by a method that, while vLLM's
   compiled CPU mode traces it, traces both paths (each calling the original bound method)
   under ``torch.cond`` on ``tokens <= N``, N read from a buffer the plugin registers on the
   runner module (``fse_switch_state``, with the counter ``fse_path_calls``); otherwise calls
   the opaque op ``vllm_fse::shared_slot_experts``, which runs the chosen path (both in
   :mod:`vllm_fse.core.layer`; the switch point in :mod:`vllm_fse.auto.switch_point`). Goes with 2.
4. ``vllm.model_executor.layers.fused_moe.fused_moe.get_moe_configs``: wrapped once a widened
   layer exists (:func:`resolve_widened_moe_configs`). Why: vLLM's Triton MoE looks up tuned
   kernel configs by file name ``E=<experts>,N=...``; no file exists for the widened
   ``E = n_routed + n_shared`` (161 for GLM-4.x), so it would run untuned. How: a widened ``E``
   without a file of its own resolves to the routed layer's file, logged once; vLLM 0.34's
   ``down_moe=True`` (the down projection's ``*_down.json``) is accepted and forwarded, and falls
   back the same way. 0.34's ``fused_moe/experts/triton_moe.py`` imports the function by name: the
   wrapper is bound there too (``MOE_CONFIGS_IMPORTED_BY``; ``vllm-fse check-vllm`` names any other
   module that imports it). Goes when vLLM ships or derives configs for widened layers.
5. ``vllm.ModelRegistry`` entries of every architecture in ``vllm_fse.MODEL_OVERRIDES`` (GLM-4
   MoE, GLM-4.7-Flash, DeepSeek-V2/V3, Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE and their MTP drafts): overwritten by the plugin's classes
   (``vllm_fse.register``), each a subclass of the upstream class it replaces, only when FSE is asked for
   (``VLLM_FSE=1``/``auto``, or the AITER toggle on ROCm); otherwise vLLM's own entries stay (or are put back).
   Why: drop-in replacement, the user's request. How: ``ModelRegistry.register_model``. Goes if upstream
   adopts backend-neutral FSE.
6. Inductor's ``reorder_for_peak_memory`` (``torch._inductor.config``), set to False in the
   model's ``compilation_config.inductor_compile_config`` when FSE runs in vLLM's compiled CPU
   mode (:func:`keep_inductor_order_of_out_variant_kernels`). Why: torch 2.13's peak-memory
   reordering moved the DeepSeek router's sigmoid kernel ahead of the ``_C.onednn_mm`` call that
   writes its input (vLLM's out-variant CPU GEMM, a mutation Inductor records, and the reorder
   then ignored) in the widened layer's graph: the router read an uninitialised buffer, and
   greedy tokens differed from unfused (measured; with the option off, on = off). The unfused
   graph happens to keep the order, the bug is not FSE's, but FSE's graph triggers it. How:
   the option, unless the user set it. Goes when torch's reorder keeps mutation order.
7. ``FusedMoERouter.supports_monolithic_kernels`` (vLLM >= 0.33): overridden to False on the
   widened layer's router (:func:`route_to_modular_kernels`: the instance's class becomes a
   subclass of its own class). Why: a monolithic MoE kernel routes inside the kernel, where the
   shared slots cannot be appended; with the property False, 0.33's ``FusedMoEFactory`` asks
   for a decomposed backend (``require_decomposed_backend``) and its oracle skips monolithic
   ones. How: the subclass overrides the property only. Goes when vLLM appends shared slots in
   every backend's router. On 0.32, which has no such property, the plan refuses an explicitly
   monolithic ``--moe-backend`` and the factory stops with a hint if the oracle picks one.
8. ``vllm.envs.environment_variables``: entries added at plugin load
   (:func:`~vllm_fse.compat.declare_plugin_env_vars`). Why: the plugin's variables share the
   ``VLLM_`` prefix (vLLM warns about, or refuses, unknown ones), and vLLM's compile-cache key
   hashes every entry: that makes ``VLLM_FSE`` & co. part of it, and ``VLLM_FSE_SOURCE_HASH``
   (a hash of the plugin's sources, not a variable anyone sets) makes a plugin upgrade compile
   afresh instead of reusing Inductor code of an older graph. How: ``dict.setdefault``; with FSE
   not asked for, only the plugin variables that are set (vLLM would call them unknown) and no
   source hash (vLLM's compile-cache key stays its own). Goes when vLLM lets plugins declare
   variables and compile-cache factors.
9. ``vllm.model_executor.model_loader.utils.process_weights_after_loading``: not patched; the
   plugin's model classes define the model-level hook it calls last, after every layer's quant
   method processed its weights for its kernel (0.32/0.33: ``model.process_weights_after_loading()``
   after that loop; 0.34: through ``weight_utils.finalize_model_weights``, every module's hook with
   its children first, so the model's still runs last, and again after every reload). Why: only then can the split path's dense MLP be pointed at a shared slot that holds
   the same matrices (:meth:`~vllm_fse.core.layer.SharedSlotExperts.read_split_weights_from_slot`),
   and only then does the plan line know where those weights live. How: the mixin's method (:mod:`vllm_fse.core.model`) calls
   upstream's own (if the model class has one) first. Goes when the split path is gone (with 2).
10. glibc malloc's heap trimming (``mallopt``, a process setting, not a vLLM name): under
    ``VLLM_FSE=auto`` in vLLM's compiled CPU mode, the engine process keeps freed heap memory
    (``M_TRIM_THRESHOLD`` 2 GiB, ``M_MMAP_THRESHOLD`` 32 MiB, glibc's largest) instead of giving it
    back to the OS after every free (:func:`keep_freed_cpu_heap`). Why: Inductor compiles each
    ``torch.cond`` branch as its own subgraph, which allocates its intermediates afresh and frees
    them on return, outside the outer graph's buffer reuse; glibc's default then trims the freed top
    of the heap, and the next layer's allocations fault the pages in again (measured at a 4096-token
    prefill of the bench model: 46,081 minor faults per step vs 17,409 unfused, +2-4% step time;
    with the setting 17,408, and FSE off's count does not move with it). vLLM's CPU backend means to
    run under tcmalloc (it preloads a bundled one where the wheel ships it), which keeps freed
    memory the same way. How: ``mallopt`` through ctypes, once per process, unless another
    allocator is loaded or the user set glibc's malloc variables. Goes when the split path is gone
    (with 2) or Inductor plans a ``cond`` branch's buffers with the outer graph's.
11. ``vllm.model_executor.model_loader.utils._MODEL_ARCH_BY_HASH``: vLLM's per-process cache of the
    model class it resolved for a model path, cleared when :func:`vllm_fse.register` changes the
    registry in a process that already resolved one. Why: a process that builds several engines
    under different ``VLLM_FSE`` settings (the test harness, the benchmarks' in-process engines)
    would otherwise get the first engine's class for every later one. How: ``dict.clear``. Goes
    when vLLM resolves the class afresh per engine or keys its cache by the registry entry.
12. The INFO line "AITER fused shared experts: enabled on MoE layer(s) ..." of vLLM 0.34's
    ``vllm.model_executor.models.utils.get_fused_shared_expert_layers``: dropped by a logging
    filter on that module's logger while a model is built on the backend-neutral path
    (:func:`no_aiter_fse_line`). Why: the model asks whether its blocks fuse their shared experts,
    which the plugin's blocks do on every platform, so the line would claim AITER on CPU or CUDA;
    the plugin's own plan line says what runs. How: ``logging.Filter``, removed after construction.
    Goes when vLLM words the line by backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import sys
from dataclasses import dataclass

from vllm_fse.compat import logger


@dataclass(frozen=True)
class Patch:
    module: str
    name: str  # attribute of the module; "Class.attr" for a class attribute
    kind: str  # "swap during construction", "wrap", "instance attribute", "registry entry"
    why: str
    goes_when: str
    # Parameters of the target the plugin relies on (a callable's signature must have them).
    params: tuple[str, ...] = ()
    # The first vLLM version that has the target (older ones lack it; the plugin checks).
    since_vllm: str = ""
    # A wrapped callable: the parameters the wrapper accepts beyond ``params`` (a parameter of
    # the target outside both is one the wrapper would drop).
    wrapper_params: tuple[str, ...] = ()
    # A wrapped callable: the modules that import it by name, where the wrapper is bound too.
    imported_by: tuple[str, ...] = ()


# A target that is not a Python name: a setting of the process's C library (checked through ctypes).
GLIBC = "glibc"
PROCESS_SETTING = "process setting"

_FAMILY_MODULES = ("vllm.model_executor.models.glm4_moe", "vllm.model_executor.models.deepseek_v2",
                   "vllm.model_executor.models.qwen3_next")  # fmt: skip
# Families whose block builds and hands over its shared MLP whatever the plan (no per-layer decision).
_HANDOVER_MODULES = ("vllm.model_executor.models.qwen2_moe",)
_FACTORY_PARAMS = ("num_experts", "top_k", "router", "n_shared_experts", "fuse_shared_experts", "shared_expert_prefix",
                   "routed_scaling_factor", "apply_routed_scale_to_output", "hidden_size", "intermediate_size",
                   "shared_experts", "shared_expert_gate", "gate")  # fmt: skip

# Modules that import ``get_moe_configs`` by name (their own reference must be the wrapper too).
MOE_CONFIGS_IMPORTED_BY = ("vllm.model_executor.layers.fused_moe.experts.triton_moe",)  # vLLM 0.34


PATCHES: tuple[Patch, ...] = tuple(
    patch
    for module in _FAMILY_MODULES + _HANDOVER_MODULES
    for patch in (
        *(() if module in _HANDOVER_MODULES else (
            Patch(module, "resolve_layer_fused_shared_expert", "swap during construction",
                  "upstream decides fusion for ROCm AITER only", "upstream takes the decision from the model",
                  ("quant_config", "prefix")),)),
        Patch(module, "FusedMoEFactory", "swap during construction",
              "build the widened layer on every backend", "vLLM appends shared slots on every backend",
              _FACTORY_PARAMS),
    )
) + (
    Patch("vllm.model_executor.layers.fused_moe.routed_experts", "RoutedExperts.forward_modular", "instance attribute",
          "per-step fused/split choice outside Dynamo's trace", "goes with FusedMoEFactory's",
          ("x", "topk_weights", "topk_ids", "shared_experts", "shared_experts_input")),
    Patch("vllm.model_executor.layers.fused_moe.fused_moe", "get_moe_configs", "wrap",
          "tuned Triton configs for the widened expert count", "vLLM ships configs for widened layers",
          ("E", "N", "dtype", "block_n", "block_k"), wrapper_params=("down_moe",),
          imported_by=MOE_CONFIGS_IMPORTED_BY),
    Patch("vllm", "ModelRegistry.register_model", "registry entry",
          "drop-in replacement of the supported families' classes", "upstream adopts backend-neutral FSE",
          ("model_arch", "model_cls")),
    Patch("torch._inductor.config", "reorder_for_peak_memory", "option",
          "the peak-memory reorder ran a kernel before the out-variant GEMM writing its input",
          "torch keeps mutation order when reordering for memory"),
    Patch("vllm.model_executor.layers.fused_moe.router.fused_moe_router", "FusedMoERouter.supports_monolithic_kernels",
          "property override (subclass of the router's class)",
          "a monolithic kernel routes inside itself, where shared slots cannot be appended",
          "vLLM appends shared slots in every backend's router", since_vllm="0.33"),
    Patch("vllm.envs", "environment_variables", "registry entry",
          "the plugin's variables and source hash in vLLM's known variables and compile-cache key",
          "vLLM lets plugins declare variables and compile-cache factors"),
    Patch("vllm.model_executor.model_loader.utils", "process_weights_after_loading", "hook the model class defines",
          "the split MLP reads a shared slot holding the same matrices, once every layer's weights are processed",
          "the split path is gone (with FusedMoEFactory's)", ("model", "model_config", "target_device")),
    Patch(GLIBC, "mallopt", PROCESS_SETTING,
          "a torch.cond branch frees its intermediates on return and glibc gives them back to the OS (page faults)",
          "the split path is gone, or Inductor plans cond branches' buffers with the outer graph's",
          ("M_TRIM_THRESHOLD", "M_MMAP_THRESHOLD")),
    Patch("vllm.model_executor.model_loader.utils", "_MODEL_ARCH_BY_HASH", "cache cleared",
          "a registry change must reach the next engine the same process builds",
          "vLLM resolves the model class afresh per engine"),
    Patch("vllm.model_executor.models.utils", "get_fused_shared_expert_layers", "log line filtered",
          "its 'AITER fused shared experts' line would claim AITER on every platform",
          "vLLM words the line by backend", since_vllm="0.34"),
)  # fmt: skip


# -- 4: tuned Triton MoE configs for widened layers ------------------------------------------------

# Widened expert count -> the routed layer's expert count, for every widened layer built here.
_widened_experts: dict[int, int] = {}


def _config_paths(file_name: str) -> list[str]:
    from vllm import envs
    from vllm.model_executor.layers.fused_moe import fused_moe

    folders = [envs.VLLM_TUNED_CONFIG_FOLDER] if envs.VLLM_TUNED_CONFIG_FOLDER else []
    folders.append(os.path.join(os.path.dirname(os.path.realpath(fused_moe.__file__)), "configs"))
    return [os.path.join(folder, file_name) for folder in folders]


def resolve_widened_moe_configs(widened: int, routed: int) -> None:
    """Make vLLM's tuned-config lookup for ``E=widened`` fall back to ``E=routed``'s file."""
    from vllm.model_executor.layers.fused_moe import fused_moe

    _widened_experts[widened] = routed
    if getattr(fused_moe.get_moe_configs, "vllm_fse_wrapped", False):
        return
    real = fused_moe.get_moe_configs

    @functools.lru_cache  # called per kernel launch, like the lru-cached original
    def get_moe_configs(
        E: int, N: int, dtype: str | None, block_n: int | None = None, block_k: int | None = None, down_moe: bool = False
    ):
        # down_moe (vLLM 0.34): the down projection's own tuned file, "<name>_down.json".
        extra = {"down_moe": True} if down_moe else {}
        routed_e = _widened_experts.get(E)
        if routed_e is not None:
            block_shape = [block_n, block_k] if block_n and block_k else None

            def file_name(experts: int) -> str:
                name = fused_moe.get_config_file_name(experts, N, dtype, block_shape)
                return name.removesuffix(".json") + "_down.json" if down_moe else name

            own = file_name(E)
            if not any(os.path.exists(p) for p in _config_paths(own)):
                logger.info_once(
                    "vllm-fse: no tuned MoE config %s for the widened layer (E=%d = %d routed + shared slots); "
                    "using the routed layer's %s",
                    own, E, routed_e, file_name(routed_e),
                )  # fmt: skip
                return real(routed_e, N, dtype, block_n, block_k, **extra)
        return real(E, N, dtype, block_n, block_k, **extra)

    get_moe_configs.vllm_fse_wrapped = True
    get_moe_configs.wrapped = real
    fused_moe.get_moe_configs = get_moe_configs
    for name in MOE_CONFIGS_IMPORTED_BY:  # imported before the wrap: rebind their name too
        importer = sys.modules.get(name)
        if getattr(importer, "get_moe_configs", None) is real:
            importer.get_moe_configs = get_moe_configs


# -- 12: vLLM 0.34's AITER line about the plugin's fused blocks -------------------------------------

AITER_FSE_LINE = "AITER fused shared experts"


class _NoAiterFseLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(AITER_FSE_LINE)


@contextlib.contextmanager
def no_aiter_fse_line():
    """While a model is built on the backend-neutral path, drop vLLM's "AITER fused shared
    experts" line (see entry 12)."""
    upstream = logging.getLogger("vllm.model_executor.models.utils")
    line_filter = _NoAiterFseLine()
    upstream.addFilter(line_filter)
    try:
        yield
    finally:
        upstream.removeFilter(line_filter)


# -- 6: Inductor's peak-memory reordering in vLLM's compiled CPU mode ---------------------------------

PEAK_MEMORY_REORDER = "reorder_for_peak_memory"


def keep_inductor_order_of_out_variant_kernels(vllm_config) -> None:
    """Turn off Inductor's peak-memory reordering for this model's compilation (see entry 6)."""
    options = vllm_config.compilation_config.inductor_compile_config
    if PEAK_MEMORY_REORDER in options:
        if options[PEAK_MEMORY_REORDER]:
            logger.warning_once(
                "vllm-fse: inductor_compile_config sets %s=True; with FSE on in vLLM's compiled CPU "
                "mode, torch 2.13's reordering was measured to run a router kernel before the GEMM "
                "that writes its input (wrong tokens). Leaving it as set.",
                PEAK_MEMORY_REORDER,
            )
        return
    options[PEAK_MEMORY_REORDER] = False
    logger.info_once(
        "vllm-fse: compiled CPU mode: Inductor's %s turned off for this model (it can reorder a "
        "kernel before the out-variant GEMM that writes its input)",
        PEAK_MEMORY_REORDER,
    )


# -- 7: steer the widened layer to a modular MoE kernel (vLLM >= 0.33) ---------------------------------

MONOLITHIC_PROPERTY = "supports_monolithic_kernels"


@functools.cache
def _modular_only(router_cls: type) -> type:
    return type(
        router_cls.__name__,
        (router_cls,),
        {MONOLITHIC_PROPERTY: property(lambda self: False), "__module__": __name__, "fse_modular_only": True},
    )


def route_to_modular_kernels(router) -> bool:
    """Make ``router`` (vLLM's, for the routed top-k) decline monolithic kernels; False where this
    vLLM has no such property (0.32), i.e. where the backend oracle cannot be steered."""
    if not hasattr(type(router), MONOLITHIC_PROPERTY):
        return False
    router.__class__ = _modular_only(type(router))
    return True


# -- 10: keep freed heap memory in the engine process (VLLM_FSE=auto, compiled CPU mode) -------------

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# mallopt takes a C int: the largest trim threshold it accepts is 2 GiB - 1. glibc refuses an
# mmap threshold above 32 MiB (HEAP_MAX_SIZE / 2 on 64-bit); larger blocks are always mapped.
KEPT_HEAP_TRIM_THRESHOLD = 2**31 - 1
KEPT_HEAP_MMAP_THRESHOLD = 32 << 20
# Other allocators (vLLM's CPU backend preloads tcmalloc where its wheel bundles it) keep freed
# memory themselves; a user's own glibc malloc settings win.
_OTHER_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc", "tbbmalloc_proxy")
_USER_MALLOC_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_freed_heap_kept: str | None = None  # how the process was left, once decided


def _loaded_allocator() -> str | None:
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        maps = ""
    maps += os.environ.get("LD_PRELOAD", "")
    return next((name for name in _OTHER_ALLOCATORS if f"lib{name}" in maps), None)


def keep_freed_cpu_heap() -> str:
    """Make glibc keep freed heap memory in this process (see entry 10). Returns what was done
    or why not (once per process; later calls return the first answer)."""
    global _freed_heap_kept
    if _freed_heap_kept is not None:
        return _freed_heap_kept
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        libc = " ".join(filter(None, platform.libc_ver())) or "unknown libc"
        _freed_heap_kept = f"not glibc ({platform.system()}, {libc})"
    elif allocator := _loaded_allocator():
        _freed_heap_kept = f"left to the loaded {allocator}"
    elif user := [v for v in _USER_MALLOC_SETTINGS if v in os.environ] or (
        ["GLIBC_TUNABLES"] if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") else []
    ):
        _freed_heap_kept = f"left to the user's {', '.join(user)}"
    else:
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        # Setting either ends glibc's dynamic thresholds, so both are set: a trim threshold alone
        # would leave the mmap threshold at its 128 KiB start (every large buffer mapped afresh).
        if mallopt(M_MMAP_THRESHOLD, KEPT_HEAP_MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, KEPT_HEAP_TRIM_THRESHOLD) != 1:
            _freed_heap_kept = "glibc refused mallopt"
        else:
            _freed_heap_kept = "kept (glibc mallopt: trim threshold 2 GiB, mmap threshold 32 MiB)"
            logger.info_once(
                "vllm-fse: VLLM_FSE=auto in compiled CPU mode: glibc malloc keeps freed heap memory in this "
                "process (trim threshold 2 GiB, mmap threshold 32 MiB): the split path's torch.cond branch "
                "frees its buffers every step, and glibc's default trimming made the next layer fault them in again"
            )  # fmt: skip
    if not _freed_heap_kept.startswith("kept"):
        logger.info_once("vllm-fse: the process allocator left as it is: %s", _freed_heap_kept)
    return _freed_heap_kept


def freed_cpu_heap_state() -> str | None:
    """What :func:`keep_freed_cpu_heap` did in this process, or None if it was not asked."""
    return _freed_heap_kept
