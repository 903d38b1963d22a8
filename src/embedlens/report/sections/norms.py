"""Report section "Norm distributions": hidden-state norms of the visual tokens per
category and representation."""


from __future__ import annotations

import re

from types import SimpleNamespace

import numpy as np
import pandas as pd

from embedlens.store import final_norm_flag, num_layers_of

from ..display import LABEL_COLOURS, LABELS, _figure, _layer_name, _plain_log_ticks, callout, md, table
from ..inputs import ReportInputs


def _norm_columns(cats: pd.DataFrame, max_layers: int = 7) -> list[str]:
    llm = sorted((int(m.group(1)) for c in cats.columns if (m := re.match(r"^norm_h(\d+)$", c))))
    if len(llm) > max_layers:
        keep = {llm[0], llm[-1]} | set(llm[1:3])
        rest = [l for l in llm if l not in keep]
        extra = max_layers - len(keep)
        if extra > 0 and rest:
            keep |= {rest[i] for i in np.linspace(0, len(rest) - 1, extra).round().astype(int)}
        llm = sorted(keep)
    cols = ["norm_vision"] if "norm_vision" in cats and np.isfinite(cats["norm_vision"]).any() else []
    return cols + [f"norm_h{l}" for l in llm]


def _final_norm_flag(inp: ReportInputs) -> bool:
    # The store's own reader, so the report follows the attribute names the writer uses.
    return bool(final_norm_flag(SimpleNamespace(attrs=inp.hidden_attrs)))


def _num_layers(inp: ReportInputs) -> int | None:
    return num_layers_of(SimpleNamespace(attrs=inp.hidden_attrs))


def section_norms(inp: ReportInputs, max_tokens: int = 40000) -> list:
    """Section "Norm distributions": L2 norm of the visual tokens' hidden states per category
    and representation (box plot on at most ``max_tokens`` tokens, medians on all)."""
    if inp.categories is None:
        return [callout(f"norm distributions: {inp.why('categorize')}")]
    import seaborn as sns

    cats = inp.categories
    cols = _norm_columns(cats)
    if not cols:
        return [callout("norm distributions: the categorize table has no norm columns")]
    sub = cats.sample(n=max_tokens, random_state=0) if len(cats) > max_tokens else cats
    long = sub[["label"] + cols].melt(id_vars="label", var_name="feature", value_name="norm")
    long = long[np.isfinite(long["norm"]) & (long["norm"] > 0)]
    normed_last = _final_norm_flag(inp)
    last = max((int(c[6:]) for c in cols if c.startswith("norm_h")), default=None)
    names = {c: ("vision out" if c == "norm_vision" else _layer_name(c[6:])
                 + (" (final norm)" if normed_last and int(c[6:]) == last and last == _num_layers(inp) else ""))
             for c in cols}
    long["feature"] = long["feature"].map(names)
    hue_order = [lab for lab in LABELS if (long["label"] == lab).any()]
    fig, ax = _figure(min(3 + 1.3 * len(cols), 12), 4.2)
    ax = ax[0, 0]
    sns.boxplot(long, x="feature", y="norm", hue="label", hue_order=hue_order, order=[names[c] for c in cols],
                palette=LABEL_COLOURS, log_scale=True, fliersize=1.5, linewidth=0.8, ax=ax)
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("representation (vision-encoder output, LLM hidden state h[l])")
    ax.set_ylabel("L2 norm of the token's hidden state (log scale)")
    ax.legend(title="category", fontsize=8, title_fontsize=8)
    out: list = [md("Distribution of the hidden-state norm of the visual tokens per category. ViT sinks are "
                    "outliers of the vision-encoder output norm, LLM sinks develop massive activations in early "
                    "LLM layers."
                    + (f" A random {max_tokens} of {len(cats)} tokens are drawn." if len(cats) > max_tokens else "")),
                 fig]
    med = cats.groupby("label")[cols].median().reindex([lab for lab in LABELS if lab in set(cats["label"])])
    med.columns = [names[c] for c in cols]
    out.append(md("Median norm per category:"))
    out.append(table(med.reset_index(names="category"), precision=3))
    if "norm_vision" not in cols:
        out.append(callout("vision-encoder norms: not available (no vision layer extracted, or vision tokens do not "
                           "map 1:1 onto the LLM's visual tokens)"))
    note = [n for n in (inp.cat_summary or {}).get("notes", []) if n]
    for n in note:
        out.append(md(f"Note: {n}"))
    return out
