"""Runs vLLM engines (``vllm.LLM``) one after another in a fresh process; saves their results.

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that a run costs
seconds, not a process start; workers are spawned per run only for tensor parallelism. Each
run's ``env`` (e.g. ``VLLM_FSE``) is set before its engine is built, so it reaches the model
construction exactly as it would for a user who starts vLLM with it.
Usage: python tests/engine_child.py REQUEST.json RESULT.pt
"""

import gc
import json
import os
import sys
import traceback


def _probe(name: str):
    """A function of :mod:`vllm_fse.introspect`, or ``module:function`` importable from tests/
    (e.g. a deliberate mutation of the live model that a test must catch)."""
    import importlib

    from vllm_fse import introspect

    if ":" in name:
        module, _, function = name.partition(":")
        return getattr(importlib.import_module(module), function)
    return getattr(introspect, name)


def run_one(run: dict) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_fse import introspect

    for setup in run.get("setup", []):  # ``module:function`` run before the engine is built
        _probe(setup)()
    llm = LLM(**run["llm"])
    try:
        result = {probe: llm.apply_model(_probe(probe)) for probe in run.get("probes", [])}
        for probe in run.get("worker_probes", []):  # e.g. the drafter, which apply_model cannot reach
            result[probe] = llm.collective_rpc(getattr(introspect, probe))
        # No prompts: the engine is only built, loaded and probed.
        outputs = llm.generate(run["prompts"], SamplingParams(**run["sampling"]), use_tqdm=False) if run["prompts"] else []
        result["outputs"] = [
            {
                "token_ids": list(o.outputs[0].token_ids),
                "text": o.outputs[0].text,
                # Per position: {token_id: logprob} of the top-k (plus the chosen token).
                "logprobs": [
                    {tok: lp.logprob for tok, lp in step.items()}
                    for step in (o.outputs[0].logprobs or [])
                ],
            }
            for o in outputs
        ]
        if run.get("score_texts"):
            # Teacher-forced: logprobs of fixed texts, so one deviation cannot cascade.
            scored = llm.generate(
                run["score_texts"],
                SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=run["sampling"]["logprobs"]),
                use_tqdm=False,
            )
            result["scores"] = [
                {
                    "token_ids": list(o.prompt_token_ids),
                    "logprobs": [
                        {tok: lp.logprob for tok, lp in step.items()} if step else {}
                        for step in o.prompt_logprobs
                    ],
                }
                for o in scored
            ]
        for probe in run.get("after_probes", []):  # the live model once generation is done
            result[f"after:{probe}"] = llm.apply_model(_probe(probe))
        for probe in run.get("after_worker_probes", []):
            result[f"after:{probe}"] = llm.collective_rpc(getattr(introspect, probe))
        if run.get("metrics"):
            result["metrics"] = {
                m.name: getattr(m, "value", getattr(m, "values", None)) for m in llm.get_metrics()
            }
        return result
    finally:
        del llm
        gc.collect()


def sync_plugin_registration() -> None:
    """Registry entries as a fresh process with this run's environment would have them: vLLM
    loads its plugins once per process, and the plugin registers its classes only when FSE is
    asked for (``VLLM_FSE``), so a later run with other settings must register again (or put
    vLLM's own classes back)."""
    from vllm.plugins import load_general_plugins

    import vllm_fse

    load_general_plugins()  # the first run: vLLM's own plugin loading
    allowed = os.environ.get("VLLM_PLUGINS")  # as vllm.envs parses it (read afresh: vLLM may cache envs)
    if allowed is None or "fse" in allowed.split(","):
        vllm_fse.register()
    else:
        vllm_fse.restore_vllm_classes()


def main(request_path: str, result_path: str) -> None:
    import torch

    runs = json.loads(open(request_path).read())["runs"]
    results = []
    for run in runs:
        saved = {k: os.environ.get(k) for k in run.get("env", {})}
        os.environ.update(run.get("env", {}))
        try:
            sync_plugin_registration()
            results.append(run_one(run))
        except Exception as e:  # report which run failed, keep its message for the test
            results.append({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    torch.save(results, result_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
