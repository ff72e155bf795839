"""Resolving a model's switch point at its first MoE call: cached, else measured on the live
layer (both paths timed at a ladder of token counts); tensor-parallel ranks adopt rank 0's."""

from __future__ import annotations

import statistics
import time

import torch

from vllm_fse.auto.cache import CACHE_FILE, cache_key, read_cache, write_cache
from vllm_fse.auto.switch_point import SwitchedLayer
from vllm_fse.compat import cache_dir, logger

# Calibration: stop climbing the ladder once split has won this many points in a row, or once
# this much time went into it. Past the budget, unmeasured sizes run fused only if fused won the
# last FUSED_WINS_TO_EXTRAPOLATE sizes (above a few hundred tokens both paths are compute-bound and
# their ratio is flat; docs/design.md gives the measured ratios); otherwise they run split, i.e.
# as unfused.
SPLIT_WINS_TO_STOP = 2
FUSED_WINS_TO_EXTRAPOLATE = 2
CALIBRATION_BUDGET_S = 8.0


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def time_paths(layer: SwitchedLayer, tokens: int, like_x: torch.Tensor, like_ids: torch.Tensor, reps: int
               ) -> tuple[float, float]:  # fmt: skip
    """Median seconds of one fused and one split call at ``tokens`` (interleaved, random routing;
    dtypes, device and top-k as the layer's real first call ``like_x``/``like_ids``)."""
    device = like_x.device
    gen = torch.Generator(device="cpu").manual_seed(tokens)
    x = torch.randn(tokens, like_x.shape[-1], generator=gen).to(device=device, dtype=like_x.dtype)
    scores = torch.rand(tokens, layer.n_routed, generator=gen)
    weights, ids = scores.topk(like_ids.shape[1], dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(device).contiguous()
    ids = ids.to(device=device, dtype=like_ids.dtype).contiguous()
    paths = {"fused": layer.fused, "split": layer.split}
    times: dict[str, list[float]] = {"fused": [], "split": []}
    for rep in range(reps + 1):  # the first round warms up
        order = ("fused", "split") if rep % 2 == 0 else ("split", "fused")
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            paths[name](x, weights, ids)
            _sync(device)
            if rep:
                times[name].append(time.perf_counter() - t0)
    return statistics.median(times["fused"]), statistics.median(times["split"])


def ladder(max_tokens: int) -> list[int]:
    """1, 2, 4, ... up to and including ``max_tokens``."""
    sizes, t = [], 1
    while t < max_tokens:
        sizes.append(t)
        t *= 2
    return sizes + [max_tokens]


def measure_switch_point(
    layer: SwitchedLayer, like_x: torch.Tensor, like_ids: torch.Tensor, budget_s: float = CALIBRATION_BUDGET_S
) -> tuple[int, list[dict]]:
    """Climb the token ladder timing both paths; fused up to the last size where it won before
    split won ``SPLIT_WINS_TO_STOP`` sizes in a row. If the next size would overrun the budget (a
    size costs about twice the one before it), the sizes left unmeasured run fused when fused won
    the last ``FUSED_WINS_TO_EXTRAPOLATE`` measured sizes, split otherwise."""
    start = time.perf_counter()
    max_tokens = layer.switch.max_num_batched_tokens
    fused_max, split_streak, fused_streak, rows, last_size_s = 0, 0, 0, [], 0.0
    for tokens in ladder(max_tokens):
        elapsed = time.perf_counter() - start
        if elapsed + 2 * last_size_s > budget_s:
            extrapolate = fused_streak >= FUSED_WINS_TO_EXTRAPOLATE
            logger.warning(
                "vllm-fse: switch-point measurement stopped before %d tokens to stay within %.0f s; "
                "larger steps run %s",
                tokens,
                budget_s,
                f"fused (it won the last {fused_streak} sizes)" if extrapolate else "split",
            )
            if extrapolate:
                fused_max = max_tokens
            break
        reps = 5 if tokens <= 64 else 3 if tokens <= 512 else 2
        t0 = time.perf_counter()
        fused_s, split_s = time_paths(layer, tokens, like_x, like_ids, reps=reps)
        last_size_s = time.perf_counter() - t0
        rows.append({"tokens": tokens, "fused_us": fused_s * 1e6, "split_us": split_s * 1e6})
        if fused_s <= split_s:
            if split_streak < SPLIT_WINS_TO_STOP:
                fused_max = tokens
            split_streak, fused_streak = 0, fused_streak + 1
        else:
            split_streak, fused_streak = split_streak + 1, 0
            if split_streak >= SPLIT_WINS_TO_STOP:
                break
    return fused_max, rows


def resolve_switch_point(layer: SwitchedLayer, x: torch.Tensor, topk_ids: torch.Tensor) -> None:
    """At a model's first MoE call under ``auto``: cached, else measured; then TP-agreed."""
    from vllm.distributed import get_tp_group

    switch = layer.switch
    start = time.perf_counter()
    path = cache_dir() / CACHE_FILE
    key = cache_key(layer, x)
    tp = get_tp_group()
    entry = read_cache(path).get(key)
    if entry is not None:
        fused_max, source, switch.measured = int(entry["fused_max_tokens"]), f"cached in {path}", entry["measured"]
    else:
        fused_max, switch.measured = measure_switch_point(layer, x, topk_ids)
        source = f"measured at startup in {time.perf_counter() - start:.1f} s, cached in {path}"
        if tp.rank_in_group == 0:
            write_cache(path, key, {"fused_max_tokens": fused_max, "measured": switch.measured})
    largest = switch.measured[-1]["tokens"] if switch.measured else 0
    if fused_max > largest:
        source += f"; sizes above {largest} tokens not timed, fused as at the largest timed sizes"
    if tp.world_size > 1:
        fused_max, source = tp.broadcast_object((fused_max, source), src=0)
    switch.fused_max_tokens, switch.source = fused_max, source
    switch.resolve_s = time.perf_counter() - start
    if switch._announce is not None:
        switch._announce()
