"""Comparing two engines' greedy outputs: tokens and top-k logprobs.

fp32: the two must agree token for token, and every top-k logprob within ``FP32_TOL``
(FSE on vs off measured ~1e-6). Teacher-forced scores of fixed texts (:func:`compare_scores`)
complement free generation: they compare every position, whatever was generated before.

bf16: vLLM's own criterion for two implementations of one model (``check_logprobs_close`` in
vLLM's tests): tokens agree until, possibly, a position where each side's token is in the
other's top-k; comparison of that prompt stops there. A different summation order in bf16 can
flip an expert choice in a later layer (routing is discrete), which moves single logprobs by
up to ~1, so single values are not bounded; the median over all compared values is, which a
systematic error such as a mis-weighted shared slot cannot pass.
"""

from __future__ import annotations

import statistics

FP32_TOL = 1e-4
BF16_MEDIAN_TOL = 0.05


def _sorted_topk(lp: dict) -> list:
    return sorted(((tok, round(v, 4)) for tok, v in lp.items()), key=lambda kv: -kv[1])


def compare_outputs(a: list[dict], b: list[dict], dtype: str) -> dict:
    """Assert that outputs ``a`` and ``b`` agree for ``dtype``; return comparison statistics."""
    strict = dtype == "float32"
    deltas: list[float] = []
    compared = diverged = 0
    assert len(a) == len(b)
    for p, (out_a, out_b) in enumerate(zip(a, b)):
        steps = zip(out_a["token_ids"], out_b["token_ids"], out_a["logprobs"], out_b["logprobs"])
        for i, (tok_a, tok_b, lp_a, lp_b) in enumerate(steps):
            where = f"prompt {p} position {i}"
            if tok_a != tok_b:
                assert not strict and tok_b in lp_a and tok_a in lp_b, (
                    f"{where}: greedy token {tok_a} vs {tok_b}; top-k {_sorted_topk(lp_a)} vs {_sorted_topk(lp_b)}"
                )
                diverged += 1
                break
            common = lp_a.keys() & lp_b.keys()
            if strict:
                assert len(common) >= len(lp_a) - 1, f"{where}: top-k {_sorted_topk(lp_a)} vs {_sorted_topk(lp_b)}"
            for tok in common:
                delta = abs(lp_a[tok] - lp_b[tok])
                deltas.append(delta)
                if strict:
                    assert delta <= FP32_TOL, f"{where}: token {tok} logprob {lp_a[tok]:.6f} vs {lp_b[tok]:.6f}"
            compared += 1
    stats = {
        "compared": compared,
        "diverged": diverged,
        "max_delta": max(deltas, default=0.0),
        "median_delta": statistics.median(deltas) if deltas else 0.0,
    }
    if not strict:
        assert stats["median_delta"] <= BF16_MEDIAN_TOL, stats
    return stats


# Teacher-forced bf16 scoring: the share of positions whose top token agrees, and the median
# |delta| of the actual next token's logprob.
BF16_SCORE_MIN_TOP1_AGREEMENT = 0.9


def compare_scores(a: list[dict], b: list[dict], dtype: str) -> dict:
    """Compare prompt logprobs of the same texts (every position, no cascading)."""
    deltas: list[float] = []
    agree = total = 0
    for p, (sa, sb) in enumerate(zip(a, b)):
        assert sa["token_ids"] == sb["token_ids"]
        for i, (tok, lp_a, lp_b) in enumerate(zip(sa["token_ids"], sa["logprobs"], sb["logprobs"])):
            if not lp_a:  # the first prompt token has no logprob
                continue
            total += 1
            agree += max(lp_a, key=lp_a.get) == max(lp_b, key=lp_b.get)
            delta = abs(lp_a[tok] - lp_b[tok])
            deltas.append(delta)
            if dtype == "float32":
                assert delta <= FP32_TOL, f"text {p} position {i}: {lp_a[tok]:.6f} vs {lp_b[tok]:.6f}"
    stats = {
        "positions": total,
        "top1_agreement": agree / total,
        "max_delta": max(deltas),
        "median_delta": statistics.median(deltas),
    }
    if dtype == "float32":
        assert stats["top1_agreement"] == 1.0, stats
    else:
        assert stats["median_delta"] <= BF16_MEDIAN_TOL, stats
        assert stats["top1_agreement"] >= BF16_SCORE_MIN_TOP1_AGREEMENT, stats
    return stats
