"""Display helpers of the report pages: callouts, markdown, tables, figures and the
small formatters the sections share.

Section functions return lists of displayable items (IPython ``HTML`` / ``Markdown``,
pandas ``Styler`` tables, matplotlib ``Figure`` objects); :func:`show` displays them in a
notebook. Figures are made outside pyplot (:func:`_figure`) so nothing is shown or leaked
implicitly, and :func:`show` encodes them as PNG with an alt text.
"""

from __future__ import annotations

import base64
import html as _html
import math
import re
from collections.abc import Iterable
from typing import Any

import pandas as pd

from embedlens.store import display_token

#: The EmbedLens categories (a token gets the first group whose anchor it matches, else alive).
LABELS = ("vit_sink", "llm_sink", "dead", "alive")
GROUPS = LABELS[:3]
#: Okabe–Ito colours (colour-blind safe), one per category.
LABEL_COLOURS = {"vit_sink": "#D55E00", "llm_sink": "#CC79A7", "dead": "#7F7F7F", "alive": "#009E73"}
REFERENCE_ALIVE_SHARE = 0.60  # paper, LLaVA-1.5-7B (docs/methods.md §1.5)


def callout(text: str, kind: str = "missing"):
    """A highlighted note (HTML). ``kind``: missing | note | ours. ``text`` is escaped;
    ``**bold**`` and `` `code` `` are rendered."""
    from IPython.display import HTML

    t = _html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    prefix = {"missing": "Not shown: ", "note": "", "ours": "[ours] "}.get(kind, "")
    return HTML(f'<div class="el-callout el-{kind}"><span class="el-tag">{prefix}</span>{t}</div>')


def md(text: str):
    """Markdown (rendered by the notebook; the text is not escaped)."""
    from IPython.display import Markdown

    return Markdown(text)


def table(df: pd.DataFrame, *, caption: str | None = None, precision: int = 3, percent: Iterable[str] = (),
          index: bool = False):
    """A compact HTML table (escaped cells; ``percent`` columns shown as %; p-value columns,
    named "p" or "p (test)", as `fmt_p`: never rounded to 0)."""
    df = df.copy()
    fmt: dict[str, Any] = {}
    pct = set(percent)
    for c in df.columns:
        if c in pct:
            fmt[c] = _fmt_pct
        elif str(c) == "p" or str(c).startswith("p ("):
            fmt[c] = lambda v: _html.escape(fmt_p(v))  # a formatter's output is not escaped by the Styler
        elif pd.api.types.is_float_dtype(df[c]):
            fmt[c] = lambda v, p=precision: _fmt_num(v, p)
    sty = df.style.format(fmt, escape="html", na_rep="")
    if not index:
        sty = sty.hide(axis="index")
    if caption:
        sty = sty.set_caption(_html.escape(caption))
    return sty


def _finite(v: Any) -> float | str:
    """``v`` as a finite float, or the text a cell shows instead: "" for None, NaN and
    infinities, ``str(v)`` for what is not a number."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "" if v is None else str(v)
    return f if math.isfinite(f) else ""


def _fmt_pct(v: Any) -> str:
    v = _finite(v)
    return v if isinstance(v, str) else f"{100 * v:.1f} %"


def fmt_p(v: Any) -> str:
    """A p-value as text: two significant digits, "< 0.001" below 0.001 (a fixed number of
    decimals would print 0.0005 as "0", a p-value no test gives)."""
    v = _finite(v)
    if isinstance(v, str):
        return v
    return "< 0.001" if v < 0.001 else f"{v:.2g}"


def _fmt_num(v: Any, precision: int = 3) -> str:
    """Numbers without float noise: integers as integers, else ``precision`` decimals
    (trailing zeros dropped), large values in general format."""
    v = _finite(v)
    if isinstance(v, str):
        return v
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if abs(v) >= 1e5:
        return f"{v:.{precision}g}"
    t = f"{v:.{precision}f}".rstrip("0").rstrip(".")
    return t if t not in ("-0", "") else "0"


def figure_png(fig, dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib figure (tight bounding box)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def figure_alt(fig) -> str:
    """Alt text of a figure: its titles and axis labels."""
    parts = []
    for ax in fig.axes:
        bits = [ax.get_title(), ax.get_ylabel() and f"y: {ax.get_ylabel()}",
                ax.get_xlabel() and f"x: {ax.get_xlabel()}"]
        t = "; ".join(b.replace("\n", " ") for b in bits if b)
        if t and t not in parts:
            parts.append(t)
    return " | ".join(parts)[:500] or "figure"


def show(items: Iterable[Any]) -> None:
    """Display section items in a notebook: text → markdown, matplotlib figures → PNG
    (encoded here, so no pyplot/inline-backend state is involved), the rest as is."""
    from IPython.display import display
    from matplotlib.figure import Figure

    for it in items:
        if it is None:
            continue
        if isinstance(it, str):
            display(md(it))
        elif isinstance(it, Figure):
            alt = figure_alt(it)
            png = base64.b64encode(figure_png(it)).decode("ascii")
            display({"image/png": png, "text/plain": f"<figure: {alt}>"}, raw=True,
                    metadata={"image/png": {"alt": alt}})
        else:
            display(it)


def _figure(w: float, h: float, nrows: int = 1, ncols: int = 1, **kw):
    """A matplotlib Figure outside pyplot (no implicit display, nothing leaks)."""
    import seaborn as sns
    from matplotlib.figure import Figure

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _plain_log_ticks(axis) -> None:
    """Plain numbers (0.5, 2, 10) instead of 5×10⁻¹ on a log-scaled axis, with enough
    ticks when the data span less than a couple of decades. Call after plotting."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    decades = math.log10(hi / lo) if lo > 0 and hi > 0 else 3
    subs = (1.0, 2.0, 5.0) if decades > 2 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _tok(s: Any, raw: bool = False) -> str:
    """A vocabulary token for display: decoded for reading ("Ġyellow" / "▁yellow" → "yellow",
    ``embedlens.store.display_token``; an already decoded text stays as it is), or the raw
    piece when ``raw``; whitespace made visible, kept short."""
    s = str(s) if raw else display_token(s)
    if s == "":
        return "∅"
    s = s.replace("\n", "\\n").replace("\t", "\\t")
    if s.strip() == "":
        s = s.replace(" ", "␣")
    return s if len(s) <= 24 else s[:23] + "…"


def _pct(x: Any) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f} %"


def _layer_name(l: Any) -> str:
    try:
        li = int(l)
    except (TypeError, ValueError):
        return str(l)
    return "vision" if li < 0 else f"h[{li}]"
