"""Report sections "Category shares" and "Category maps": how many visual tokens fall in
each EmbedLens category, and where they lie on sample images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..display import GROUPS, LABEL_COLOURS, LABELS, REFERENCE_ALIVE_SHARE, _figure, _pct, _tok, callout, md, table
from ..inputs import ReportInputs
from .provenance import MODE_TEXT, run_mode


def section_category_shares(inp: ReportInputs) -> list:
    """Section "Category shares": share of visual tokens per category under the top-1 and
    top-k rules (bar chart, table, per-image spread, group overlap, excluded ids)."""
    if inp.categories is None and inp.cat_summary is None:
        return [callout(f"category shares: {inp.why('categorize')}")]
    s = inp.cat_summary or {}
    shares = s.get("shares")
    if not shares and inp.categories is not None:
        c = inp.categories
        shares = {"topk": {lab: float((c["label"] == lab).mean()) for lab in LABELS},
                  "top1": {lab: float((c.get("label_top1", c["label"]) == lab).mean()) for lab in LABELS}}
    k = (s.get("settings") or {}).get("top_k", 3)
    long = pd.DataFrame([{"rule": ("top-1 rule" if r == "top1" else f"top-{k} rule"), "category": lab,
                          "share": 100 * float(shares.get(r, {}).get(lab, 0.0))}
                         for r in ("top1", "topk") for lab in LABELS])
    import seaborn as sns

    fig, ax = _figure(8.5, 3.8)
    ax = ax[0, 0]
    sns.barplot(long, x="category", y="share", hue="rule", order=list(LABELS), ax=ax,
                palette=["#9ecae1", "#08519c"])
    for cont in ax.containers:
        ax.bar_label(cont, fmt="%.1f %%", fontsize=8, padding=2)
    ax.set_ylabel("share of visual tokens (%)")
    ax.set_xlabel("EmbedLens category (label = first matching group)")
    ax.set_ylim(0, max(105, long["share"].max() * 1.12))
    alive = float(shares.get("topk", {}).get("alive", float("nan")))
    if inp.is_reference:
        ax.axhline(100 * REFERENCE_ALIVE_SHARE, ls="--", color="black", lw=1.2,
                   label="paper: alive ≈ 60 % (LLaVA-1.5-7B)")
        ref_txt = (f"The dashed line is the paper's reference: ≈ 60 % of LLaVA-1.5-7B's visual tokens are alive; "
                   f"this run measures **{_pct(alive)}** (top-{k} rule).")
    else:
        ax.axhline(100 * alive, ls=":", color="#009E73", lw=1.2, label=f"alive share {_pct(alive)}")
        ref_txt = (f"Alive share (top-{k} rule): **{_pct(alive)}**. The paper's ≈ 60 % refers to LLaVA-1.5-7B and is "
                   "not drawn for this model (set `is_reference_model` to compare).")
    ax.legend(loc="upper left", fontsize=8)
    n_tok = s.get("n_tokens", len(inp.categories) if inp.categories is not None else "?")
    ax.set_title(f"{inp.model} × {inp.dataset}: {n_tok} "
                 f"visual tokens of {s.get('n_images', '?')} images", fontsize=10)
    out: list = [*_mode_header(inp), md(ref_txt), fig]

    counts = s.get("counts") or {}
    tab = pd.DataFrame({
        "category": list(LABELS),
        "tokens (top-1 rule)": [counts.get("top1", {}).get(lab) for lab in LABELS],
        "share (top-1 rule)": [shares.get("top1", {}).get(lab) for lab in LABELS],
        f"tokens (top-{k} rule)": [counts.get("topk", {}).get(lab) for lab in LABELS],
        f"share (top-{k} rule)": [shares.get("topk", {}).get(lab) for lab in LABELS],
    })
    out.append(table(tab, percent=["share (top-1 rule)", f"share (top-{k} rule)"]))
    per = s.get("alive_share_per_image") or {}
    if per.get("mean") is not None:
        out.append(md(f"Alive share per image: mean {_pct(per.get('mean'))}, sd {_pct(per.get('sd'))}, "
                      f"range {_pct(per.get('min'))} – {_pct(per.get('max'))}."))
    ov = s.get("overlap") or {}
    if ov.get("counts"):
        g = ov.get("groups", list(GROUPS))
        m = pd.DataFrame(ov["counts"], index=[f"in {x}" for x in g], columns=[f"in {x}" for x in g])
        out.append(md(f"**Group membership overlap** (tokens with an anchor of both groups in their top-{k}; "
                      "the diagonal is each group's raw membership). Labels resolve overlaps in the order "
                      "vit_sink, llm_sink, dead."))
        out.append(table(m.reset_index(names=""), precision=0))
        comb = ov.get("combinations") or {}
        if comb:
            out.append(md("Membership combinations: " + ", ".join(f"`{kk}` {vv}" for kk, vv in comb.items())))
    ex = s.get("excluded_ids")
    if ex is not None:
        strs = s.get("excluded_strings") or []
        out.append(md(f"{len(ex)} vocabulary rows were excluded from the neighbour candidates (special/added "
                      f"tokens{': ' + ', '.join('`' + _tok(x) + '`' for x in strs[:12]) if strs else ''}"
                      f"{' …' if len(strs) > 12 else ''})."))
    return out


def _mode_header(inp: ReportInputs) -> list:
    """Which mode produced the shares; for the paper's model, whether they are comparable
    with its ≈ 60 % (the reference searched every row and padded images to a square)."""
    m = run_mode(inp)
    mode = m["mode"] or "ours (not recorded)"
    what = []
    if m["n_excluded"] is not None:
        what.append("every vocabulary row searched" if m["n_excluded"] == 0
                    else f"{m['n_excluded']} special/added vocabulary rows excluded")
    if m["preprocess"]:
        what.append("images padded to a square" if m["preprocess"] == "pad_square"
                    else "images as the processor prepares them (native)")
    if m["similarity_dtype"]:
        what.append(f"similarity in {m['similarity_dtype']}")
    out: list = [md(f"Produced in **{mode}** mode ({MODE_TEXT.get(m['mode'], MODE_TEXT['ours'])}): "
                    + ", ".join(what) + ".")]
    c = m["check"]
    if c:
        out.append(md(f"Similarity in float16 changes {_pct(c['label_flip_share'])} of the labels (top-k rule; "
                      f"{_pct(c['label_top1_flip_share'])} top-1 rule) and {_pct(c['topk_ids_change_share'])} of "
                      "the top-k neighbour lists against float32 (the labels below are float16's)."))
    why = []
    if inp.is_reference and not m["reference_exact"]:
        if m["n_excluded"]:
            why.append(f"{m['n_excluded']} special/added rows were excluded from the search (the paper's code "
                       "searched every row)")
        if m["preprocess"] not in ("pad_square", None):
            why.append("images were not padded to a square (llava-hf's processor center-crops; the paper's code "
                       "padded with the mean colour, which on a 4:3 image makes a quarter of the 576 tokens padding)")
    if why:
        out.append(callout("These shares are **not directly comparable** with the paper's ≈ 60 %: " + "; ".join(why)
                           + ". Set `mode: reference` on this model to reproduce the paper's setting.", kind="note"))
    return out


# --------------------------------------------------------------------------- maps
def _sample_image_ids(inp: ReportInputs, n: int) -> list[str]:
    ids = list(dict.fromkeys(inp.categories["image_id"].astype(str))) if inp.categories is not None else []
    if not ids or n <= 0:
        return []
    if len(ids) <= n:
        return ids
    pos = np.linspace(0, len(ids) - 1, n).round().astype(int)
    return [ids[i] for i in dict.fromkeys(pos.tolist())]


def _image_file(inp: ReportInputs, image_id: str) -> Path | None:
    if inp.dataset_meta is None or inp.dataset_dir is None:
        return None
    for im in inp.dataset_meta.get("images", []):
        if str(im.get("image_id")) == str(image_id):
            p = inp.dataset_dir / im["file"]
            return p if p.exists() else None
    return None


def _open_as_seen(inp: ReportInputs, path: Path):
    """The image file as the model saw its extent: padded to a square (mid grey) when the
    states were extracted with ``preprocess: pad_square``, so the patch grid lands right."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if run_mode(inp)["preprocess"] == "pad_square":
        from embedlens.models.preprocess import pad_to_square

        img = pad_to_square(img, (127, 127, 127))
    return img


