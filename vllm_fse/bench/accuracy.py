"""``vllm-fse bench accuracy``: lm-eval against an FSE-off and an FSE-on server, compared per sample.

Both arms serve the same model (``VLLM_FSE=0`` / ``VLLM_FSE=1`` plus any ``--env*``); lm-eval's
``local-completions`` client runs the same tasks against each. The report has each task's
accuracy per arm with lm-eval's standard error, the delta with its *paired* standard error (same
items in both arms), and, per sample, whether both arms agree: loglikelihoods within
``--ll-atol`` for loglikelihood tasks, identical text for generation tasks.

Default tasks are the shipped ``fse_arith_mc`` and ``fse_arith_gen`` (no download needed). On
real hardware, the seed PRs' check is ``--tasks gsm8k --num-fewshot 5``. Exit status 0 when every
delta is within two paired standard errors and every loglikelihood within tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_fse.bench.arms import (
    ARM_NAMES,
    SERVED_MODEL_NAME,
    ArmServers,
    add_model_arguments,
    add_server_arguments,
    arm_environments,
    resolve_model,
    server_mode,
)
from vllm_fse.bench.stats import ProportionDelta, paired_proportion_delta

TASKS_DIR = Path(__file__).with_name("tasks")
DEFAULT_TASKS = ["fse_arith_mc", "fse_arith_gen"]


def add_accuracy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="results directory")
    add_model_arguments(parser, preset="tiny")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for lm-eval (default: the model)")
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS,
                        help=f"lm-eval tasks (default: {' '.join(DEFAULT_TASKS)}, shipped with vllm-fse)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="override the tasks' few-shot count")
    parser.add_argument("--limit", type=float, default=None, help="lm-eval --limit: items (or fraction) per task")
    parser.add_argument("--num-concurrent", type=int, default=8, help="concurrent requests per arm")
    parser.add_argument("--max-length", type=int, default=2048, help="lm-eval's context limit")
    parser.add_argument("--ll-atol", type=float, default=1e-3,
                        help="per-sample loglikelihood tolerance between arms (default 1e-3, for fp32; "
                             "bf16 needs about 0.05, and batch-dependent GPU kernels more)")
    add_server_arguments(parser)


def evaluate_arm(url: str, args: argparse.Namespace, tokenizer: str) -> dict:
    """lm-eval's results for one server, with per-sample logs."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {
        "model": SERVED_MODEL_NAME,
        "base_url": f"{url}/v1/completions",
        "tokenizer": tokenizer,
        "tokenizer_backend": "huggingface",
        "num_concurrent": args.num_concurrent,
        "max_retries": 3,
        "max_length": args.max_length,
        "tokenized_requests": True,  # the same token ids reach both arms
    }
    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=args.tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


# -- per-sample comparison -------------------------------------------------------------------


def _loglikelihoods(sample: dict) -> list[float] | None:
    """The sample's loglikelihoods (one per choice), or None for a generation sample."""
    resps = sample.get("filtered_resps")
    if resps and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in resps):
        try:
            return [float(r[0]) for r in resps]
        except (TypeError, ValueError):
            return None
    return None


def _generation(sample: dict) -> str | None:
    resps = sample.get("resps")
    if resps and isinstance(resps[0], list) and resps[0] and isinstance(resps[0][0], str):
        return resps[0][0]
    return None


@dataclass
class TaskComparison:
    task: str
    n: int
    ll_samples: int
    ll_max_abs_diff: float | None
    ll_over_tolerance: int
    generations: int
    generations_identical: int
    metrics: dict[str, ProportionDelta]
    lm_eval_stderr: dict[str, dict[str, float | None]]

    def passed(self) -> bool:
        return self.ll_over_tolerance == 0 and all(d.within_stderr for d in self.metrics.values())


def compare_task(task: str, samples: dict[str, list[dict]], results: dict[str, dict], atol: float) -> TaskComparison:
    by_doc = {arm: {s["doc_id"]: s for s in samples[arm]} for arm in ARM_NAMES}
    if by_doc["off"].keys() != by_doc["on"].keys():
        raise RuntimeError(f"{task}: the arms evaluated different items")
    doc_ids = sorted(by_doc["off"])
    ll_diffs, generations, identical = [], 0, 0
    for doc in doc_ids:
        off, on = by_doc["off"][doc], by_doc["on"][doc]
        ll_off, ll_on = _loglikelihoods(off), _loglikelihoods(on)
        if ll_off is not None and ll_on is not None:
            ll_diffs.append(max(abs(a - b) for a, b in zip(ll_off, ll_on)))
        text_off, text_on = _generation(off), _generation(on)
        if text_off is not None and text_on is not None:
            generations += 1
            identical += text_off == text_on
    metrics, stderr = {}, {}
    metric_keys = _metric_keys(results["off"], task)
    for key in metric_keys:  # e.g. "acc,none", "exact_match,strict-match"
        name, filt = key.split(",", 1)
        # lm-eval logs one sample row per filter; each metric is scored on its filter's rows.
        rows = {arm: {s["doc_id"]: s for s in samples[arm] if s.get("filter", "none") == filt} for arm in ARM_NAMES}
        if rows["off"].keys() != set(doc_ids) or rows["on"].keys() != set(doc_ids):
            raise RuntimeError(f"{task}: samples of filter {filt!r} do not cover the evaluated items")
        scores = {arm: [float(rows[arm][d][name]) for d in doc_ids] for arm in ARM_NAMES}
        metrics[key] = paired_proportion_delta(scores["off"], scores["on"])
        stderr[key] = {arm: _stderr(results[arm], task, key) for arm in ARM_NAMES}
    return TaskComparison(
        task=task,
        n=len(doc_ids),
        ll_samples=len(ll_diffs),
        ll_max_abs_diff=max(ll_diffs) if ll_diffs else None,
        ll_over_tolerance=sum(d > atol for d in ll_diffs),
        generations=generations,
        generations_identical=identical,
        metrics=metrics,
        lm_eval_stderr=stderr,
    )


