"""Runs one vLLM engine (``vllm.LLM``) in a fresh process and writes its results as JSON.

Each engine gets its own process so that environment toggles (``VLLM_PLUGINS``, ``VLLM_FSE``)
take effect everywhere, as they do for a user who starts vLLM with them set.
Usage: python tests/engine_child.py REQUEST.json RESULT.json
"""

import json
import sys


def main(request_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams

    from vllm_fse import introspect

    request = json.loads(open(request_path).read())
    llm = LLM(**request["llm"])
    result = {}
    for probe in request.get("probes", []):
        result[probe] = llm.apply_model(getattr(introspect, probe))
    params = SamplingParams(**request["sampling"])
    outputs = llm.generate(request["prompts"], params, use_tqdm=False)
    result["outputs"] = [
        {
            "token_ids": list(o.outputs[0].token_ids),
            "text": o.outputs[0].text,
            # Per position: {token_id: logprob} of the top-k (plus the sampled token).
            "logprobs": [
                {str(tok): lp.logprob for tok, lp in step.items()}
                for step in (o.outputs[0].logprobs or [])
            ],
        }
        for o in outputs
    ]
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
