"""Report section "Layer alignment": visual tokens against the LLM's text hidden states
per text layer, and the best-aligned layer."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..display import LABEL_COLOURS, _figure, callout, md, table
from ..inputs import ReportInputs

_MEASURE_LABELS = {
    "normalized_nn_accuracy": "normalized nearest-label-word accuracy\n(mean over included tasks; 0 = majority)",
    "nn_accuracy": "nearest-label-word accuracy (mean over tasks)",
    "mean_max_cos": "mean max cosine to layer-l text states (centred)",
    "cka": "linear CKA with label-word states (mean over tasks)",
}


def _criterion_rows(a: pd.DataFrame, best: dict) -> pd.DataFrame:
    """Rows of the best-layer criterion per (visual, group, layer): the mean normalized
    accuracy over the tasks that pair's criterion included (the summary's
    ``included_tasks``), as measure ``normalized_nn_accuracy``."""
    if "normalized_accuracy" not in a:
        return a.iloc[:0]
    nn = a[a["measure"] == "nn_accuracy"]
    parts = []
    for (vis, g), d in nn.groupby(["visual", "group"]):
        inc = (best.get(f"{vis}/{g}") or {}).get("included_tasks")
        if not inc:
            continue
        d = d[d["task"].isin(inc)]
        parts.append(d.assign(measure="normalized_nn_accuracy", value=d["normalized_accuracy"], chance=0.0))
    return pd.concat(parts) if parts else a.iloc[:0]


def _ci(v) -> str:
    if not v:
        return ""
    lo, hi = v
    return f"[{lo}, {hi}]" if isinstance(lo, int) and isinstance(hi, int) else f"[{lo:.3f}, {hi:.3f}]"


def _best_table(best: dict) -> pd.DataFrame:
    """One row per (visual, group): the best layer with its bootstrap intervals and the
    tasks left out of the criterion (with their majority shares)."""
    rows = []
    for kk, v in best.items():
        vis, g = kk.split("/", 1)
        excl = "; ".join(f"{e['task']} ({e['majority_share']:.2f})" if e.get("majority_share") is not None
                         else f"{e['task']} ({e.get('reason')})" for e in v.get("excluded_tasks") or [])
        rows.append({"visual": {"h0": "h[0] vs text l", "hl": "h[l] vs text l"}.get(vis, vis), "group": g,
                     "best layer": v.get("layer"), "layer 95% CI": _ci(v.get("layer_ci")),
                     "share of draws": v.get("layer_share"), "criterion": v.get("criterion"),
                     "value at best": v.get("value"), "value 95% CI": _ci(v.get("value_ci")),
                     "value at layer 0": v.get("value_at_layer0"), "images": v.get("n_images"),
                     "excluded tasks (majority share)": excl or "—"})
    return pd.DataFrame(rows)


def section_alignment(inp: ReportInputs) -> list:
    """Section "Layer alignment": measures per text layer (h[0] and h[l] vs text layer l)
    per group, with the best-aligned layer (bootstrap intervals, excluded tasks, the
    final-norm point marked); a callout when the alignment output is missing."""
    if inp.align is None or inp.align.empty:
        return [callout(f"layer alignment: {inp.why('align')}")]
    import seaborn as sns

    a = inp.align.copy()
    a = a[np.isfinite(a["value"].astype(float))]
    summ = inp.align_summary or {}
    best = summ.get("best_layer") or {}
    fn_layer = summ.get("final_norm_layer")
    out: list = [callout("layer alignment: visual tokens compared with the LLM's text hidden states of short prompts "
                         "built from the label words plus a generic word list, per text layer l. Solid lines: visual "
                         "h[0] vs text layer l (the claim: alive tokens resemble intermediate layers); dashed: visual "
                         "h[l] vs text layer l. Stars mark the best-aligned layer, with its 95% bootstrap interval "
                         "over images (horizontal: layer, vertical: value). The best layer is the argmax of the "
                         "normalized accuracy ((accuracy − majority share) / (1 − majority share)), averaged over "
                         "the tasks that are not near-constant.", kind="ours")]
    if a.empty:
        out.append(callout("alignment curves: every measured value is missing (no tokens in any group)"))
        return out
    a = pd.concat([_criterion_rows(a, best), a])
    agg = (a.groupby(["visual", "group", "layer", "measure"], dropna=False)
           .agg(value=("value", "mean"), chance=("chance", "mean")).reset_index())
    measures = [m for m in _MEASURE_LABELS if (agg["measure"] == m).any()]
    groups = [g for g in dict.fromkeys(agg["group"])]
    pal = {g: LABEL_COLOURS.get(g, c) for g, c in zip(groups, sns.color_palette("dark", len(groups)))}
    pal.setdefault("all", "#0072B2")
    pal["all"] = "#0072B2"
    pal["sink"] = LABEL_COLOURS["vit_sink"]
    fig, axes = _figure(4.3 * len(measures) + 1.6, 3.9, 1, len(measures))
    for ax, m in zip(axes.ravel(), measures):
        d = agg[agg["measure"] == m]
        for (vis, g), dd in d.groupby(["visual", "group"]):
            dd = dd.sort_values("layer")
            ax.plot(dd["layer"], dd["value"], ls="-" if vis == "h0" else "--", marker="o", ms=3,
                    color=pal.get(g, "#333333"), label=f"{g} · {'h[0]' if vis == 'h0' else 'h[l]'}")
            b = best.get(f"{vis}/{g}")
            if b and b.get("criterion") == m:
                yb = dd.loc[dd["layer"] == b["layer"], "value"]
                if len(yb):
                    y = float(yb.iloc[0])
                    lci, vci = b.get("layer_ci"), b.get("value_ci")
                    if lci or vci:
                        ax.errorbar([b["layer"]], [y], color=pal.get(g, "#333333"), lw=1, capsize=3,
                                    xerr=[[b["layer"] - lci[0]], [lci[1] - b["layer"]]] if lci else None,
                                    yerr=[[max(y - vci[0], 0)], [max(vci[1] - y, 0)]] if vci else None)
                    ax.plot([b["layer"]], [y], marker="*", ms=14, color=pal.get(g, "#333333"),
                            mec="black", mew=0.6, ls="none")
        if m == "nn_accuracy" and np.isfinite(d["chance"]).any():
            ax.axhline(float(d["chance"].mean()), color="grey", ls=":", lw=1, label="uniform chance")
        if m == "normalized_nn_accuracy":
            ax.axhline(0.0, color="grey", ls=":", lw=1, label="majority label")
        if fn_layer is not None and (d["layer"] == fn_layer).any():
            ax.axvspan(fn_layer - 0.4, fn_layer + 0.4, color="grey", alpha=0.15, lw=0,
                       label=f"final-norm point (layer {fn_layer}, not a candidate)")
        ax.set_xlabel("text layer l (LLM hidden-state index)")
        ax.set_ylabel(_MEASURE_LABELS.get(m, m))
        ax.xaxis.get_major_locator().set_params(integer=True)
    seen: dict = {}
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), fontsize=7, title="group · visual", title_fontsize=7,
               loc="outside right upper")
    out.append(fig)
    if best:
        out.append(md("**Best-aligned layer** (argmax over layers of the mean normalized nearest-label-word "
                      "accuracy over the included tasks, else of the mean max cosine; 95% percentile intervals "
                      "from an image-level bootstrap; *share of draws*: bootstrap draws whose argmax is the "
                      "best layer). Tasks whose majority share reaches `max_majority_share` "
                      f"({(summ.get('settings') or {}).get('max_majority_share', '—')}) are excluded:"))
        out.append(table(_best_table(best), precision=3))
    if summ.get("centring"):
        out.append(md(f"Centring: {summ['centring']}."))
    for n in summ.get("notes", []) or []:
        out.append(md(f"Note: {n}"))
    return out
