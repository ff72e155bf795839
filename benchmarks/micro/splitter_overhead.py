"""What vllm_fse.loading's splitter adds to weight iteration: time and peak memory.

Writes a synthetic multi-GB GLM-4 MoE checkpoint (real tensor names and shapes, sharded like
HF checkpoints), then iterates it with vLLM's own ``safetensors_weights_iterator`` the way a
model load does, copying every tensor into a destination like a weight loader: once as is
("raw") and once through ``split_shared_experts`` ("fse"). Runs alternate and repeat; each run
is a fresh process, so its peak RSS is its own.

    .venv/bin/python benchmarks/micro/splitter_overhead.py --dir /tmp/fse-synthetic --gb 3 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, MOE_INTER, N_ROUTED, N_SHARED = 2048, 1024, 32, 2


def write_checkpoint(directory: Path, gb: float) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    per_layer = 3 * HIDDEN * MOE_INTER * 2 * (N_ROUTED + N_SHARED)  # bf16 bytes
    layers = max(1, int(gb * 2**30 / per_layer))
    files = []
    for layer in range(layers):  # one shard per layer, ~0.4 GB each
        path = directory / f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        files.append(path)
        if path.exists():
            continue
        p = f"model.layers.{layer}.mlp"
        t = {f"{p}.gate.weight": torch.ones(N_ROUTED, HIDDEN, dtype=torch.bfloat16)}
        for e in range(N_ROUTED):
            for proj, shape in (("gate_proj", (MOE_INTER, HIDDEN)), ("up_proj", (MOE_INTER, HIDDEN)), ("down_proj", (HIDDEN, MOE_INTER))):
                t[f"{p}.experts.{e}.{proj}.weight"] = torch.full(shape, e / N_ROUTED, dtype=torch.bfloat16)
        wide = MOE_INTER * N_SHARED
        t[f"{p}.shared_experts.gate_proj.weight"] = torch.full((wide, HIDDEN), 0.5, dtype=torch.bfloat16)
        t[f"{p}.shared_experts.up_proj.weight"] = torch.full((wide, HIDDEN), 0.5, dtype=torch.bfloat16)
        t[f"{p}.shared_experts.down_proj.weight"] = torch.full((HIDDEN, wide), 0.5, dtype=torch.bfloat16)
        save_file(t, str(path), metadata={"format": "pt"})
    return files


def iterate(files: list[str], fse: bool) -> dict:
    """One pass over the checkpoint, as a model load would make it."""
    import torch
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    from vllm_fse.loading import SharedExpertLayout, split_shared_experts

    weights = safetensors_weights_iterator(files, False)
    if fse:
        layout = SharedExpertLayout(N_ROUTED, N_SHARED, HIDDEN, MOE_INTER, frozenset(range(len(files))))
        weights = split_shared_experts(weights, layout)
    start = time.perf_counter()
    count = nbytes = 0
    for _, tensor in weights:
        destination = torch.empty(tensor.shape, dtype=tensor.dtype)
        destination.copy_(tensor)  # what a weight loader does with it
        count += 1
        nbytes += tensor.numel() * tensor.element_size()
    return {
        "seconds": time.perf_counter() - start,
        "tensors": count,
        "bytes": nbytes,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def transform_only(files: list[str], passes: int = 30) -> dict:
    """The splitter's own cost, without I/O: the checkpoint's names with meta tensors."""
    import torch
    from safetensors import safe_open

    from vllm_fse.loading import SharedExpertLayout, split_shared_experts

    items = []
    for path in files:
        with safe_open(path, "pt") as f:
            for name in f.keys():  # noqa: SIM118
                items.append((name, torch.empty(f.get_slice(name).get_shape(), dtype=torch.bfloat16, device="meta")))
    layout = SharedExpertLayout(N_ROUTED, N_SHARED, HIDDEN, MOE_INTER, frozenset(range(len(files))))

    def best(run) -> float:
        times = []
        for _ in range(passes):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    plain = best(lambda: [None for _ in iter(items)])
    split = best(lambda: [None for _ in split_shared_experts(iter(items), layout)])
    return {"plain_seconds": plain, "split_seconds": split, "added_seconds": split - plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/fse-synthetic-checkpoint")
    parser.add_argument("--gb", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the JSON summary here")
    parser.add_argument("--child", choices=["raw", "fse", "transform-only"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    files = write_checkpoint(Path(args.dir), args.gb)
    if args.child == "transform-only":
        print(json.dumps(transform_only([str(f) for f in files])))
        return
    if args.child:
        print(json.dumps(iterate([str(f) for f in files], args.child == "fse")))
        return

    size_gb = sum(f.stat().st_size for f in files) / 2**30
    print(f"checkpoint: {len(files)} shards, {size_gb:.2f} GiB in {args.dir}", flush=True)

    def run(kind: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--gb", str(args.gb), "--child", kind],
                             check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    run("raw")  # warm the page cache; not counted
    results = {"raw": [], "fse": []}
    for rep in range(args.repeats):
        for kind in (("raw", "fse") if rep % 2 == 0 else ("fse", "raw")):
            r = run(kind)
            results[kind].append(r)
            print(f"rep {rep} {kind}: {r['seconds']:.2f}s, {r['tensors']} tensors, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    transform = run("transform-only")
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
    peak = {k: max(r["peak_rss_mb"] for r in v) for k, v in results.items()}
    summary = {
        "checkpoint_gib": size_gb,
        "median_seconds": med,
        "time_overhead_pct": 100 * (med["fse"] / med["raw"] - 1),
        "max_peak_rss_mb": peak,
        "peak_rss_delta_mb": peak["fse"] - peak["raw"],
        # Measured alone (no I/O), the splitter's cost as a share of one raw iteration: the
        # end-to-end medians above cannot resolve it through the machine's noise.
        "transform_only": transform,
        "transform_share_of_raw_pct": 100 * transform["added_seconds"] / med["raw"],
        "runs": results,
    }
    print(
        f"median iteration: raw {med['raw']:.2f}s, fse {med['fse']:.2f}s ({summary['time_overhead_pct']:+.2f}%); "
        f"peak RSS raw {peak['raw']:.0f} MB, fse {peak['fse']:.0f} MB ({summary['peak_rss_delta_mb']:+.0f} MB); "
        f"splitter alone {1e3 * transform['added_seconds']:.2f} ms per pass = "
        f"{summary['transform_share_of_raw_pct']:.2f}% of a raw iteration"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
