"""Report section "Probe accuracy and selectivity": linear-probe curves per
representation, their status, and the patch-compression hit@k check."""

from __future__ import annotations

import re
from collections.abc import Iterable

import pandas as pd

from ..display import _figure, callout, md, table
from ..inputs import ReportInputs


def _feature_order(features: Iterable[str]) -> list[str]:
    fs = list(dict.fromkeys(features))

    def key(f):
        if f == "vision":
            return -1
        m = re.match(r"^h(\d+)$", str(f))
        return int(m.group(1)) if m else 10**6

    return sorted(fs, key=key)


def _feature_label(f: str) -> str:
    m = re.match(r"^h(\d+)$", str(f))
    return f"h[{m.group(1)}]" if m else str(f)


def section_probe(inp: ReportInputs) -> list:
    """Section "Probe accuracy and selectivity": probe accuracy and selectivity curves per
    group and task, probe status, best representation, and the hit@k check [ours]."""
    if inp.probe is None or inp.probe.empty:
        return [callout(f"probing classifiers: {inp.why('probe')}")]
    import seaborn as sns

    p = inp.probe.copy()
    ok = p[p["status"] == "ok"]
    out: list = [md("Linear probes (multinomial logistic regression on standardized features, split by image) per "
                    "representation, label task and token group. Bands: accuracy, Wilson score interval on the "
                    "effective number of test tokens (image-level design effect; valid at 0 and 1); selectivity "
                    "(= accuracy − control-task accuracy), Newcombe's paired interval; dotted: majority baseline.")]
    if ok.empty:
        out.append(callout("probe curves: no (layer, task, group) had enough tokens to train and test a probe"))
    else:
        feats = _feature_order(p["feature"])
        xpos = {f: i for i, f in enumerate(feats)}
        groups = [g for g in dict.fromkeys(p["group"]) if (ok["group"] == g).any()]
        tasks = list(dict.fromkeys(ok["task"]))
        pal = dict(zip(tasks, sns.color_palette("colorblind", len(tasks))))
        fig, axes = _figure(3.3 * len(groups) + 1.2, 6.2, 2, len(groups), sharey="row")
        for j, g in enumerate(groups):
            a1, a2 = axes[0, j], axes[1, j]
            for t in tasks:
                d = ok[(ok["group"] == g) & (ok["task"] == t)].copy()
                if d.empty:
                    continue
                d["x"] = d["feature"].map(xpos)
                d = d.sort_values("x")
                a1.plot(d["x"], d["accuracy"], marker="o", ms=3, color=pal[t], label=t)
                a1.fill_between(d["x"], d["accuracy_ci_low"], d["accuracy_ci_high"], color=pal[t], alpha=0.15, lw=0)
                a1.plot(d["x"], d["majority_accuracy"], ls=":", color=pal[t], lw=1)
                a2.plot(d["x"], d["selectivity"], marker="o", ms=3, color=pal[t], label=t)
                if "selectivity_ci_low" in d:
                    a2.fill_between(d["x"], d["selectivity_ci_low"], d["selectivity_ci_high"], color=pal[t],
                                    alpha=0.15, lw=0)
            a2.axhline(0, color="black", lw=0.8)
            n = int(ok[ok["group"] == g]["n_tokens"].max())
            a1.set_title(f"group: {g} (≤ {n} tokens)", fontsize=9)
            for a in (a1, a2):
                a.set_xticks(range(len(feats)), [_feature_label(f) for f in feats],
                             rotation=90 if len(feats) > 12 else 0, fontsize=7)
                a.set_xlim(-0.5, len(feats) - 0.5)
        fig.supxlabel("representation (vision-encoder output, LLM hidden state h[l])", fontsize=10)
        axes[0, 0].set_ylabel("probe accuracy on held-out images")
        axes[1, 0].set_ylabel("selectivity (accuracy − control)")
        axes[0, 0].set_ylim(0, 1.02)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=pal[t], marker="o", ms=3, label=t) for t in tasks]
        handles.append(Line2D([], [], color="grey", ls=":", label="majority baseline"))
        fig.legend(handles=handles, loc="outside right upper", title="task", fontsize=8, title_fontsize=8)
        out.append(fig)
    # status: groups with too few tokens are reported, never dropped
    st = (p.groupby(["task", "group"], sort=False)["status"]
          .agg(lambda x: ", ".join(f"{k.replace('_', ' ')} ×{v}" for k, v in x.value_counts().items()))
          .unstack("group").reset_index())
    st.columns.name = None
    untrained = p[~p["status"].isin(["ok", "not_evaluable"])]
    unscored = p[p["status"] == "not_evaluable"]
    text = "**Probe status** per task and group (number of representations):"
    if not untrained.empty:
        text += (f" {len(untrained)} of {len(p)} probes were not trained because their group had too few tokens, "
                 "images or training classes.")
    if not unscored.empty:
        text += (f" {len(unscored)} were not evaluable: one class among their test tokens, so accuracy would "
                 "score that class only (listed below, left out of the curves).")
    out.append(md(text))
    out.append(table(st))
    if not unscored.empty:
        why = unscored["reason"] if "reason" in unscored else pd.Series("", index=unscored.index)
        ne = (unscored.assign(reason=why.fillna(""), representation=unscored["feature"].map(_feature_label))
              .groupby(["task", "group", "reason"], sort=False)["representation"]
              .agg(", ".join).reset_index())
        out.append(md("**Not evaluable** (test split with one class):"))
        out.append(table(ne[["task", "group", "representation", "reason"]]))
    best = (inp.probe_summary or {}).get("best_by_task_group") or {}
    if best:
        b = pd.DataFrame([{"task/group": kk, "best representation": _feature_label(v.get("feature")),
                           "accuracy": v.get("accuracy"), "selectivity": v.get("selectivity")}
                          for kk, v in best.items()])
        out.append(md("Best representation per task and group (by accuracy):"))
        out.append(table(b, precision=3))
    h = inp.hitk
    if h is not None and not h.empty:
        kmax = int(h["k"].max())
        cols = ["task", "group", "n_tokens", "hits", "hit_rate", "chance_uniform", "chance_label_prior"]
        hh = h[h["k"] == kmax][[c for c in cols if c in h]]
        out.append(callout(f"patch-compression check: is the label word among the top-{kmax} EmbedLens neighbours of "
                           "the token at h[0]? hit@k with two chance levels (uniform draw from the vocabulary; the "
                           "token's own neighbours against a label drawn from the group's label distribution).",
                           kind="ours"))
        if "chance_uniform" in hh:
            # a uniform draw from ~10⁴–10⁵ ids is far below 0.1 %: two significant digits, not "0.0 %"
            hh = hh.assign(chance_uniform=[f"{100 * v:.2g} %" if pd.notna(v) else "" for v in hh["chance_uniform"]])
        out.append(table(hh, percent=["hit_rate", "chance_label_prior"]))
    for n in (inp.probe_summary or {}).get("notes", []) or []:
        out.append(md(f"Note: {n}"))
    return out
