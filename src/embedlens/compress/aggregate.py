"""The compression table from per-item records (docs/methods.md §4, §6): accuracy with a
Wilson interval over items, the paired comparison with the baseline, the "nothing removed"
flag and the cost columns, one row per (condition, seed, item type).

Random controls: the seeds of a ``random_matched`` condition are averaged *per item* first
(an item's accuracy = its mean correctness over the seeds), and the condition-level interval
counts items, not items × seeds (pooling seeds as new items made ``random_dead``'s interval
narrower than the identical baseline's).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from embedlens.analysis.paired import paired_comparison

from .conditions import Variant

#: Ops that act on a target set of visual tokens; a condition of one of them whose target set
#: is empty in every image is flagged ``nothing_removed`` (its Δ is not a result).
TARGETED_OPS = ("prune", "keep", "random_matched", "skip", "inject", "exit", "prune_inject", "knockout")
#: Per-item columns averaged over the seeds of a random control.
_ITEM_MEANS = ("correct", "n_choices", "visual_tokens", "tokens_kept", "visual_tokens_per_layer", "flops",
               "flops_baseline", "n_affected")
_PAIRED_COLS = ("delta", "delta_ci_low", "delta_ci_high", "n_pairs", "n_better", "n_worse", "p_mcnemar")


def wilson_interval(k: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval (95 % by default) for k successes in n trials (k may be a sum of
    per-item seed means, which vary no more than 0/1 outcomes: the interval is then
    conservative)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / den
    # exact ends at k = 0 and k = n (the formula leaves ~1e-17 of round-off there)
    return (0.0 if k <= 0 else max(0.0, centre - half)), (1.0 if k >= n else min(1.0, centre + half))


def _group_rows(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [("all", df)] + [(t, g) for t, g in sorted(df.groupby("item_type"), key=lambda x: x[0])]


def _per_item(df: pd.DataFrame) -> pd.DataFrame:
    """One row per item (index ``item_index``): seeds averaged (a no-op for one seed)."""
    means = df.groupby("item_index", sort=True)[list(_ITEM_MEANS)].mean()
    means["image_id"] = df.groupby("item_index", sort=True)["image_id"].first()
    return means


def _stats(items: pd.DataFrame) -> dict:
    """Accuracy, Wilson interval over the items and cost means of a per-item frame."""
    n = len(items)
    k = float(items["correct"].sum())
    lo, hi = wilson_interval(k, n)
    return {
        "n_items": n, "n_correct": k, "accuracy": k / n if n else float("nan"),
        "ci_low": lo, "ci_high": hi, "chance": float((1.0 / items["n_choices"]).mean()),
        "visual_tokens": float(items["visual_tokens"].mean()),
        "tokens_kept": float(items["tokens_kept"].mean()),
        "tokens_kept_frac": float(items["tokens_kept"].sum() / max(items["visual_tokens"].sum(), 1)),
        "visual_tokens_per_layer": float(items["visual_tokens_per_layer"].mean()),
        "flops": float(items["flops"].mean()),
        "flops_rel": float(items["flops"].sum() / items["flops_baseline"].sum()),
    }


def _paired(items: pd.DataFrame, base: pd.Series | None, skip: bool, n_bootstrap: int, seed: int) -> dict:
    """Δ accuracy vs the baseline on the same items (nan when there is no baseline, for the
    baseline itself and for a nothing-removed condition)."""
    if base is None or skip:
        return dict.fromkeys(_PAIRED_COLS, float("nan"))
    common = items.index.intersection(base.index)
    return paired_comparison(items.loc[common, "correct"].to_numpy(), base.loc[common].to_numpy(),
                             n_bootstrap=n_bootstrap, seed=seed)


def _removal(items: pd.DataFrame, op: str) -> dict:
    """``n_removed_images``: images with >= 1 visual token removed or changed (<NA> for ops
    without a target set)."""
    if op not in TARGETED_OPS:
        return {"n_removed_images": pd.NA}
    return {"n_removed_images": int(items.loc[items["n_affected"] > 0, "image_id"].nunique())}


def aggregate(per_item: pd.DataFrame, variants: Sequence[Variant], timing: dict, meta: dict, *,
              n_bootstrap: int = 1000, bootstrap_seed: int = 0) -> pd.DataFrame:
    """The compression table from `per_item` (one record per condition × seed × item: at
    least ``condition``, ``seed``, ``item_index``, ``image_id``, ``item_type`` and the
    ``_ITEM_MEANS`` columns; ``n_affected`` = visual tokens the condition removed or changed).

    Rows: per-seed rows of random conditions (``seed`` set) and condition-level rows
    (``seed`` <NA>), each for ``item_type == "all"`` and every item type. Paired columns
    (``delta`` …, ``p_mcnemar``) compare with the first ``baseline`` condition on the same
    items (:func:`embedlens.analysis.paired.paired_comparison`, `n_bootstrap` draws from
    `bootstrap_seed`); McNemar only where both arms are 0/1 (not for seed means).
    """
    rows = []
    by_name: dict[str, list[Variant]] = {}
    for v in variants:
        by_name.setdefault(v.name, []).append(v)
    base_name = next((v.name for v in variants if v.op == "baseline"), None)
    base = (_per_item(per_item[per_item["condition"] == base_name])["correct"]
            if base_name is not None else None)

    for name, vs in by_name.items():
        v0 = vs[0]
        sub = per_item[per_item["condition"] == name]
        all_items = _per_item(sub)
        nothing = v0.op in TARGETED_OPS and not bool((all_items["n_affected"] > 0).any())
        skip_paired = name == base_name or nothing
        common = {"condition": name, "op": v0.op,
                  "groups": ",".join(v0.intervention.groups),
                  "select": v0.intervention.select if v0.intervention.groups else None,
                  "params": json.dumps(v0.condition, sort_keys=True, default=str),
                  "nothing_removed": nothing}
        random_op = v0.seed is not None
        if random_op:
            for v in vs:  # per-seed rows
                for t, g in _group_rows(sub[sub["seed"] == v.seed]):
                    items = _per_item(g)
                    rows.append({**common, "seed": v.seed, "n_seeds": 1, "item_type": t, **_stats(items),
                                 "accuracy_sd": float("nan"), **_removal(items, v0.op),
                                 **_paired(items, base, skip_paired, n_bootstrap, bootstrap_seed),
                                 **timing[v.key]})
        for t, g in _group_rows(sub):  # condition-level rows (seed <NA>): seeds averaged per item
            items = _per_item(g)
            st = _stats(items)
            if random_op:
                per_seed = g.groupby("seed")["correct"].mean()
                st["accuracy_sd"] = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan")
                tm = {k: float(np.mean([timing[v.key][k] for v in vs])) for k in timing[v0.key]}
            else:
                st["accuracy_sd"] = float("nan")
                tm = timing[v0.key]
            rows.append({**common, "seed": None, "n_seeds": len(vs), "item_type": t, **st,
                         **_removal(items, v0.op),
                         **_paired(items, base, skip_paired, n_bootstrap, bootstrap_seed), **tm})
    table = pd.DataFrame.from_records(rows)
    table["seed"] = table["seed"].astype("Int64")
    table["n_removed_images"] = table["n_removed_images"].astype("Int64")
    for k, val in meta.items():
        table[k] = val
    table["ci_method"] = "wilson95_items"
    table["delta_method"] = f"paired_bootstrap95_items_{int(n_bootstrap)}"
    order = ["condition", "op", "groups", "select", "seed", "n_seeds", "item_type", "n_items", "n_correct",
             "accuracy", "ci_low", "ci_high", "accuracy_sd", *_PAIRED_COLS, "nothing_removed",
             "n_removed_images", "chance", "visual_tokens", "tokens_kept", "tokens_kept_frac",
             "visual_tokens_per_layer", "flops", "flops_rel", "latency_ms", "peak_mem_mb",
             "peak_mem_delta_mb", "params", "ci_method", "delta_method", *meta]
    return table[order + [c for c in table.columns if c not in order]]


def unmatched_random_controls(rows: pd.DataFrame) -> list[dict]:
    """The ``random_matched`` rows of a condition table (one row per condition, seeds
    averaged) that removed a different number of visual tokens per image than the
    condition they control: ``prune`` of the same groups, or ``keep`` of the other labels.

    `random_matched` draws from the tokens outside its groups, so where a group is larger
    than its complement it can only remove the complement (docs/methods.md §4): the
    control then tests "remove the other tokens", not "remove as many random tokens".

    Returns: [{"control", "condition", "removed_control", "removed_condition"}] (tokens per
    image, means over images); empty when every control matched or a column is missing.
    """
    from .spec import LABELS

    need = {"condition", "op", "groups", "visual_tokens", "tokens_kept"}
    if not need <= set(rows):
        return []
    live = rows[~rows["nothing_removed"].fillna(False).astype(bool)] if "nothing_removed" in rows else rows

    def _groups(g) -> frozenset:
        return frozenset(x for x in str(g or "").split(",") if x)

    out = []
    for ctl in live[live["op"] == "random_matched"].itertuples():
        g = _groups(ctl.groups)
        for cond in live[live["op"].isin(["prune", "keep"])].itertuples():
            cg = _groups(cond.groups)
            if (cond.op == "prune" and cg == g) or (cond.op == "keep" and cg == frozenset(LABELS) - g):
                removed_ctl = float(ctl.visual_tokens) - float(ctl.tokens_kept)
                removed_cond = float(cond.visual_tokens) - float(cond.tokens_kept)
                if abs(removed_ctl - removed_cond) > 0.5:
                    out.append({"control": ctl.condition, "condition": cond.condition,
                                "removed_control": removed_ctl, "removed_condition": removed_cond})
    return out


def unmatched_note(u: dict) -> str:
    """One sentence (markdown) naming an unmatched control of `unmatched_random_controls`,
    with both counts: the report, the index and benchmarks/paper_findings.py say the same."""
    return (f"`{u['control']}` is **not size-matched** to `{u['condition']}`: it removed "
            f"{u['removed_control']:.1f} visual tokens per image, the condition {u['removed_condition']:.1f}; "
            "the group is larger than the tokens outside it, from which the random control draws "
            "(docs/methods.md §4)")
