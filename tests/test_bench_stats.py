"""The benchmark step's paired statistics and its paper-shaped table (no model needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from embedlens.bench.stats import Aggregate, paired_cluster_bootstrap
from embedlens.report.sections.benchmarks import paper_table


def _mean_agg(values, clusters):
    v = np.asarray(values, dtype=float)
    return Aggregate(lambda rows: float(v[list(rows)].mean()), clusters)


CLUSTERS = [f"img{i // 2}" for i in range(20)]  # 10 images, 2 questions each


def test_identical_condition_has_zero_delta_and_a_zero_width_interval():
    base = _mean_agg([1, 0] * 10, CLUSTERS)
    same = [_mean_agg([1, 0] * 10, CLUSTERS) for _ in range(3)]  # three seeds, nothing changed
    st = paired_cluster_bootstrap(base, same, n_draws=200, seed=0)
    assert st["delta"] == 0.0 and st["ci_low"] == 0.0 and st["ci_high"] == 0.0
    assert st["p_value"] == 1.0 and st["n_clusters"] == 10


def test_delta_is_the_difference_of_the_aggregates_and_seeds_average_inside_draws():
    base = _mean_agg([1] * 20, CLUSTERS)
    # seed A loses image 0's two questions, seed B loses image 1's: seed mean = -0.1
    a = _mean_agg([0, 0] + [1] * 18, CLUSTERS)
    b = _mean_agg([1, 1, 0, 0] + [1] * 16, CLUSTERS)
    st = paired_cluster_bootstrap(base, [a, b], n_draws=500, seed=1)
    assert st["delta"] == pytest.approx(-0.1)
    assert st["ci_low"] < -0.1 < st["ci_high"] <= 0.0
    # deterministic for a seed
    assert paired_cluster_bootstrap(base, [a, b], n_draws=500, seed=1) == st


def test_conditions_on_other_images_are_refused():
    base = _mean_agg([1] * 20, CLUSTERS)
    other = _mean_agg([1] * 20, [f"x{i}" for i in range(20)])
    with pytest.raises(ValueError, match="other images"):
        paired_cluster_bootstrap(base, [other])


def test_paper_table_rows_conditions_columns_tasks_and_nothing_removed():
    rows = []
    for cond, op, status, score, delta in [("baseline", "baseline", "ok", 0.8, 0.0),
                                           ("prune_dead", "prune", "nothing removed", np.nan, np.nan),
                                           ("inject_L8", "inject", "ok", 0.7, -0.1)]:
        for task, metric in [("pope", "pope_accuracy"), ("mme", "mme_perception_score")]:
            rows.append({"condition": cond, "op": op, "task": task, "metric": metric, "status": status,
                         "score": score, "delta": delta, "ci_low": delta - 0.05, "ci_high": delta + 0.05,
                         "tokens_kept_frac": 1.0, "flops_rel": 0.5 if op == "inject" else 1.0})
    wide = paper_table(pd.DataFrame(rows))
    assert list(wide["condition"]) == ["baseline", "prune_dead", "inject_L8"]
    assert "pope (pope_accuracy)" in wide and "mme (mme_perception_score)" in wide
    assert wide.loc[1, "pope (pope_accuracy)"] == "nothing removed"
    assert wide.loc[2, "pope (pope_accuracy)"] == "0.7 (Δ -0.1 [-0.15, -0.05])"
    assert wide.loc[0, "pope (pope_accuracy)"] == "0.8"
    assert wide.loc[2, "prefill FLOPs"] == 0.5
