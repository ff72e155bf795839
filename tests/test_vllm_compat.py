"""``vllm-fse check-vllm``: the names the plugin uses are found in a vLLM source tree without
importing it (re-exports, star imports, inherited class attributes), and a release that lost a
name or a parameter, gave a wrapped function a parameter or a by-name importer, or moved a
registry entry away from the class the plugin subclasses fails the check (small fake releases);
the real 0.34 wheel passes where it is cached."""

from __future__ import annotations

import textwrap
import zipfile
from pathlib import Path

import pytest

from vllm_fse import vllm_compat
from vllm_fse.vllm_compat import SourceTree, check, lookup

pytestmark = pytest.mark.unit


def test_the_installed_vllm_has_every_name_the_plugin_uses(capsys):
    assert vllm_compat.main([]) == 0, capsys.readouterr().out
    uses = vllm_compat.plugin_imports()
    assert any(u.module == "vllm.forward_context" and u.name == "get_forward_context" for u in uses)
    optional = [u for u in uses if u.optional]
    # imported under ImportError: 0.33+ and 0.34+
    assert sorted(u.name for u in optional) == ["get_expert_substitution_spec", "should_torch_compile_mtp_drafter"]


def _write(root, files: dict[str, str]):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_resolution_follows_reexports_star_imports_and_base_classes(tmp_path):
    _write(tmp_path, {
        "vllm/__init__.py": "from vllm.registry import ModelRegistry\n",
        "vllm/registry.py": "class _Registry:\n    def register_model(self, model_arch, model_cls): ...\nModelRegistry = _Registry()\n",
        "vllm/distributed/__init__.py": "from .state import *\n",
        "vllm/distributed/state.py": "def get_tp_group(): ...\n",
        "vllm/router.py": "class Base:\n    @property\n    def supports_monolithic_kernels(self): return True\n",
        "vllm/cpu.py": "from vllm.router import Base\nclass CPURouter(Base):\n    pass\n",
    })  # fmt: skip
    tree = SourceTree(tmp_path)
    assert lookup(tree, "vllm", "ModelRegistry.register_model") is not None
    assert lookup(tree, "vllm.distributed", "get_tp_group") is not None
    assert lookup(tree, "vllm.cpu", "CPURouter.supports_monolithic_kernels") is not None
    assert lookup(tree, "vllm.cpu", "CPURouter.select_experts") is None


def test_a_release_that_lost_a_name_or_a_parameter_fails(tmp_path, capsys):
    _write(tmp_path, {
        "vllm/__init__.py": "",
        "vllm/_version.py": "__version__ = '0.32.5'\n",
        "vllm/model_executor/models/glm4_moe.py": "def FusedMoEFactory(num_experts, top_k): ...\n",
    })  # fmt: skip
    with zipfile.ZipFile(tmp_path / "vllm-0.32.5-py3-none-any.whl", "w") as wheel:  # read without unpacking
        for path in (tmp_path / "vllm").rglob("*.py"):
            wheel.write(path, path.relative_to(tmp_path))
    for source in (tmp_path, tmp_path / "vllm-0.32.5-py3-none-any.whl"):
        results = {(u.module, u.name): problem for u, problem, _ in check(SourceTree(source))}
        factory = results[("vllm.model_executor.models.glm4_moe", "FusedMoEFactory")]
        assert factory.startswith("lost parameters") and "'n_shared_experts'" in factory
        assert results[("vllm.forward_context", "get_forward_context")] == "missing"
        # newer than this 0.32.5: absent is fine
        assert results[("vllm.model_executor.layers.fused_moe.router.fused_moe_router",
                        "FusedMoERouter.supports_monolithic_kernels")] == ""  # fmt: skip
        assert vllm_compat.main([str(source)]) == 1
    assert "FAIL vllm.model_executor.models.glm4_moe.FusedMoEFactory" in capsys.readouterr().out


def _problems(source) -> dict[tuple[str, str], str]:
    return {(u.module, u.name): problem for u, problem, _ in check(SourceTree(source)) if problem}


def _release(tmp_path, files: dict[str, str]):
    """A fake release: the installed vLLM's tree (every name present) with ``files`` replaced."""
    import shutil

    from vllm_fse.vllm_compat import SourceTree as Tree

    installed = Tree.installed().location / "vllm"
    root = tmp_path / "release"
    shutil.copytree(installed, root / "vllm", ignore=shutil.ignore_patterns("*.so", "*.pyc", "__pycache__", "*.json"))
    _write(root, files)
    return root


def test_the_installed_release_has_no_problem_of_the_new_kinds(tmp_path):
    assert _problems(_release(tmp_path, {})) == {}


