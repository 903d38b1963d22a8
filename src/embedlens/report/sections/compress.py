"""Report section "Compression benchmark": VQA accuracy under each intervention on the
visual tokens, against its cost (FLOPs, latency, memory)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..display import _figure, _fmt_pct, callout, md, table
from ..inputs import ReportInputs

_COMPRESS_NEEDED = ("condition", "op", "item_type", "accuracy")


def _condition_rows(c: pd.DataFrame) -> pd.DataFrame:
    d = c
    if "seed" in d:
        d = d[d["seed"].isna()]
    if "item_type" in d:
        d = d[d["item_type"].astype(str) == "all"] if (d["item_type"].astype(str) == "all").any() else d
    return d.drop_duplicates("condition")


def _fmt_delta(x: float, lo: float, hi: float) -> str:
    """Δ in percentage points with its paired interval ("" for the baseline itself)."""
    if not np.isfinite(x):
        return ""
    ci = f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if np.isfinite(lo) and np.isfinite(hi) else ""
    return f"{100 * x:+.1f}{ci}"


def section_compression(inp: ReportInputs) -> list:
    """Section "Compression benchmark": accuracy [CI] and cost per condition, accuracy vs
    FLOPs / latency, and accuracy per VQA item type."""
    if inp.compress is None or inp.compress.empty:
        return [callout(f"compression benchmark: {inp.why('compress')}")]
    import seaborn as sns

    c = inp.compress
    missing_cols = [x for x in _COMPRESS_NEEDED if x not in c]
    if missing_cols:
        return [callout(f"compression benchmark: the table lacks the columns {missing_cols}")]
    d = _condition_rows(c).copy()
    base = d[d["op"] == "baseline"]
    base_acc = float(base["accuracy"].iloc[0]) if len(base) else float("nan")
    if {"delta", "delta_ci_low", "delta_ci_high"} <= set(d):
        # the paired Δ over the same items (seeds averaged per item first), not a difference
        # of two independent accuracies
        d["Δ accuracy vs baseline (pp)"] = [_fmt_delta(x, lo, hi) for x, lo, hi in
                                            zip(d["delta"], d["delta_ci_low"], d["delta_ci_high"])]
    else:
        # text like the paired column, so "nothing removed" can replace a value
        d["Δ accuracy vs baseline (pp)"] = [_fmt_delta(x, math.nan, math.nan) for x in d["accuracy"] - base_acc]
    if "nothing_removed" in d:
        flagged = d["nothing_removed"].fillna(False).astype(bool)
        d.loc[flagged, "Δ accuracy vs baseline (pp)"] = "nothing removed"
    if {"ci_low", "ci_high"} <= set(d):
        d["accuracy [CI]"] = [f"{_fmt_pct(a)} [{100 * lo:.1f}, {100 * hi:.1f}]"
                              for a, lo, hi in zip(d["accuracy"], d["ci_low"], d["ci_high"])]
    else:
        d["accuracy [CI]"] = d["accuracy"].map(_fmt_pct)
    cols = {"condition": "condition", "op": "op", "groups": "groups", "n_items": "items",
            "accuracy [CI]": "accuracy [CI]", "Δ accuracy vs baseline (pp)": "Δ accuracy vs baseline (pp)",
            "p_mcnemar": "p (McNemar)", "select": "selection", "accuracy_sd": "sd over seeds", "tokens_kept": "visual tokens kept", "tokens_kept_frac": "tokens kept",
            "flops_rel": "prefill FLOPs (rel.)", "latency_ms": "latency (ms)", "peak_mem_mb": "peak memory (MB)"}
    tab = d[[k for k in cols if k in d]].rename(columns=cols)
    out: list = [md("Multiple-choice VQA accuracy under each intervention on the visual tokens (length-normalized "
                    "log-likelihood of each choice), with its cost: visual tokens kept, theoretical prefill FLOPs "
                    "relative to the baseline, measured prefill latency (median) and peak memory. Accuracy CI: "
                    f"{c['ci_method'].iloc[0] if 'ci_method' in c else 'as recorded'}. Δ vs baseline: paired over the same "
                    "items, percentage points [paired bootstrap 95 % interval], exact McNemar p; random_matched "
                    "rows average their seeds per item first (docs/methods.md §4, §6). A condition whose target "
                    "group is empty in every image shows \"nothing removed\" instead of a Δ.")]
    if not len(base):
        out.append(callout("compression deltas: no baseline condition in the table"))
    out.append(table(tab, percent=[x for x in ("tokens kept", "prefill FLOPs (rel.)") if x in tab], precision=2))
    from embedlens.compress.aggregate import unmatched_note, unmatched_random_controls

    for u in unmatched_random_controls(d):
        out.append(callout(f"{unmatched_note(u)}: read it as \"remove the other tokens\", not as a random control "
                           "of the same size.", kind="note"))
    xs = [x for x in ("flops_rel", "latency_ms") if x in d and np.isfinite(d[x].astype(float)).any()]
    if xs:
        ops = list(dict.fromkeys(d["op"]))
        pal = dict(zip(ops, sns.color_palette("colorblind", len(ops))))
        fig, axes = _figure(5.2 * len(xs), 4.2, 1, len(xs), sharey=True)
        for ax, x in zip(axes.ravel(), xs):
            xv = d[x].astype(float) * (100 if x == "flops_rel" else 1)
            for op in ops:
                m = d["op"] == op
                yerr = None
                if {"ci_low", "ci_high"} <= set(d):
                    lo = (d.loc[m, "accuracy"] - d.loc[m, "ci_low"]).clip(lower=0) * 100
                    hi = (d.loc[m, "ci_high"] - d.loc[m, "accuracy"]).clip(lower=0) * 100
                    yerr = np.vstack([lo, hi])
                ax.errorbar(xv[m], 100 * d.loc[m, "accuracy"], yerr=yerr, fmt="o", ms=5, capsize=2,
                            color=pal[op], label=op, alpha=0.9)
            for xi, yi, name in zip(xv, 100 * d["accuracy"], d["condition"]):
                ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=6.5, alpha=0.8)
            if math.isfinite(base_acc):
                ax.axhline(100 * base_acc, color="black", ls="--", lw=0.8, label="baseline accuracy")
            if "chance" in d and np.isfinite(d["chance"].astype(float)).any():
                ax.axhline(100 * float(d["chance"].mean()), color="grey", ls=":", lw=0.8, label="chance")
            ax.set_xlabel("prefill FLOPs (% of baseline)" if x == "flops_rel" else "median prefill latency (ms)")
        axes[0, 0].set_ylabel("VQA accuracy (%)")
        axes.ravel()[-1].legend(fontsize=7, title="operation", title_fontsize=7, loc="best")
        out.append(md("**Accuracy vs cost** (error bars: accuracy CI):"))
        out.append(fig)
    else:
        out.append(callout("accuracy-vs-cost plot: the table has no FLOPs or latency columns"))
    if "item_type" in c:
        per = c[c["seed"].isna()] if "seed" in c else c
        per = per[per["item_type"].astype(str) != "all"]
        if not per.empty and per["item_type"].nunique() > 1:
            piv = per.pivot_table(index="condition", columns="item_type", values="accuracy", aggfunc="mean")
            piv = piv.reindex([x for x in d["condition"] if x in piv.index])
            fig, ax = _figure(1.3 * piv.shape[1] + 3.5, 0.32 * piv.shape[0] + 1.6)
            ax = ax[0, 0]
            sns.heatmap(100 * piv, annot=True, fmt=".0f", cmap="viridis", vmin=0, vmax=100, ax=ax,
                        cbar_kws={"label": "accuracy (%)"}, annot_kws={"fontsize": 7})
            ax.set_xlabel("VQA item type")
            ax.set_ylabel("condition")
            out.append(md("**Accuracy per item type** (%):"))
            out.append(fig)
    return out
