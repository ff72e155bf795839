"""The OpenAI server with FSE on handles 64 concurrent requests of mixed length, and a fixed
subset of greedy completions equals FSE off."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_fse.server import OpenAIServer

pytestmark = pytest.mark.e2e

SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "64", "--seed", "0"]
WORDS = "the river runs past the old mill under the stone bridge and into the sea people buy bread fish apples".split()


def _requests(n: int) -> list[dict]:
    rng = random.Random(0)
    return [
        {
            "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 400))),
            "max_tokens": rng.randint(1, 48),
        }
        for _ in range(n)
    ]


SUBSET = [
    {"prompt": "The quick brown fox", "max_tokens": 24},
    {"prompt": "What is the capital of France?", "max_tokens": 24},
    {"prompt": " ".join(WORDS * 10), "max_tokens": 24},
]


def _greedy(server: OpenAIServer, request: dict) -> dict:
    return server.complete(request["prompt"], max_tokens=request["max_tokens"], temperature=0.0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    model = tiny_model("tiny", n_shared_experts=2)
    logs = tmp_path_factory.mktemp("serve")
    out = {}
    with OpenAIServer(model, SERVER_ARGS, env={"VLLM_FSE": "1"}, log_path=logs / "fse-on.log") as server:
        requests = _requests(64)
        with ThreadPoolExecutor(max_workers=64) as pool:
            out["concurrent"] = list(pool.map(lambda r: _greedy(server, r), requests))
        out["requests"] = requests
        out["on_subset"] = [_greedy(server, r) for r in SUBSET]
        out["on_log"] = (logs / "fse-on.log").read_text()
    with OpenAIServer(model, SERVER_ARGS, env={"VLLM_FSE": "0"}, log_path=logs / "fse-off.log") as server:
        out["off_subset"] = [_greedy(server, r) for r in SUBSET]
        out["off_log"] = (logs / "fse-off.log").read_text()
    return out


def test_server_really_runs_fse(served):
    assert "FseGlm4MoeForCausalLM FSE on (backend-neutral router append" in served["on_log"]
    # FSE off: the plugin registers nothing, vLLM runs its own class (no plan line).
    assert "vllm-fse: plugin" not in served["off_log"] and " FSE off (" not in served["off_log"]


def test_64_concurrent_requests_of_mixed_length_all_complete(served):
    lengths = [r["usage"]["prompt_tokens"] for r in served["concurrent"]]
    assert max(lengths) > 10 * min(lengths)  # really mixed
    for request, response in zip(served["requests"], served["concurrent"]):
        (choice,) = response["choices"]
        assert response["usage"]["completion_tokens"] == request["max_tokens"]
        assert choice["finish_reason"] == "length"
        assert len(choice["logprobs"]["token_logprobs"]) == request["max_tokens"]


def test_greedy_subset_equals_fse_off(served):
    for on, off in zip(served["on_subset"], served["off_subset"]):
        on_choice, off_choice = on["choices"][0], off["choices"][0]
        assert on_choice["logprobs"]["tokens"] == off_choice["logprobs"]["tokens"]
        assert on_choice["text"] == off_choice["text"]
        for a, b in zip(on_choice["logprobs"]["token_logprobs"], off_choice["logprobs"]["token_logprobs"]):
            assert a == pytest.approx(b, abs=1e-4)