def test_a_wrapped_function_gaining_a_parameter_or_a_by_name_importer_fails(tmp_path):
    """R4 as it was: 0.34's get_moe_configs gained ``down_moe``, and triton_moe imports it by name,
    so replacing the module attribute does not reach it. The plugin's wrapper takes ``down_moe``
    and is bound in triton_moe; a parameter or an importer it does not know fails."""
    fused_moe = "vllm/model_executor/layers/fused_moe/fused_moe.py"
    text = (Path(SourceTree.installed().location) / fused_moe).read_text()
    new_param = text.replace("    block_k: int | None = None,\n) -> dict[int, Any] | None:",
                             "    block_k: int | None = None,\n    down_moe: bool = False,\n    swizzle: bool = False,\n) -> dict[int, Any] | None:")  # fmt: skip
    assert new_param != text
    root = _release(tmp_path, {
        fused_moe: new_param,
        "vllm/model_executor/layers/fused_moe/experts/triton_moe.py":
            "from vllm.model_executor.layers.fused_moe.fused_moe import get_moe_configs\n",
        "vllm/model_executor/layers/fused_moe/experts/other_moe.py":
            "from ..fused_moe import get_moe_configs, get_config_file_name\n",
    })  # fmt: skip
    problem = _problems(root)[("vllm.model_executor.layers.fused_moe.fused_moe", "get_moe_configs")]
    assert "new parameters ['swizzle'] the wrapper would drop" in problem  # down_moe is taken
    assert "imported by name in ['vllm.model_executor.layers.fused_moe.experts.other_moe']" in problem


def test_a_registry_entry_moved_away_from_the_class_the_plugin_subclasses_fails(tmp_path):
    """R1 as it was: 0.34 resolves Qwen3.5 to ``vllm.models.qwen3_5``. The plugin's Qwen3.5 classes
    follow the registry (pass); a GLM class that imports the old module fails, a re-export of the
    same class passes."""
    registry = "vllm/model_executor/models/registry.py"
    text = (Path(SourceTree.installed().location) / registry).read_text()
    for old in ('"Glm4MoeForCausalLM": ("glm4_moe", "Glm4MoeForCausalLM")',
                '"Qwen3_5MoeForCausalLM": ("qwen3_5", "Qwen3_5MoeForCausalLM")',
                '"DeepseekV2ForCausalLM": ("deepseek_v2", "DeepseekV2ForCausalLM")'):  # fmt: skip
        assert old in text
    moved = (text.replace('"Glm4MoeForCausalLM": ("glm4_moe", "Glm4MoeForCausalLM")',
                          '"Glm4MoeForCausalLM": ("vllm.models.glm4_moe", "Glm4MoeForCausalLM")')
             .replace('"Qwen3_5MoeForCausalLM": ("qwen3_5", "Qwen3_5MoeForCausalLM")',
                      '"Qwen3_5MoeForCausalLM": ("vllm.models.qwen3_5", "Qwen3_5MoeForCausalLM")')
             .replace('"DeepseekV2ForCausalLM": ("deepseek_v2", "DeepseekV2ForCausalLM")',
                      '"DeepseekV2ForCausalLM": ("vllm.models.deepseek", "DeepseekV2ForCausalLM")'))  # fmt: skip
    root = _release(tmp_path, {
        registry: moved,
        "vllm/models/__init__.py": "",
        "vllm/models/glm4_moe.py": "class Glm4MoeForCausalLM:\n    pass\n",  # a new implementation
        "vllm/models/qwen3_5.py": "class Qwen3_5MoeForCausalLM:\n    pass\n",
        "vllm/models/deepseek.py": "from vllm.model_executor.models.deepseek_v2 import DeepseekV2ForCausalLM\n",
    })  # fmt: skip
    problems = {name: p for (module, name), p in _problems(root).items() if module.endswith(".registry")}
    assert problems == {
        "Glm4MoeForCausalLM": "vLLM resolves it to vllm.models.glm4_moe:Glm4MoeForCausalLM, the plugin's class "
        "subclasses vllm.model_executor.models.glm4_moe:Glm4MoeForCausalLM"
    }


def test_a_folder_one_level_too_deep_or_too_high_says_where_vllm_is(tmp_path, capsys):
    _write(tmp_path / "unpacked", {"vllm/__init__.py": "", "vllm/_version.py": "__version__ = '0.34.0'\n"})
    assert vllm_compat.main([str(tmp_path / "unpacked" / "vllm")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'unpacked' / 'vllm'} is the vllm package itself: give the folder that holds it, " \
           f"{tmp_path / 'unpacked'}" in err  # fmt: skip
    assert "missing" not in err
    assert vllm_compat.main([str(tmp_path)]) == 2
    assert f"it is under {tmp_path / 'unpacked'}: give that folder" in capsys.readouterr().err


WHEEL_034 = Path.home() / ".cache" / "vllm-fse" / "wheels" / "vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl"


@pytest.mark.skipif(not WHEEL_034.exists(), reason=f"no cached 0.34 wheel ({WHEEL_034}; see docs/compat.md)")
def test_the_vllm_0_34_wheel_passes(capsys):
    assert vllm_compat.main([str(WHEEL_034)]) == 0, capsys.readouterr().out
