"""On the real vLLM CPU engine: the plugin's class is what vLLM instantiates, and it serves
exactly what upstream serves."""

from __future__ import annotations

import pytest
from conftest import run_engine

import vllm_fse

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def plugin_and_upstream_runs(tiny_model, tmp_path_factory):
    model = tiny_model("tiny")
    tmp = tmp_path_factory.mktemp("plugin-vs-upstream")
    plugin = run_engine(model, tmp, env={"VLLM_PLUGINS": "fse"}, probes=("model_class",))
    upstream = run_engine(model, tmp, env={"VLLM_PLUGINS": ""}, probes=("model_class",))
    return plugin, upstream


def test_engine_instantiates_the_plugin_class(plugin_and_upstream_runs):
    plugin, upstream = plugin_and_upstream_runs
    assert plugin["model_class"] == [vllm_fse.MODEL_OVERRIDES["Glm4MoeForCausalLM"]]
    assert upstream["model_class"] == ["vllm.model_executor.models.glm4_moe:Glm4MoeForCausalLM"]


def test_plugin_and_upstream_give_identical_greedy_tokens_and_logprobs(plugin_and_upstream_runs):
    plugin, upstream = plugin_and_upstream_runs
    assert len(plugin["outputs"]) == len(upstream["outputs"]) == 4
    for ours, theirs in zip(plugin["outputs"], upstream["outputs"]):
        assert len(ours["token_ids"]) == 16
        assert ours["token_ids"] == theirs["token_ids"]
        for step_ours, step_theirs in zip(ours["logprobs"], theirs["logprobs"]):
            assert step_ours.keys() == step_theirs.keys()
            for tok, lp in step_ours.items():
                assert lp == pytest.approx(step_theirs[tok], abs=1e-5)
