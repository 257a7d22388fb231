"""Paired comparisons of two models scored on the same items: the difference, its 95% CI, and the verdict.

"Beats" means the paired 95% interval of the difference lies above zero (below zero for lower-is-better metrics);
a point estimate that moved is "not distinguishable" until the interval says otherwise. Accuracies also get the exact
McNemar p-value (a two-sided binomial test on the discordant items).
"""

from __future__ import annotations

import math
import random

BEATS, WORSE, TIE = "BEATS", "WORSE", "not distinguishable"


def paired_bootstrap_ci(a: list[float], b: list[float], iters: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of mean(b - a), resampling items (the pairs stay together)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same items: {len(a)} vs {len(b)}")
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        return (0.0, 0.0)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(d, k=n)) / n for _ in range(iters))
    return (means[int(0.025 * iters)], means[min(iters - 1, int(0.975 * iters))])


def mcnemar_exact_p(a: list[float], b: list[float]) -> float:
    """Two-sided exact McNemar p for 0/1 scores: items only b got right vs items only a got right."""
    only_b = sum(1 for x, y in zip(a, b) if y > x)
    only_a = sum(1 for x, y in zip(a, b) if x > y)
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def verdict_of(ci: tuple[float, float] | list[float], higher_is_better: bool = True) -> str:
    lo, hi = ci
    if lo > 0:
        return BEATS if higher_is_better else WORSE
    if hi < 0:
        return WORSE if higher_is_better else BEATS
    return TIE


def paired_diff(a: list[float], b: list[float], *, binary: bool = False, higher_is_better: bool = True,
                iters: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """{"diff", "ci", "n", "verdict", "p_mcnemar" (binary) or "p_sign", "b_better", "a_better"[, "note"]}: b (a model)
    against a (its base).

    The percentile bootstrap is anti-conservative on a handful of items (two documents that both improved give an
    interval that excludes 0 every time), so a BEATS/WORSE from the interval also needs the exact sign test on the
    items that differ (McNemar's test, for 0/1 scores) below `alpha`; otherwise the row is not distinguishable and
    `note` says why.
    """
    ci = paired_bootstrap_ci(a, b, iters, seed)
    n = len(a)
    p = mcnemar_exact_p(a, b)
    out = {"diff": (sum(b) - sum(a)) / n if n else 0.0, "ci": list(ci), "n": n,
           "verdict": verdict_of(ci, higher_is_better),
           "b_better": sum(1 for x, y in zip(a, b) if (y > x) == higher_is_better and y != x),
           "a_better": sum(1 for x, y in zip(a, b) if (y < x) == higher_is_better and y != x)}
    out["p_mcnemar" if binary else "p_sign"] = p
    if out["verdict"] != TIE and p >= alpha:
        out["verdict"] = TIE
        out["note"] = f"only {out['b_better'] + out['a_better']} items differ (exact sign test p={p:.2g})"
    return out
