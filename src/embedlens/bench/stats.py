"""Paired statistics of the standard-benchmark step (docs/methods.md §4): the change of a
task's *official* score under a condition vs the baseline, with a paired cluster bootstrap.

Why a cluster bootstrap of the official aggregation rather than a test on per-item 0/1
outcomes: the headline numbers are the benchmarks' own aggregates (POPE F1, MME's
per-image "acc+", RefCOCO ACC@0.5 ...), several of which are not means of independent
items, and several questions share one image (MME asks two per image, POPE several). So
one bootstrap draw resamples whole *images* (clusters) with replacement, the same draw for
the baseline and the condition (paired), and recomputes each official aggregation on the
drawn rows; random_matched seeds are averaged inside each draw, so the interval is over
items, never over items × seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

#: resampling draws when config gives none
DEFAULT_DRAWS = 1000


def cluster_rows(clusters: Sequence) -> dict[object, np.ndarray]:
    """Cluster key → the row positions (int64) holding it, in row order."""
    out: dict[object, list[int]] = {}
    for i, c in enumerate(clusters):
        out.setdefault(c, []).append(i)
    return {c: np.asarray(v, dtype=np.int64) for c, v in out.items()}


def paired_cluster_bootstrap(
    base: Aggregate,
    conds: Sequence[Aggregate],
    *,
    n_draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Δ = mean over `conds` (seeds) of the condition's score − the baseline's score, with a
    percentile interval and a two-sided bootstrap p-value from `n_draws` paired draws of
    clusters.

    `base`, `conds`: :class:`Aggregate` of one task's metric (same clusters: every condition
    ran the same documents). Returns ``delta`` (on all rows), ``ci_low``, ``ci_high``,
    ``p_value`` (2 × the smaller tail share of draws with Δ ≤ 0 / Δ ≥ 0, at most 1; NaN with
    fewer than 2 clusters) and ``n_clusters``.

    Raises
    ------
    ValueError : no condition, or conditions whose clusters differ from the baseline's.
    """
    if not conds:
        raise ValueError("paired_cluster_bootstrap needs at least one condition result")
    keys = list(base.rows)
    for c in conds:
        if set(c.rows) != set(keys):
            raise ValueError("paired bootstrap: the condition ran other images than the baseline "
                             f"({len(set(c.rows) ^ set(keys))} differ); run every condition on the same documents")
    delta = float(np.mean([c.score(keys) for c in conds]) - base.score(keys))
    out = {"delta": delta, "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan"),
           "n_clusters": len(keys)}
    if len(keys) < 2 or n_draws < 1:
        return out
    rng = np.random.default_rng(seed)
    draws = np.empty(n_draws)
    for b in range(n_draws):
        pick = [keys[i] for i in rng.integers(0, len(keys), len(keys))]
        draws[b] = np.mean([c.score(pick) for c in conds]) - base.score(pick)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return out
    a = (1 - level) / 2
    out["ci_low"], out["ci_high"] = (float(x) for x in np.quantile(draws, [a, 1 - a]))
    out["p_value"] = float(min(1.0, 2 * min((draws <= 0).mean(), (draws >= 0).mean())))
    return out


class Aggregate:
    """One task × metric × run: recompute the official aggregation on any multiset of
    clusters.

    `aggregate(rows)`: the task's official aggregation over the given row positions (rows
    may repeat); `clusters`: the cluster key of each row (e.g. the image).
    """

    def __init__(self, aggregate: Callable[[Sequence[int]], float], clusters: Sequence):
        self._aggregate = aggregate
        self.rows: Mapping[object, np.ndarray] = cluster_rows(clusters)

    def score(self, keys: Sequence) -> float:
        idx = np.concatenate([self.rows[k] for k in keys]) if len(keys) else np.zeros(0, np.int64)
        try:
            return float(self._aggregate([int(i) for i in idx]))
        except ZeroDivisionError:  # an official aggregation on a draw without a positive case
            return float("nan")
