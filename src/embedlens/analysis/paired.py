"""Paired comparisons of a condition with its baseline on the same items (docs/methods.md §6).

Used by the compression benchmark (log-likelihood scoring) and the standard-benchmark
step: both score the same items under a baseline and under an intervention, so the
difference is judged *per item* (paired), not as two independent accuracies.

* :func:`paired_bootstrap` — Δ = mean(condition − baseline) with a percentile bootstrap
  interval that resamples items (or clusters of items, e.g. the questions of one image)
  with replacement, the same resample for both arms;
* :func:`mcnemar_exact` — the exact (binomial) McNemar test for 0/1 outcomes: under H0 a
  discordant item is equally likely to favour either arm;
* :func:`seed_mean_per_item` — several seeds of a random control averaged per item
  *before* any interval, so that the interval counts items, not items × seeds;
* :func:`paired_comparison` — the three together, as the columns a table carries.

Pure numpy (the binomial tail is computed exactly with integers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import pandas as pd


def paired_bootstrap(condition: Sequence[float], baseline: Sequence[float], *, n_bootstrap: int = 1000,
                     seed: int = 0, ci: float = 0.95,
                     clusters: Sequence | None = None) -> tuple[float, float, float]:
    """Δ = mean(condition) − mean(baseline) over paired items, and its percentile bootstrap
    interval.

    `condition`, `baseline`: (n,) per-item scores of the same n items in the same order
    (0/1 correctness, a seed mean, or any per-item metric). Each of `n_bootstrap` draws
    (``numpy.random.default_rng(seed)``) resamples the items — or, with `clusters` ((n,)
    cluster keys), whole clusters — with replacement; a draw's Δ is the mean difference over
    the drawn items (cluster draws: sum of the drawn clusters' differences / their item
    count). Returns ``(delta, low, high)``, the interval at level `ci` (equal tails);
    ``low = high = nan`` when ``n_bootstrap == 0``; all nan for n = 0.

    Raises:
        ValueError: arrays of different lengths, non-finite values, or `ci` outside (0, 1).
    """
    a = np.asarray(condition, dtype=float).reshape(-1)
    b = np.asarray(baseline, dtype=float).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.size} condition vs {b.size} baseline items")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired scores must be finite (drop unscored items before comparing)")
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    n = a.size
    if n == 0:
        return math.nan, math.nan, math.nan
    diff = a - b
    delta = float(diff.mean())
    if int(n_bootstrap) <= 0:
        return delta, math.nan, math.nan
    if clusters is None:
        sums, sizes = diff, np.ones(n)
    else:
        keys = np.asarray(clusters).reshape(-1)
        if keys.size != n:
            raise ValueError(f"clusters has {keys.size} keys for {n} items")
        _, inv = np.unique(keys, return_inverse=True)
        sums = np.bincount(inv, weights=diff)
        sizes = np.bincount(inv).astype(float)
    m = sums.size
    B = int(n_bootstrap)
    rng = np.random.default_rng(int(seed))
    boot = np.empty(B)
    step = max(1, 4_000_000 // m)  # draws per block: bounds the (block, m) index array's memory
    for start in range(0, B, step):
        idx = rng.integers(0, m, size=(min(step, B - start), m))
        boot[start:start + len(idx)] = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    tail = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boot, [tail, 1.0 - tail])
    return delta, float(lo), float(hi)


def mcnemar_exact(condition: Sequence[float], baseline: Sequence[float]) -> dict:
    """Exact two-sided McNemar test for paired 0/1 outcomes.

    Returns ``{"n_better": b, "n_worse": c, "p": p}``: b = items right under the condition
    and wrong under the baseline, c = the reverse, and p = min(1, 2 · P[X ≤ min(b, c)]) for
    X ~ Binomial(b + c, 1/2) (p = 1 without discordant items), computed exactly.

    Raises:
        ValueError: arrays of different lengths or values other than 0/1 (a seed mean is
            not a 0/1 outcome: use :func:`paired_bootstrap` for it).
    """
    a = np.asarray(condition, dtype=float).reshape(-1)
    b = np.asarray(baseline, dtype=float).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.size} condition vs {b.size} baseline items")
    if not (is_binary(a) and is_binary(b)):
        raise ValueError("McNemar's test needs 0/1 outcomes per item")
    better = int(((a == 1) & (b == 0)).sum())
    worse = int(((a == 0) & (b == 1)).sum())
    n = better + worse
    k = min(better, worse)
    # exact binomial tail with integers: sum_{i<=k} C(n, i) / 2^n (no float underflow at large n)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)
    return {"n_better": better, "n_worse": worse, "p": float(min(Fraction(1), 2 * tail))}


def is_binary(x: Sequence[float]) -> bool:
    """True when every value is 0 or 1."""
    arr = np.asarray(x, dtype=float)
    return bool(np.isin(arr, (0.0, 1.0)).all())


def seed_mean_per_item(df: pd.DataFrame, value: str, item: str = "item_id") -> pd.Series:
    """Per item, the mean of column `value` over its rows (the seeds of a random control);
    indexed by `item`, in order of first appearance. One row per item returns the values."""
    return df.groupby(item, sort=False)[value].mean()


def paired_comparison(condition: Sequence[float], baseline: Sequence[float], *, n_bootstrap: int = 1000,
                      seed: int = 0, ci: float = 0.95, clusters: Sequence | None = None) -> dict:
    """:func:`paired_bootstrap` and, for 0/1 outcomes, :func:`mcnemar_exact`, as one dict:
    ``delta``, ``delta_ci_low``, ``delta_ci_high``, ``n_pairs``, ``n_better``, ``n_worse``,
    ``p_mcnemar`` (nan, counts nan, when an arm is not 0/1, e.g. seed means).

    Raises:
        ValueError: as :func:`paired_bootstrap`.
    """
    delta, lo, hi = paired_bootstrap(condition, baseline, n_bootstrap=n_bootstrap, seed=seed, ci=ci,
                                     clusters=clusters)
    out = {"delta": delta, "delta_ci_low": lo, "delta_ci_high": hi, "n_pairs": int(np.size(condition)),
           "n_better": math.nan, "n_worse": math.nan, "p_mcnemar": math.nan}
    if is_binary(condition) and is_binary(baseline) and np.size(condition):
        m = mcnemar_exact(condition, baseline)
        out.update(n_better=m["n_better"], n_worse=m["n_worse"], p_mcnemar=m["p"])
    return out