def _metric_keys(results: dict, task: str) -> list[str]:
    row = results["results"][task]
    return sorted(k for k in row if "," in k and "_stderr" not in k and isinstance(row[k], (int, float)))


def _stderr(results: dict, task: str, key: str) -> float | None:
    name, filt = key.split(",", 1)
    value = results["results"][task].get(f"{name}_stderr,{filt}")
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def render_markdown(comparisons: list[TaskComparison], meta: dict, atol: float) -> str:
    from vllm_fse.bench.machine import machine_line

    lines = [
        f"# Accuracy A/B, FSE off vs on: {Path(meta['model']).name}",
        "",
        f"- Machine: {machine_line(meta['machine'])}",
        f"- Server arguments (both arms): `{' '.join(meta['server_args'])}`",
        f"- Command: `{meta['command']}`",
        "",
        "Accuracy ± lm-eval's standard error per arm; Δ = FSE=1 - FSE=0 ± the paired standard error (same items "
        "in both arms); `ok` when |Δ| <= 2 paired standard errors (Δ = 0 when that error is 0).",
        "",
        "| Task | Metric | n | FSE=0 | FSE=1 | Δ | verdict |",
        "|:--|:--|--:|--:|--:|--:|:--|",
    ]
    for c in comparisons:
        for key, d in c.metrics.items():
            se = c.lm_eval_stderr[key]
            fmt = lambda acc, s: f"{acc:.4f} ± {s:.4f}" if s is not None else f"{acc:.4f}"  # noqa: E731
            lines.append(
                f"| {c.task} | {key} | {d.n} | {fmt(d.acc_a, se['off'])} | {fmt(d.acc_b, se['on'])} | "
                f"{d.delta:+.4f} ± {d.stderr_delta:.4f} | {'ok' if d.within_stderr else 'DIFFERENT'} |"
            )
    lines += ["", "Per-sample agreement:", "",
              "| Task | loglikelihood samples | max abs Δ loglikelihood | over tolerance | generations identical |",
              "|:--|--:|--:|--:|--:|"]  # fmt: skip
    for c in comparisons:
        ll = f"{c.ll_max_abs_diff:.2e}" if c.ll_max_abs_diff is not None else "-"
        gens = f"{c.generations_identical}/{c.generations}" if c.generations else "-"
        lines.append(f"| {c.task} | {c.ll_samples} | {ll} | {c.ll_over_tolerance} (atol {atol:g}) | {gens} |")
    return "\n".join(lines) + "\n"


def run_accuracy(args: argparse.Namespace) -> tuple[list[TaskComparison], Path]:
    from vllm_fse.bench.machine import command_line, describe_machine

    model, dtype = resolve_model(args.model, args.preset, args.dtype)
    tokenizer = args.tokenizer or model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server_args = ["--max-model-len", str(args.max_length + 256), "--seed", "0"]
    server_args += [*(["--dtype", dtype] if dtype else []), *args.server_arg]
    arm_env = arm_environments(dict(args.env), dict(args.env_off), dict(args.env_on))
    servers = server_mode(args.servers)
    results: dict[str, dict] = {}
    with ArmServers(model, server_args, arm_env, out / "logs", args.startup_timeout) as arms:
        for arm in ARM_NAMES:
            arms.ensure(ARM_NAMES if servers == "both" else (arm,))
            print(f"[{arm}] lm-eval {' '.join(args.tasks)}", flush=True)
            results[arm] = evaluate_arm(arms.url(arm), args, tokenizer)
        info = arms.info
    samples = {arm: results[arm].pop("samples") for arm in ARM_NAMES}
    for arm in ARM_NAMES:
        with open(out / f"samples-{arm}.jsonl", "w") as f:
            for task, rows in samples[arm].items():
                for row in rows:
                    f.write(json.dumps({"task": task, **row}, default=str) + "\n")
    tasks = sorted(samples["off"])
    comparisons = [
        compare_task(task, {arm: samples[arm][task] for arm in ARM_NAMES}, results, args.ll_atol)
        for task in tasks
    ]
    meta = {
        "model": model,
        "server_args": server_args,
        "arm_env": arm_env,
        "servers": info,
        "machine": describe_machine(),
        "command": command_line(),
        "tasks": args.tasks,
        "num_fewshot": args.num_fewshot,
        "limit": args.limit,
        "ll_atol": args.ll_atol,
    }
    (out / "accuracy.json").write_text(json.dumps(
        {"meta": meta,
         "comparisons": [{**asdict(c), "passed": c.passed()} for c in comparisons],
         "lm_eval": {arm: {"results": results[arm].get("results"), "n-samples": results[arm].get("n-samples")}
                     for arm in ARM_NAMES}},
        indent=1, default=str))  # fmt: skip
    path = out / "accuracy.md"
    path.write_text(render_markdown(comparisons, meta, args.ll_atol))
    return comparisons, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-fse bench accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_accuracy_arguments(parser)
    args = parser.parse_args(argv)
    comparisons, path = run_accuracy(args)
    print(path.read_text())
    return 0 if all(c.passed() for c in comparisons) else 1


if __name__ == "__main__":
    sys.exit(main())
