"""On the real vLLM CPU engine: the plugin is inert unless FSE is asked for. With ``VLLM_FSE``
unset or ``0`` vLLM instantiates its own class and serves exactly what vLLM without the plugin
serves; with ``1`` or ``auto`` it instantiates the plugin's class, which serves the same."""

from __future__ import annotations

import pytest
from conftest import engine_run, run_keyed_engines
from equivalence import compare_outputs

import vllm_fse

pytestmark = pytest.mark.e2e

VLLM_CLASS = "vllm.model_executor.models.glm4_moe:Glm4MoeForCausalLM"
# In this order, in one process: a run after an FSE run must find vLLM's class back.
ARMS = {
    "fse=1": {"VLLM_FSE": "1"},
    "unset": {},
    "fse=0": {"VLLM_FSE": "0"},
    "auto": {"VLLM_FSE": "auto", "VLLM_FSE_FUSED_MAX_TOKENS": "4"},  # both paths, no measuring
    "no plugin": {"VLLM_PLUGINS": ""},
}


@pytest.fixture(scope="module")
def arms(tiny_model, tmp_path_factory):
    model = tiny_model("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("VLLM_FSE", raising=False)  # "unset" means unset
        mp.delenv("VLLM_PLUGINS", raising=False)
        runs = {arm: engine_run(model, env=env, probes=("model_class",)) for arm, env in ARMS.items()}
        return run_keyed_engines(runs, tmp_path_factory.mktemp("plugin-inert"))


def test_fse_not_asked_for_runs_vllms_own_class(arms):
    for arm in ("unset", "fse=0", "no plugin"):
        assert arms[arm]["model_class"] == [VLLM_CLASS], arm


def test_fse_asked_for_runs_the_plugins_class(arms):
    for arm in ("fse=1", "auto"):
        assert arms[arm]["model_class"] == [vllm_fse.MODEL_OVERRIDES["Glm4MoeForCausalLM"]], arm


def test_the_installed_plugin_with_fse_off_serves_exactly_what_vllm_serves(arms):
    plain = arms["no plugin"]["outputs"]
    assert len(plain) == 4 and all(len(o["token_ids"]) == 16 for o in plain)
    for arm in ("unset", "fse=0"):
        for ours, theirs in zip(arms[arm]["outputs"], plain):
            assert ours["token_ids"] == theirs["token_ids"]
            assert ours["logprobs"] == theirs["logprobs"]


def test_the_plugins_class_serves_what_vllm_serves(arms):
    for arm in ("fse=1", "auto"):
        compare_outputs(arms[arm]["outputs"], arms["unset"]["outputs"], "float32")
