"""Report section "Anchors and evidence": the anchor ids of each group, configured or
discovered (in the workflow: once per model over all its data sets, the ``anchors``
step), with the evidence the discovery recorded: each candidate's criteria with their
margins (positive = passes), so a near miss is visible."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..display import GROUPS, LABEL_COLOURS, _figure, _plain_log_ticks, _tok, callout, md, table
from ..inputs import ReportInputs


def section_anchors(inp: ReportInputs) -> list:
    """Section "Anchors and evidence": anchor ids per group (configured or discovered),
    the discovery's evidence and candidates, and the most frequent nearest words of h[0]."""
    if inp.anchors is None and inp.cat_summary is None:
        return [callout(f"anchors: {inp.why('categorize')}")]
    cs = inp.cat_summary or {}
    doc = inp.anchors or {"source": cs.get("anchor_source"), "anchors": cs.get("anchors", {}),
                          "anchor_strings": cs.get("anchor_strings", {}),
                          "anchor_texts": cs.get("anchor_texts", {}), "evidence": {},
                          "scope": cs.get("anchor_scope"), "datasets": cs.get("anchor_datasets")}
    source = doc.get("source") or "unknown"
    anchors = doc.get("anchors") or {}
    strings = doc.get("anchor_strings") or {}
    texts = doc.get("anchor_texts") or {}  # decoded by the tokenizer, when recorded
    ev = doc.get("evidence") or {}
    s = inp.cat_summary or {}
    out: list = []
    if source == "configured":
        out.append(md("Anchors were **configured** in `config.yaml` (e.g. the paper's ids for LLaVA-1.5-7B); "
                      "no discovery was run. The evidence below is how often each anchor is a top-k neighbour."))
    else:
        out.append(callout("anchors were **discovered** from the extracted data (no configured anchors for this model; "
                           "no released procedure exists). ViT sinks = vision-output norm outliers, LLM sinks = "
                           "early-layer norm outliers, dead = image-independent top-1 hub ids; each group's anchor "
                           "ids = its most frequent, specific top-1 neighbours.", kind="ours"))
    if doc.get("scope") == "model":
        n_tok = doc.get("n_tokens") or {}
        pooled = ", ".join(f"{d} ({n_tok[d]:,} tokens)" if d in n_tok else str(d) for d in doc.get("datasets") or [])
        out.append(callout(f"These anchors are the model's, found **once over all its data sets, pooled**: {pooled} "
                           f"(the per-model `anchors` step, `results/analysis/{inp.model}/anchors/`). Every data set "
                           "of the model is categorized with the same ids; the shares and thresholds below are "
                           "the pooled ones.", kind="note"))
    elif source != "configured":
        out.append(callout("These anchors were discovered on this data set alone (a stand-alone categorization); "
                           "the workflow finds them once per model over all its data sets.", kind="note"))
    rows = []
    for g in GROUPS:
        ids = anchors.get(g) or []
        gev = ev.get(g) or {}
        rows.append({
            "group": g, "anchor ids": ", ".join(str(i) for i in ids) or "—",
            "anchor text": ", ".join(_tok(x) for x in texts.get(g) or strings.get(g, [])) or "—",
            "raw piece": ", ".join(_tok(x, raw=True) for x in strings.get(g, [])) or "—",
            "tokens (top-k membership)": (s.get("counts") or {}).get("topk", {}).get(g) if s.get("counts") else None,
            "membership share (top-k)": (s.get("membership") or {}).get("topk", {}).get(g),
            "discovery status": gev.get("status", "configured" if source == "configured" else ""),
        })
    out.append(table(pd.DataFrame(rows), percent=["membership share (top-k)"]))
    empty = [g for g in GROUPS if not anchors.get(g)]
    if empty:
        why = "; ".join(f"{g}: {(ev.get(g) or {}).get('status', 'no anchor configured')}" for g in empty)
        out.append(callout(f"No anchor for {', '.join(empty)}, so no token can be labelled "
                           f"{' / '.join(empty)}. Why — {why}", kind="note"))

    if source != "configured" and inp.categories is not None:
        out.extend(_anchor_evidence_figure(inp, ev))
        margins = ("Each criterion's **margin** = how far the candidate is from its threshold, positive = "
                   "passes (value − threshold for a minimum, threshold − value for a maximum).")
        for g in ("vit_sink", "llm_sink"):
            cand = (ev.get(g) or {}).get("anchor_candidates") or []
            if cand:
                out.append(md(f"**{g} anchor candidates** (top-1 ids of the group's outlier tokens; they pass the "
                              f"same label-word / label-information test as the dead hubs). {margins}"))
                out.append(table(_candidates(cand), percent=["group_share", "overall_share"]))
        dc = (ev.get("dead") or {}).get("candidates") or []
        if dc:
            out.append(md("**Dead-hub candidates** (the most frequent top-1 ids; label information: "
                          f"{(ev.get('dead') or {}).get('information_criterion', 'n/a')}). {margins}"))
            out.append(table(_candidates(dc), percent=["top1_share", "image_share"]))
        params = ev.get("params")
        if params:
            out.append(md("Discovery thresholds: " + ", ".join(f"`{k}={v}`" for k, v in params.items())))
    nw = inp.nearest_words
    if nw is not None and not nw.empty:
        top = nw.head(15).copy()
        if "token_string" in top:  # the decoded text first, the raw piece beside it
            text = top.pop("token_text") if "token_text" in top else top["token_string"]
            top["token_string"] = top["token_string"].map(lambda x: _tok(x, raw=True))
            top.insert(1, "token_text", text.map(_tok))
        out.append(md("**Most frequent nearest words of h[0]** (the vocabulary ids that win the most visual tokens):"))
        out.append(table(top, percent=[c for c in ("share_top1", "share_topk") if c in top]))
    elif "nearest_words" in inp.missing:
        out.append(callout(f"nearest-word histogram: {inp.why('nearest_words')}"))
    return out


