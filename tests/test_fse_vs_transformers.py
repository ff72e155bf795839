"""vLLM with FSE matches the transformers reference implementation of the same checkpoint
(fp32, teacher-forced logprobs of fixed texts)."""

from __future__ import annotations

import pytest
import torch
from conftest import SCORE_TEXTS, engine_run, run_engines

pytestmark = pytest.mark.e2e

CHECKPOINTS = {
    "shared2-rsf2.5-norm1": {"n_shared_experts": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True},
    "shared1-rsf2.5-norm0": {"n_shared_experts": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": False},
}
TOL = 1e-3  # two fp32 implementations (different attention and MoE kernels)


@pytest.fixture(scope="module")
def vllm_scores(tiny_model, tmp_path_factory):
    runs = [
        engine_run(tiny_model("tiny", **spec), env={"VLLM_FSE": "1"}, score_texts=SCORE_TEXTS, probes=("describe_model",))
        for spec in CHECKPOINTS.values()
    ]
    results = run_engines(runs, tmp_path_factory.mktemp("vs-transformers"))
    return dict(zip(CHECKPOINTS, results))


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_vllm_fse_matches_transformers_logprobs(vllm_scores, tiny_model, name):
    from transformers import AutoModelForCausalLM

    result = vllm_scores[name]
    assert "error" not in result, result.get("traceback")
    assert result["describe_model"][0]["fse_path"] == "BACKEND_NEUTRAL"
    model = AutoModelForCausalLM.from_pretrained(tiny_model("tiny", **CHECKPOINTS[name]), dtype=torch.float32).eval()
    worst = 0.0
    for scored in result["scores"]:
        ids = torch.tensor([scored["token_ids"]])
        with torch.no_grad():
            reference = model(ids).logits[0].log_softmax(-1)
        for pos, step in enumerate(scored["logprobs"]):
            if not step:
                continue
            for tok, logprob in step.items():  # vLLM's top-5 plus the text's token
                worst = max(worst, abs(reference[pos - 1, tok].item() - logprob))
    assert worst <= TOL, f"max |vLLM - transformers| = {worst:.2e}"
