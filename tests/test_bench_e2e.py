"""The benchmark tools end to end on the tiny model with the real vLLM server and engine: the
sweep (one cell, both arms, then resumed), the lm-eval accuracy A/B, the decode profile, and
engine groups with the A/A control and the prefill profile, all eager (CI time; FSE in vLLM's compiled mode is tested by the families' and ``auto``'s tests). These are smoke runs of the tools, not performance tests."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

CLI = [sys.executable, "-m", "vllm_fse.cli", "bench"]


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_sweep_smoke_measures_both_arms_and_resumes(tmp_path: Path):
    out = tmp_path / "sweep"
    args = ["sweep", "--preset", "tiny", "--grid", "32/8", "--concurrency", "2", "--repeats", "2",
            "--min-prompts", "4", "--prompts-per-concurrency", "2", "--server-arg=--enforce-eager", "--out", str(out)]  # fmt: skip
    first = _run(args)
    assert "0 already in" in first.stdout and "[4/4]" in first.stdout
    raw = sorted(p.relative_to(out).as_posix() for p in (out / "raw").rglob("*.json"))
    assert raw == [f"raw/isl32-osl8-mc2/{arm}-rep{r}.json" for arm in ("off", "on") for r in (0, 1)]
    for path in (out / "raw").rglob("*.json"):
        run = json.loads(path.read_text())
        assert run["result"]["completed"] == 4 and run["result"]["total_output_tokens"] == 4 * 8
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["servers"]["off"]["fse"] == {}  # FSE not asked for: vLLM's own classes, no plan line
    assert manifest["servers"]["on"]["fse"] == {"FseGlm4MoeForCausalLM": "on"}
    md = (out / "summary.md").read_text()
    assert "| 32 | 8 | 2 | " in md and "FSE=0 -> FSE=1" in md
    assert (out / "deltas.png").read_bytes()[:4] == b"\x89PNG"

    again = _run(args)  # everything is there: no server starts, same report
    assert "4 already in" in again.stdout and "starting the server" not in again.stdout
    assert (out / "summary.md").read_text() == md


def test_accuracy_ab_agrees_per_sample(tmp_path: Path):
    out = tmp_path / "acc"
    proc = _run(["accuracy", "--preset", "tiny", "--limit", "12", "--server-arg=--enforce-eager", "--out", str(out)])
    assert "| fse_arith_mc | acc,none | 12 |" in proc.stdout
    data = json.loads((out / "accuracy.json").read_text())
    assert "--enforce-eager" in data["meta"]["server_args"]  # the extra server argument reached both arms
    by_task = {c["task"]: c for c in data["comparisons"]}
    mc, gen = by_task["fse_arith_mc"], by_task["fse_arith_gen"]
    assert mc["ll_samples"] == 12 and mc["ll_max_abs_diff"] < 1e-3 and mc["ll_over_tolerance"] == 0
    assert gen["generations"] == 12 and gen["generations_identical"] == 12
    assert all(c["passed"] for c in data["comparisons"])
    for arm in ("off", "on"):  # one row per item and filter: 1 filter for mc, 2 for gen
        tasks = Counter(json.loads(line)["task"] for line in (out / f"samples-{arm}.jsonl").read_text().splitlines())
        assert tasks == {"fse_arith_mc": 12, "fse_arith_gen": 24}


def test_profile_sees_the_shared_expert_gemms_disappear(tmp_path: Path):
    out = tmp_path / "profile"
    _run(["profile", "--preset", "tiny", "--batch", "2", "--input-len", "32", "--steps", "6",
          "--profile-steps", "3", "--warmup-steps", "2", "--rounds", "1", "--eager", "--out", str(out)])  # fmt: skip
    data = json.loads((out / "profile.json").read_text())
    row = data["summary"]["batches"]["2"]
    moe_layers = data["summary"]["moe_layers"]
    assert moe_layers == 2
    # Unfused, each MoE layer runs the shared MLP as two GEMMs; fused, they are gone.
    assert row["off"]["gemm_calls_per_step"] - row["on"]["gemm_calls_per_step"] == 2 * moe_layers
    assert row["on"]["category_ms_per_step"]["MoE experts kernel"] > 0
    assert data["meta"]["live_model"]["on"]["fse_path"] == "BACKEND_NEUTRAL"
    assert data["meta"]["live_model"]["off"]["fse_path"] is None  # vLLM's own class
    assert data["meta"]["live_model"]["off"]["class"] == "vllm.model_executor.models.glm4_moe:Glm4MoeForCausalLM"
    assert "## Where a decode step goes, batch 2" in (out / "profile.md").read_text()


def test_engine_groups_with_aa_control_and_prefill_profile_run_their_arms(tmp_path: Path):
    out = tmp_path / "groups.json"
    proc = _run(["engine-groups", "--preset", "tiny", "--arms", "off=0", "split=auto,VLLM_FSE_FUSED_MAX_TOKENS=0",
                 "--aa-control", "--engines-per-arm", "1", "--decode-batch", "2", "--steps", "4",
                 "--prefill-tokens", "64", "--prefill-rounds", "2", "--eager", "--out", str(out)])  # fmt: skip
    assert "<- A/A control" in proc.stdout
    data = json.loads(out.read_text())
    assert data["build_order"] == ["off", "split", "aa"] and data["aa_control"]
    assert [row.get("batch", row.get("prefill_tokens")) for row in data["rows"]] == [2, 64]
    for row in data["rows"]:
        assert set(row["ratios"]) == {"split/off", "aa/off", "aa/split"}
        assert all(r["paired"]["ratio"] > 0 for r in row["ratios"].values())  # one engine per arm: paired steps
        assert set(row["minor_faults_per_step"]) == {"off", "split", "aa"}

    profile_dir = tmp_path / "prefill"
    proc = _run(["profile", "--preset", "tiny", "--prefill-tokens", "128", "--arms", "off=0", "on=1",
                 "--rounds", "1", "--eager", "--out", str(profile_dir)])  # fmt: skip
    assert "prefill step of 128 tokens" in proc.stdout and "on - off, self CPU ms per step" in proc.stdout
    profiled = json.loads((profile_dir / "prefill-profile.json").read_text())
    # FSE off runs the shared expert as two dense GEMMs per MoE layer; fused, they are gone.
    gemms = {arm: profiled["calls_per_step"][arm].get("_C::onednn_mm", 0) + profiled["calls_per_step"][arm].get("aten::mm", 0)
             for arm in ("off", "on")}  # fmt: skip
    assert gemms["off"] - gemms["on"] == 2 * 2  # the tiny model's 2 MoE layers