def _candidates(rows: list[Mapping[str, Any]]) -> pd.DataFrame:
    """Candidate rows as a table: the criteria as "name value vs threshold (margin)" text,
    the largest label information and the per-data-set shares as columns."""
    d = pd.DataFrame(rows)
    if "label_information" in d:
        d["max label information U"] = [max(x.values()) if isinstance(x, dict) and x else None
                                        for x in d.pop("label_information")]
    if "per_dataset_top1_share" in d:
        per = d.pop("per_dataset_top1_share")
        if per.map(lambda x: isinstance(x, dict) and bool(x)).any():
            d["top-1 share per data set"] = [", ".join(f"{k} {100 * v:.1f} %" for k, v in x.items())
                                             if isinstance(x, dict) else "" for x in per]
    if "criteria" in d:
        d["criteria: value rule threshold (margin)"] = [
            "; ".join(_criterion(c) for c in (x if isinstance(x, list) else [])) for x in d.pop("criteria")]
    if "token_string" in d:
        d["token_string"] = d["token_string"].map(lambda x: _tok(x) if isinstance(x, str) else x)
    return d


def _criterion(c: Mapping[str, Any]) -> str:
    if c.get("value") is None or c.get("threshold") is None:
        return f"{c['criterion']}: {'passes' if c.get('passes') else 'fails'}" + (
            f" ({c['note']})" if c.get("note") else "")
    return (f"{c['criterion']} {c['value']:.3g} {c.get('rule', '')} {c['threshold']:.3g} "
            f"({c['margin']:+.3g}{'' if c.get('passes') else ', fails'})")


def _anchor_evidence_figure(inp: ReportInputs, ev: Mapping[str, Any]) -> list:
    import seaborn as sns

    cats = inp.categories
    panels = []
    if "norm_vision" in cats and np.isfinite(cats["norm_vision"]).any():
        panels.append("vit")
    early = [str(l) for l in ((ev.get("llm_sink") or {}).get("early_layers") or []) if f"norm_h{l}" in cats]
    if early:
        panels.append("llm")
    if inp.nearest_words is not None and not inp.nearest_words.empty:
        panels.append("hub")
    if not panels:
        return []
    fig, axes = _figure(4.2 * len(panels), 3.6, 1, len(panels))
    for ax, kind in zip(axes.ravel(), panels):
        if kind == "vit":
            x = cats["norm_vision"].to_numpy(float)
            x = x[np.isfinite(x) & (x > 0)]
            sns.histplot(x=x, bins=50, log_scale=True, ax=ax, color="#888888")
            thr = (ev.get("vit_sink") or {}).get("norm_threshold")
            if thr and math.isfinite(thr):
                ax.axvline(thr, color=LABEL_COLOURS["vit_sink"], ls="--", label=f"outlier threshold {thr:.3g}")
                ax.legend(fontsize=7)
            _plain_log_ticks(ax.xaxis)
            ax.set_xlabel("vision-encoder output norm (L2, log scale)")
            ax.set_ylabel("visual tokens (count)")
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
            ax.set_title("ViT-sink evidence", fontsize=9)
        elif kind == "llm":
            per = (ev.get("llm_sink") or {}).get("per_layer") or {}
            pal = sns.color_palette("flare", len(early))
            for c, l in zip(pal, early):
                x = cats[f"norm_h{l}"].to_numpy(float)
                x = x[np.isfinite(x) & (x > 0)]
                sns.histplot(x=x, bins=50, log_scale=True, ax=ax, color=c, element="step", fill=False,
                             label=f"h[{l}]")
                thr = (per.get(l) or per.get(str(l)) or {}).get("norm_threshold")
                if thr and math.isfinite(thr):
                    ax.axvline(thr, color=c, ls="--", lw=1)
            ax.legend(fontsize=7, title="layer (dashed: threshold)", title_fontsize=7)
            _plain_log_ticks(ax.xaxis)
            ax.set_xlabel("early-layer hidden-state norm (L2, log scale)")
            ax.set_ylabel("visual tokens (count)")
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
            ax.set_title("LLM-sink evidence", fontsize=9)
        else:
            nw = inp.nearest_words.head(12).copy()
            nw["word"] = [f"{_tok(s)} ({i})" for s, i in zip(nw["token_string"], nw["token_id"])]
            nw["anchor"] = nw.get("anchor_group", pd.Series([None] * len(nw))).fillna("none")
            pal = {**LABEL_COLOURS, "none": "#c6dbef"}
            sns.barplot(nw, y="word", x=100 * nw["share_top1"], hue="anchor", dodge=False, ax=ax,
                        palette=pal, orient="h")
            hub = ((ev.get("params") or {}).get("hub_min_share"))
            if hub:
                ax.axvline(100 * hub, color="black", ls=":", lw=1, label=f"hub_min_share {100 * hub:.0f} %")
            ax.legend(fontsize=7, title="anchor group", title_fontsize=7)
            ax.set_xlabel("tokens whose top-1 neighbour it is (%)")
            ax.set_ylabel("vocabulary token (id)")
            ax.set_title("Dead-hub evidence", fontsize=9)
    return [md("Evidence for the discovered anchors:"), fig]
