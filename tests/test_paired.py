"""Paired comparisons (embedlens.analysis.paired, docs/methods.md §6) against hand-computed
values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from embedlens.analysis.paired import (
    is_binary,
    mcnemar_exact,
    paired_bootstrap,
    paired_comparison,
    seed_mean_per_item,
)


def test_mcnemar_exact_hand_values():
    # 3 items better (1 vs 0), 1 worse (0 vs 1), 2 ties: n = 4 discordant, k = 1
    # P[X <= 1] = (C(4,0) + C(4,1)) / 2^4 = 5/16, two-sided p = 10/16
    m = mcnemar_exact([1, 1, 1, 0, 1, 0], [0, 0, 0, 0, 1, 1])
    assert (m["n_better"], m["n_worse"]) == (3, 1)
    assert m["p"] == pytest.approx(10 / 16, abs=1e-15)
    # 0 better, 5 worse: p = 2 / 2^5
    assert mcnemar_exact([0] * 5, [1] * 5)["p"] == pytest.approx(2 / 32, abs=1e-15)
    # balanced: p = 1 (capped); no discordant item: p = 1
    assert mcnemar_exact([1, 0], [0, 1])["p"] == 1.0
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == {"n_better": 0, "n_worse": 0, "p": 1.0}
    # many discordant items: exact, no underflow (k = 0 of n = 2000: 2 / 2^2000 underflows to 0.0)
    assert mcnemar_exact([1] * 2000, [0] * 2000)["p"] == 0.0
    p = mcnemar_exact([1] * 1100 + [0] * 900, [0] * 1100 + [1] * 900)["p"]
    assert 0 < p < 1e-5
    with pytest.raises(ValueError, match="0/1 outcomes"):
        mcnemar_exact([0.5, 1], [1, 1])
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar_exact([1], [1, 0])


def test_paired_bootstrap_hand_values():
    # constant difference: every resample gives it, the interval is that point
    assert paired_bootstrap([1, 1, 1], [0, 0, 0], n_bootstrap=50) == (1.0, 1.0, 1.0)
    # Δ is the mean difference; no draws -> no interval
    d, lo, hi = paired_bootstrap([1, 1, 0, 0], [0, 1, 0, 1], n_bootstrap=0)
    assert d == 0.0 and math.isnan(lo) and math.isnan(hi)
    # clusters: differences [1, 0 | 0, 0] in clusters x, y of 2 items each. A draw of 2 clusters
    # gives 0.5 (x, x; prob 1/4), 0.25 (x, y), 0 (y, y; prob 1/4): the 95 % interval is [0, 0.5]
    d, lo, hi = paired_bootstrap([1, 0, 0, 0], [0, 0, 0, 0], n_bootstrap=4000, seed=1,
                                 clusters=["x", "x", "y", "y"])
    assert (d, lo, hi) == (0.25, 0.0, 0.5)
    # items: 1 of 4 differs by +1; a draw of 4 items holds it X ~ Binomial(4, 1/4) times and
    # averages X/4. P[X = 0] = 81/256 > 2.5 % -> low end 0; P[X >= 3] = 13/256 > 2.5 % but
    # P[X = 4] = 1/256 < 2.5 % -> high end 3/4
    d, lo, hi = paired_bootstrap([1, 0, 0, 0], [0, 0, 0, 0], n_bootstrap=4000, seed=1)
    assert (d, lo, hi) == (0.25, 0.0, 0.75)
    # seeded: the same draws for the same seed
    a = np.random.default_rng(0).integers(0, 2, 40)
    b = np.random.default_rng(1).integers(0, 2, 40)
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    assert paired_bootstrap(a, b, seed=3) != paired_bootstrap(a, b, seed=4)
    assert math.isnan(paired_bootstrap([], [])[0])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([np.nan], [1])
    with pytest.raises(ValueError, match="clusters"):
        paired_bootstrap([1, 0], [0, 0], clusters=["a"])


def test_paired_comparison_and_seed_means():
    out = paired_comparison([1, 1, 1, 0, 1, 0], [0, 0, 0, 0, 1, 1], n_bootstrap=100)
    assert out["delta"] == pytest.approx(2 / 6) and out["n_pairs"] == 6
    assert out["p_mcnemar"] == pytest.approx(10 / 16) and (out["n_better"], out["n_worse"]) == (3, 1)
    frac = paired_comparison([0.5, 1.0], [0, 1], n_bootstrap=10)
    assert math.isnan(frac["p_mcnemar"]) and frac["delta"] == pytest.approx(0.25)
    df = pd.DataFrame({"item_id": ["a", "b", "a", "b", "a", "b"], "seed": [0, 0, 1, 1, 2, 2],
                       "correct": [1, 0, 0, 0, 1, 0]})
    m = seed_mean_per_item(df, "correct")
    assert m.to_dict() == {"a": pytest.approx(2 / 3), "b": 0.0}
    assert is_binary([0, 1, 1.0]) and not is_binary([0.5])
