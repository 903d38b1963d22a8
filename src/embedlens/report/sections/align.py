"""Report section "Layer alignment": visual tokens against the LLM's text hidden states
per text layer, and the best-aligned layer."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..display import LABEL_COLOURS, _figure, callout, md, table
from ..inputs import ReportInputs

_MEASURE_LABELS = {
    "nn_accuracy": "nearest-label-word accuracy (mean over tasks)",
    "mean_max_cos": "mean max cosine to layer-l text states (centred)",
    "cka": "linear CKA with label-word states (mean over tasks)",
}


def section_alignment(inp: ReportInputs) -> list:
    """Section "Layer alignment": measures per text layer (h[0] and h[l] vs text layer l)
    per group, with the best-aligned layer; a callout when the alignment output is missing."""
    if inp.align is None or inp.align.empty:
        return [callout(f"layer alignment: {inp.why('align')}")]
    import seaborn as sns

    a = inp.align.copy()
    a = a[np.isfinite(a["value"].astype(float))]
    summ = inp.align_summary or {}
    out: list = [callout("layer alignment: visual tokens compared with the LLM's text hidden states of short prompts "
                         "built from the label words plus a generic word list, per text layer l. Solid lines: visual "
                         "h[0] vs text layer l (the claim: alive tokens resemble intermediate layers); dashed: visual "
                         "h[l] vs text layer l. Stars mark the best-aligned layer.", kind="ours")]
    if a.empty:
        out.append(callout("alignment curves: every measured value is missing (no tokens in any group)"))
        return out
    agg = (a.groupby(["visual", "group", "layer", "measure"], dropna=False)
           .agg(value=("value", "mean"), chance=("chance", "mean")).reset_index())
    measures = [m for m in ("nn_accuracy", "mean_max_cos", "cka") if (agg["measure"] == m).any()]
    groups = [g for g in dict.fromkeys(agg["group"])]
    pal = {g: LABEL_COLOURS.get(g, c) for g, c in zip(groups, sns.color_palette("dark", len(groups)))}
    pal.setdefault("all", "#0072B2")
    pal["all"] = "#0072B2"
    pal["sink"] = LABEL_COLOURS["vit_sink"]
    fig, axes = _figure(4.3 * len(measures) + 1.6, 3.9, 1, len(measures))
    best = summ.get("best_layer") or {}
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
                    ax.plot([b["layer"]], [float(yb.iloc[0])], marker="*", ms=14, color=pal.get(g, "#333333"),
                            mec="black", mew=0.6, ls="none")
        if m == "nn_accuracy" and np.isfinite(d["chance"]).any():
            ax.axhline(float(d["chance"].mean()), color="grey", ls=":", lw=1, label="chance")
        ax.set_xlabel("text layer l (LLM hidden-state index)")
        ax.set_ylabel(_MEASURE_LABELS.get(m, m))
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, title="group · visual", title_fontsize=7, loc="outside right upper")
    out.append(fig)
    if best:
        bt = pd.DataFrame([{"visual": kk.split("/")[0].replace("h0", "h[0] vs text l").replace("hl", "h[l] vs text l"),
                            "group": kk.split("/")[1], "best layer": v.get("layer"), "criterion": v.get("criterion"),
                            "value at best": v.get("value"), "value at layer 0": v.get("value_at_layer0")}
                           for kk, v in best.items()])
        out.append(md("**Best-aligned layer** (argmax of the mean nearest-label-word accuracy, else of the mean max "
                      "cosine):"))
        out.append(table(bt, precision=3))
    if summ.get("centring"):
        out.append(md(f"Centring: {summ['centring']}."))
    for n in summ.get("notes", []) or []:
        out.append(md(f"Note: {n}"))
    return out
