"""Report section "Nearest words by layer": the embedding-lens and logit-lens vocabulary
neighbours of a few sample patches at every stored layer."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..display import LABEL_COLOURS, _figure, _layer_name, _tok, callout, md, table
from ..inputs import ReportInputs
from .categories import _image_file, _open_as_seen, _sample_image_ids


def _pick_patches(inp: ReportInputs, lens_image_ids: list[str], n: int) -> list[dict]:
    """Sample patches: per sample image, one token per category present (alive first)."""
    cats = inp.categories
    picks: list[dict] = []
    for iid in lens_image_ids:
        sub = cats[(cats["image_id"].astype(str) == iid) & (cats["patch_row"] >= 0)]
        if sub.empty:
            continue
        R, C = int(sub["grid_rows"].max()), int(sub["grid_cols"].max())
        for lab in ("alive", "dead", "vit_sink", "llm_sink"):
            g = sub[sub["label"] == lab]
            if g.empty:
                continue
            # the token nearest the image centre: a stable, content-bearing choice
            d = (g["patch_row"] + 0.5 - R / 2) ** 2 + (g["patch_col"] + 0.5 - C / 2) ** 2
            r = g.loc[d.idxmin()]
            picks.append({"image_id": iid, "token": int(r["token"]), "row": int(r["patch_row"]),
                          "col": int(r["patch_col"]), "label": lab, "R": R, "C": C})
            if len(picks) >= n:
                return picks
    return picks


def section_nearest_words(inp: ReportInputs, n_patches: int = 4, k: int = 3, n_images: int = 4) -> list:
    """Section "Nearest words by layer": top-``k`` embedding-lens and logit-lens words of
    ``n_patches`` sample patches (one per category, from the first ``n_images`` sample
    images) at every stored layer, and where those patches are."""
    if inp.lens is None:
        return [callout(f"nearest words by layer: {inp.why('lens')}")]
    if inp.categories is None:
        return [callout(f"nearest words by layer: the patches are chosen by category and {inp.why('categorize')}")]
    if inp.vocab_strings is None:
        return [callout(f"nearest words by layer: token strings come from the vocabulary store and {inp.why('vocab')}")]
    lens = inp.lens
    lens_ids = [str(x) for x in lens["image_id"].values]
    first = [i for i in _sample_image_ids(inp, n_images) if i in lens_ids]
    order = first + [i for i in lens_ids if i not in first]
    picks = _pick_patches(inp, order, n_patches)
    if not picks:
        return [callout("nearest words by layer: no categorized patch of the lens' images")]
    strings = inp.vocab_texts if inp.vocab_texts is not None else inp.vocab_strings  # decoded for reading
    layers = [int(x) for x in lens["layer"].values]
    kk = min(k, int(lens.sizes.get("k", k)))
    out: list = [md(f"Top-{kk} vocabulary neighbours of {len(picks)} sample patch(es) at every stored layer, by the "
                    "**embedding lens** (cosine with the input embeddings E) and the **logit lens** "
                    "(LM head after the final norm). Column = patch `P#` (image, row, column, category).")]
    cols = [f"P{j + 1} {p['image_id']} ({p['row']},{p['col']}) {p['label']}" for j, p in enumerate(picks)]

    def words(var: str) -> pd.DataFrame:
        data = {}
        for col, p in zip(cols, picks):
            i = lens_ids.index(p["image_id"])
            ids = np.asarray(lens[var].isel(image=i, token=p["token"]).values)  # (layer, k)
            data[col] = [", ".join(_tok(strings[t]) if 0 <= t < len(strings) else "?" for t in row[:kk] if t >= 0)
                         for row in ids]
        return pd.DataFrame(data, index=[_layer_name(l) for l in layers]).reset_index(names="layer")

    out.append(md("**Embedding lens** (cosine with E):"))
    out.append(table(words("emb_id")))
    if "logit_id" in lens.variables:
        out.append(md("**Logit lens** (LM head of the final-normed state; the last HF hidden state is already "
                      "normed):"))
        out.append(table(words("logit_id")))
    else:
        out.append(callout("logit lens: not computed (no LM head was given to the lens step)"))
    # where the patches are
    from matplotlib.patches import Rectangle

    imgs = list(dict.fromkeys(p["image_id"] for p in picks))
    fig, axes = _figure(3.2 * len(imgs) + 0.3, 3.4, 1, len(imgs))
    for ax, iid in zip(axes.ravel(), imgs):
        f = _image_file(inp, iid)
        sel = [(j, p) for j, p in enumerate(picks) if p["image_id"] == iid]
        R, C = sel[0][1]["R"], sel[0][1]["C"]
        if f is not None:
            img = _open_as_seen(inp, f)
            W, H = img.size
            ax.imshow(np.asarray(img), extent=(0, W, H, 0))
        else:
            W, H = C, R
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
        for j, p in sel:
            x0, y0 = p["col"] * W / C, p["row"] * H / R
            ax.add_patch(Rectangle((x0, y0), W / C, H / R, fill=False, lw=2, ec=LABEL_COLOURS[p["label"]]))
            ax.text(x0 + W / C, y0, f"P{j + 1}", color="white", fontsize=9, va="bottom", ha="left",
                    bbox={"facecolor": LABEL_COLOURS[p["label"]], "pad": 1, "lw": 0})
        ax.set_title(iid, fontsize=9)
        ax.set_xlabel("x (pixels)", fontsize=8)
        ax.set_ylabel("y (pixels)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(False)
    out.append(md("Where the sample patches are (box colour = category):"))
    out.append(fig)
    for n in (inp.lens_info or {}).get("notes", []) or []:
        out.append(md(f"Lens note: {n}"))
    return out
