"""``vllm-fse check-vllm``: the names the plugin uses are found in a vLLM source tree without
importing it (re-exports, star imports, inherited class attributes), and a release that lost a
name or a parameter fails the check."""

from __future__ import annotations

import textwrap
import zipfile

import pytest

from vllm_fse import vllm_compat
from vllm_fse.vllm_compat import SourceTree, check, lookup

pytestmark = pytest.mark.unit


def test_the_installed_vllm_has_every_name_the_plugin_uses(capsys):
    assert vllm_compat.main([]) == 0, capsys.readouterr().out
    uses = vllm_compat.plugin_imports()
    assert any(u.module == "vllm.forward_context" and u.name == "get_forward_context" for u in uses)
    optional = [u for u in uses if u.optional]
    assert [u.name for u in optional] == ["get_expert_substitution_spec"]  # 0.33+, imported under ImportError


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
