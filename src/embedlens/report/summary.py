"""The summary page (``results/reports/index.html``): one row per model × data set,
linking each report, with the headline numbers side by side."""

from __future__ import annotations

import html as _html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .display import GROUPS, REFERENCE_ALIVE_SHARE, _figure, _pct, _tok, callout, md, table
from .inputs import looks_like_reference_model, read_summary_outputs
from .sections.benchmarks import summary_benchmarks  # noqa: F401 - the index section, re-exported
from .sections.compress import _condition_rows

#: Section headings of the summary page (``results/reports/index.html``).
SUMMARY_SECTIONS: tuple[str, ...] = (
    "Reports",
    "Alive share",
    "Anchors",
    "Best-aligned layer",
    "Compression deltas vs baseline",
    "Standard benchmarks",
)


def load_summary_rows(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Read, per model × data set entry, what the summary page shows (each output optional).

    One dict per entry: ``model``, ``dataset``, ``href`` (the report link), ``is_reference``,
    and what :func:`~embedlens.report.inputs.read_summary_outputs` found (``cat``,
    ``align``, ``compress``, ``missing``)."""
    rows = []
    for e in entries:
        r: dict[str, Any] = {"model": e.get("model"), "dataset": e.get("dataset"), "href": e.get("report_href"),
                             **read_summary_outputs(e)}
        ref = e.get("is_reference_model")
        r["is_reference"] = (bool(ref) if ref is not None
                             else looks_like_reference_model(e.get("model"), e.get("model_id")))
        rows.append(r)
    return rows


def _link(r: Mapping[str, Any]) -> str:
    label = f"{r['model']} × {r['dataset']}"
    if r.get("href"):
        return f'<a href="{_html.escape(str(r["href"]), quote=True)}">{_html.escape(label)}</a>'
    return _html.escape(label) + " (no report)"


def _html_table(df: pd.DataFrame, raw: Iterable[str] = ()) -> Any:
    """HTML table where the ``raw`` columns hold trusted HTML (links) and the rest is escaped."""
    from IPython.display import HTML

    raw = set(raw)
    head = "".join(f"<th>{_html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            v = row[c]
            if c in raw:
                cells.append(f"<td>{v}</td>")
            else:
                txt = "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else str(v)
                cells.append(f"<td>{_html.escape(txt)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return HTML(f'<table class="dataframe"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def summary_reports(rows: Sequence[Mapping[str, Any]]) -> list:
    """Section "Reports": one link per model × data set with its size and missing outputs."""
    if not rows:
        return [callout("no model × data-set pairs were given to the summary")]
    t = []
    for r in rows:
        cat = r.get("cat") or {}
        t.append({"report": _link(r), "images": cat.get("n_images", ""), "visual tokens": cat.get("n_tokens", ""),
                  "missing outputs": "; ".join(f"{k}: {v}" for k, v in r["missing"].items()) or "—"})
    return [md(f"{len(rows)} model × data-set report(s); each link opens the full report."),
            _html_table(pd.DataFrame(t), raw=["report"])]


def summary_alive(rows: Sequence[Mapping[str, Any]]) -> list:
    """Section "Alive share": alive share per pair (top-1 and top-k rules), bar chart and table."""
    import seaborn as sns

    have = [r for r in rows if r.get("cat")]
    if not have:
        return [callout("alive share: no categorize output for any pair")]
    long = []
    for r in have:
        sh = r["cat"].get("shares") or {}
        for rule, name in (("top1", "top-1 rule"), ("topk", "top-k rule")):
            long.append({"pair": f"{r['model']}\n{r['dataset']}", "rule": name,
                         "alive share (%)": 100 * float((sh.get(rule) or {}).get("alive", float("nan")))})
    long = pd.DataFrame(long)
    fig, ax = _figure(max(5.0, 1.6 * len(have) + 2), 3.8)
    ax = ax[0, 0]
    sns.barplot(long, x="pair", y="alive share (%)", hue="rule", ax=ax, palette=["#9ecae1", "#08519c"])
    for cont in ax.containers:
        ax.bar_label(cont, fmt="%.1f", fontsize=7, padding=2)
    if any(r["is_reference"] for r in have):
        ax.axhline(100 * REFERENCE_ALIVE_SHARE, color="black", ls="--", lw=1,
                   label="paper: ≈ 60 % alive (LLaVA-1.5-7B)")
    ax.set_ylim(0, 105)
    ax.set_xlabel("model × data set")
    ax.set_ylabel("alive visual tokens (%)")
    ax.legend(fontsize=8)
    t = pd.DataFrame([{"report": _link(r),
                       # which mode produced it: only reference modes compare with the paper's 60 %
                       "mode": (r["cat"].get("settings") or {}).get("mode") or "not recorded",
                       "alive (top-1)": _pct(((r["cat"].get("shares") or {}).get("top1") or {}).get("alive")),
                       "alive (top-k)": _pct(((r["cat"].get("shares") or {}).get("topk") or {}).get("alive")),
                       "dead (top-k)": _pct(((r["cat"].get("shares") or {}).get("topk") or {}).get("dead")),
                       "sinks (top-k)": _pct(sum(float(((r["cat"].get("shares") or {}).get("topk") or {}).get(g, 0))
                                                 for g in ("vit_sink", "llm_sink")))}
                      for r in have])
    return [fig, _html_table(t, raw=["report"])]


def summary_anchors(rows: Sequence[Mapping[str, Any]]) -> list:
    """Section "Anchors": the anchor ids (and strings) of each group per pair."""
    have = [r for r in rows if r.get("cat")]
    if not have:
        return [callout("anchors: no categorize output for any pair")]
    t = []
    for r in have:
        a = r["cat"].get("anchors") or {}
        s = r["cat"].get("anchor_strings") or {}
        row = {"report": _link(r), "source": r["cat"].get("anchor_source", "")}
        for g in GROUPS:
            ids = a.get(g) or []
            row[g] = ", ".join(f"{i} ({_tok(x)})" for i, x in zip(ids, s.get(g) or [""] * len(ids))) or "—"
        t.append(row)
    return [md("Anchor ids per group (string in brackets); `discovered` = found by this project's procedure [ours]."),
            _html_table(pd.DataFrame(t), raw=["report"])]


def summary_alignment(rows: Sequence[Mapping[str, Any]]) -> list:
    """Section "Best-aligned layer": the text layer h[0] aligns best with, per pair, with
    its image-level bootstrap interval and the tasks left out of the criterion."""
    t = []
    for r in rows:
        best = (r.get("align") or {}).get("best_layer") or {}
        if not best:
            continue
        pick = best.get("h0/alive") or best.get("h0/all")
        which = "h0/alive" if "h0/alive" in best else "h0/all"
        p = pick or {}
        lci, vci = p.get("layer_ci"), p.get("value_ci")
        t.append({"report": _link(r), "tokens": which.split("/")[1],
                  "best layer (h[0] vs text l)": p.get("layer", ""),
                  "layer 95% CI": f"[{lci[0]}, {lci[1]}]" if lci else "",
                  "criterion": p.get("criterion", ""),
                  "value": f"{p['value']:.3f}" if p.get("value") is not None else "",
                  "value 95% CI": f"[{vci[0]:.3f}, {vci[1]:.3f}]" if vci else "",
                  "at layer 0": f"{p['value_at_layer0']:.3f}" if p.get("value_at_layer0") is not None else "",
                  "excluded tasks": ", ".join(f"{e['task']} ({e['majority_share']:.2f})"
                                              if e.get("majority_share") is not None else e["task"]
                                              for e in p.get("excluded_tasks") or []) or "—"})
    if not t:
        return [callout("best-aligned layer: no alignment output for any pair")]
    return [md("Best-aligned text layer of the alive visual tokens' h[0] [ours]: argmax of the mean normalized "
               "nearest-label-word accuracy ((accuracy − majority share) / (1 − majority share)) over the tasks "
               "that are not near-constant (excluded tasks with their majority shares), else of the mean max "
               "cosine; the final-norm layer is not a candidate; 95% intervals from an image-level bootstrap."),
            _html_table(pd.DataFrame(t), raw=["report"])]


def summary_compression(rows: Sequence[Mapping[str, Any]]) -> list:
    """Section "Compression deltas vs baseline": accuracy − baseline (percentage points)
    and prefill FLOPs (% of baseline) per condition and pair."""
    import seaborn as sns

    from embedlens.compress.aggregate import unmatched_note, unmatched_random_controls

    recs, notes = [], []
    for r in rows:
        c = r.get("compress")
        if c is None or c.empty or not {"condition", "op", "accuracy"} <= set(c):
            continue
        d = _condition_rows(c)
        base = d[d["op"] == "baseline"]
        if base.empty:
            continue
        # the per-pair report says so too; the index must not show these as plain controls
        notes += [callout(f"{r['model']} × {r['dataset']}: {unmatched_note(u)}.", kind="note")
                  for u in unmatched_random_controls(d)]
        b = float(base["accuracy"].iloc[0])
        for _, x in d.iterrows():
            if x["op"] == "baseline":
                continue
            recs.append({"pair": f"{r['model']} × {r['dataset']}", "condition": x["condition"],
                         "Δ accuracy (pp)": 100 * (float(x["accuracy"]) - b),
                         "FLOPs (% of baseline)": 100 * float(x["flops_rel"]) if "flops_rel" in x else float("nan")})
    if not recs:
        return [callout("compression deltas: no compression-benchmark table with a baseline for any pair")]
    df = pd.DataFrame(recs)
    piv = df.pivot_table(index="condition", columns="pair", values="Δ accuracy (pp)", aggfunc="mean")
    fig, ax = _figure(1.8 * piv.shape[1] + 4, 0.32 * piv.shape[0] + 1.8)
    ax = ax[0, 0]
    lim = max(1.0, float(np.nanmax(np.abs(piv.to_numpy()))))
    sns.heatmap(piv, annot=True, fmt=".1f", cmap="RdBu", center=0, vmin=-lim, vmax=lim, ax=ax,
                cbar_kws={"label": "accuracy − baseline (percentage points)"}, annot_kws={"fontsize": 7})
    ax.set_xlabel("model × data set")
    ax.set_ylabel("condition")
    flops = df.pivot_table(index="condition", columns="pair", values="FLOPs (% of baseline)", aggfunc="mean")
    return [md("VQA accuracy of each condition minus the baseline's, in percentage points (negative = worse)."), fig,
            *notes, md("Prefill FLOPs of each condition (% of the baseline):"),
            table(flops.round(1).reset_index(), precision=1)]
