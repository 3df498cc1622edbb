"""Interval estimates that a reviewer accepts at the sample sizes of this field."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval; (nan, nan) when n is 0. Stays inside [0, 1] at small n, unlike Wald."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 or k = n the bound is exactly 0 or 1; the formula leaves rounding noise there.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def clustered_bootstrap_difference(
    clusters_a: Sequence[Sequence[float]],
    clusters_b: Sequence[Sequence[float]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Difference of means (a - b) with a percentile interval from resampling *questions*.

    Answers to one question are correlated (same prompt, often same phrasing), so resampling answers
    would understate the uncertainty. Clusters are paired by position: cluster i of `a` and of `b`
    are the answers of two conditions to the same question, and a bootstrap draw takes both.
    """
    if len(clusters_a) != len(clusters_b):
        raise ValueError("clustered bootstrap needs the same questions on both sides")
    if not clusters_a:
        return {"difference": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_clusters": 0}
    sums = np.array(
        [[sum(a), len(a), sum(b), len(b)] for a, b in zip(clusters_a, clusters_b, strict=True)], dtype=float
    )
    totals = sums.sum(axis=0)
    estimate = totals[0] / totals[1] - totals[2] / totals[3]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    picked = sums[draws].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        differences = picked[:, 0] / picked[:, 1] - picked[:, 2] / picked[:, 3]
    differences = differences[np.isfinite(differences)]
    tail = (1 - level) / 2
    return {
        "difference": float(estimate),
        "ci_low": float(np.quantile(differences, tail)),
        "ci_high": float(np.quantile(differences, 1 - tail)),
        "n_clusters": len(sums),
        "n_boot": int(n_boot),
    }