def _label_grid(sub: pd.DataFrame) -> tuple[np.ndarray, int, int]:
    """(R, C) array of label indices (-1 = no token) for one image's tokens."""
    R = int(sub["grid_rows"].max())
    C = int(sub["grid_cols"].max())
    grid = np.full((max(R, 1), max(C, 1)), -1, dtype=int)
    ok = (sub["patch_row"] >= 0) & (sub["patch_col"] >= 0) & (sub["patch_row"] < R) & (sub["patch_col"] < C)
    first = sub[ok].drop_duplicates(["patch_row", "patch_col"], keep="first")
    idx = first["label"].map({lab: i for i, lab in enumerate(LABELS)}).fillna(-1).astype(int).to_numpy()
    grid[first["patch_row"].to_numpy(int), first["patch_col"].to_numpy(int)] = idx
    return grid, R, C


def section_category_maps(inp: ReportInputs, n_images: int = 4) -> list:
    """Section "Category maps": each token's category over its patch for ``n_images``
    sample images, evenly spaced over the data set."""
    if inp.categories is None:
        return [callout(f"category maps: {inp.why('categorize')}")]
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Patch

    ids = _sample_image_ids(inp, n_images)
    if not ids:
        return [callout("category maps: the categorize table has no tokens")]
    ncols = min(4, len(ids))
    nrows = math.ceil(len(ids) / ncols)
    fig, axes = _figure(3.1 * ncols + 0.4, 3.2 * nrows + 0.6, nrows, ncols)
    cats = inp.categories
    colours = np.array([to_rgba(LABEL_COLOURS[lab], 0.5) for lab in LABELS] + [(0, 0, 0, 0)])
    notes = []
    for ax, iid in zip(axes.ravel(), ids):
        sub = cats[cats["image_id"].astype(str) == iid]
        grid, R, C = _label_grid(sub)
        f = _image_file(inp, iid)
        if f is not None:
            img = _open_as_seen(inp, f)
            W, H = img.size
            ax.imshow(np.asarray(img), extent=(0, W, H, 0))
        else:
            W, H = C, R
            notes.append(iid)
        ax.imshow(colours[grid], extent=(0, W, H, 0), interpolation="nearest")
        if max(R, C) <= 48:
            for r in range(R + 1):
                ax.axhline(r * H / R, color="white", lw=0.3, alpha=0.7)
            for c in range(C + 1):
                ax.axvline(c * W / C, color="white", lw=0.3, alpha=0.7)
        alive = float((sub["label"] == "alive").mean()) if len(sub) else float("nan")
        ax.set_title(f"{iid}\nalive {_pct(alive)}", fontsize=9)
        ax.set_xlabel(f"x (pixels; {C} patch columns)", fontsize=8)
        ax.set_ylabel(f"y (pixels; {R} patch rows)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(False)
    for ax in axes.ravel()[len(ids):]:
        ax.set_visible(False)
    fig.legend(handles=[Patch(color=LABEL_COLOURS[lab], label=lab) for lab in LABELS], loc="outside right upper",
               ncol=1, fontsize=9, title="category\n(top-k rule)", title_fontsize=9)
    out = [md(f"Each visual token's category drawn over its patch for {len(ids)} sample image(s) (evenly spaced "
              "over the data set). The patch grid is stretched over the whole image (padded to a square first when "
              "the states were extracted with `preprocess: pad_square`): a processor that crops (e.g. CLIP's "
              "centre crop) shifts the true patch positions for non-square images."), fig]
    if notes:
        out.append(callout(f"image files not found for {', '.join(notes)} ({inp.why('dataset')}): "
                           "the grid is drawn without the image"))
    n_nopatch = int(((cats["patch_row"] < 0) | (cats["patch_col"] < 0)).sum())
    if n_nopatch:
        out.append(md(f"{n_nopatch} visual tokens have no patch position (e.g. row separators) and are not drawn."))
    return out
