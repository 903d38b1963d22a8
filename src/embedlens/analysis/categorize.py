"""EmbedLens categorization of visual tokens at the input level (methods.md §1).

The reference rule, reproduced exactly when anchors are given:

1. ``h[0]`` (the decoder input, before any norm) at every visual position;
2. float32 cosine similarity with every row of the input-embedding matrix E, streamed over
   blocks of vocabulary rows (never a tokens × V matrix); rows the tokenizer marks as
   added/special are excluded unless configured otherwise (recorded);
3. the top-k neighbour ids and similarities (k = 3);
4. membership of group g (``vit_sink``, ``llm_sink``, ``dead``) = any anchor id of g among
   the top-k; label = first matching group in that order, else ``alive``.

Without configured anchors they are discovered (:mod:`.anchors`, **[ours]**): the workflow
discovers them once per model over all its data sets (:mod:`.model_anchors`, the
``anchors`` step) and passes them in as ``model_anchors``; stand-alone, ``categorize``
discovers them on its own data set.

Output directory (see docs/architecture.md, "Analysis outputs"):
``categories.parquet`` (one row per visual token), ``nearest_words.parquet`` (top-1/top-k
neighbour histogram), ``anchors.json`` (anchors used + discovery evidence) and
``summary.json`` (shares, overlap matrix, settings, notes, ``methods_notes``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from embedlens.runtime import image_blocks, progress_bar
from embedlens.store import (
    final_norm_flag,
    layer_values,
    num_layers_of,
    token_index,
    valid_mask,
)

from . import anchors as _anchors
from .labels import PatchLabels, grid_unknown_tokens
from .outputs import note, step_reader, step_summary, write_json, write_parquet
from .vocab import VocabIndex, excluded_ids, load_vocab

GROUPS = ("vit_sink", "llm_sink", "dead")
LABELS = GROUPS + ("alive",)

#: Reference anchors (methods.md §1.5) for LLaVA-1.5-7B (Vicuna / Llama-2 vocabulary).
REFERENCE_ANCHORS: dict[str, dict[str, list[int]]] = {
    "llava-1.5-7b": {"vit_sink": [1141], "llm_sink": [26673], "dead": [30296]},
}
#: Alive share the paper reports for LLaVA-1.5-7B (the report's reference line).
REFERENCE_ALIVE_SHARE = 0.60

OUTPUT_FILES = {
    "categories": "categories.parquet",
    "nearest_words": "nearest_words.parquet",
    "anchors": "anchors.json",
    "summary": "summary.json",
}


# --------------------------------------------------------------------------- neighbours
def _vision_mapping(hidden, vision_layer, vision_token_offset, n_valid: np.ndarray):
    """Which vision token feeds each LLM visual token 1:1.

    Returns (``vmap`` (image, token) int: vision token index, -1 = none / not 1:1; the vision
    layer used; a note). With the store's ``vision_to_llm (image, vision_token)`` map
    (``vision_token_offset="auto"``), LLM token t gets vision token j when j is the only
    vision token feeding t (several → merged/pooled patches → -1). Without the map, or with
    an explicit integer offset: t ↔ offset + t ("auto": 0 when the counts match, 1 when the
    vision side has one extra leading CLS token).
    """
    n_img, n_tok = hidden.sizes["image"], hidden.sizes["token"]
    vmap = np.full((n_img, n_tok), -1, dtype=np.int64)
    if "vision_hidden" not in hidden.variables:
        return vmap, None, "no vision layers extracted: norm_vision is NaN"
    vl_values = list(np.asarray(hidden["vision_layer"].values)) if "vision_layer" in hidden.coords else [None]
    vl = vl_values[-1] if vision_layer is None else vision_layer
    vt_dim = [d for d in hidden["vision_hidden"].dims if d not in ("image", "vision_layer", "vision_dim")][0]
    n_v_all = hidden.sizes[vt_dim]
    n_v = (np.asarray(hidden["n_vision_tokens"].values, dtype=np.int64)
           if "n_vision_tokens" in hidden.variables else np.full(n_img, n_v_all))
    if vision_token_offset == "auto" and "vision_to_llm" in hidden.variables:
        v2l = np.asarray(hidden["vision_to_llm"].values, dtype=np.int64)
        for i in range(n_img):
            j = np.flatnonzero(v2l[i] >= 0)
            t = v2l[i, j]
            t_ok = (t < n_tok)
            j, t = j[t_ok], t[t_ok]
            counts = np.bincount(t, minlength=n_tok)
            one = counts[t] == 1
            vmap[i, t[one]] = j[one]
        how = "the store's vision_to_llm map (a token fed by several vision tokens has no 1:1 partner)"
    else:
        for i in range(n_img):
            if vision_token_offset == "auto":
                off = 0 if n_v[i] == n_valid[i] else (1 if n_v[i] == n_valid[i] + 1 else None)
            else:
                off = int(vision_token_offset)
                off = off if off + n_valid[i] <= n_v[i] else None
            if off is not None:
                vmap[i, : n_valid[i]] = off + np.arange(n_valid[i])
        how = (f"vision token offset + t ↔ LLM visual token t (offset {vision_token_offset}; auto = 0 when the "
               "counts match, 1 when the vision side has one extra leading CLS token)")
    valid = valid_mask(hidden)
    n_unmapped = int(((vmap < 0) & valid).sum())
    msg = f"vision output = vision_layer {vl}; mapping by {how}"
    if n_unmapped:
        msg += (f"; {n_unmapped} of {int(valid.sum())} visual tokens have no 1:1 vision token "
                "(merged/pooled patches, or counts that do not match): norm_vision is NaN there")
    return vmap, vl, msg


def compute_h0_neighbours(
    hidden,
    vocab,
    *,
    k: int = 3,
    exclude_special: bool = True,
    exclude_ids: Sequence[int] = (),
    include_ids: Sequence[int] = (),
    norm_layers: Sequence[int] | None = None,
    vision_layer: Any = None,
    vision_token_offset: int | str = "auto",
    device: str = "auto",
    vocab_block: int = 8192,
    query_block: int = 4096,
    max_block_bytes: int = 256 * 2**20,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per visual token: top-k EmbedLens neighbours of ``h[0]`` and the norms.

    Parameters
    ----------
    hidden : ``xarray.Dataset`` in the hidden-state store format (``open_hidden``);
        must contain layer 0 of ``llm_hidden``.
    vocab : ``vocab.zarr`` path / dataset or :class:`~.vocab.Vocab`.
    k : neighbours kept per token (reference: 3).
    exclude_special, exclude_ids, include_ids : candidate rows (see ``excluded_ids``).
    norm_layers : layers whose ``h[l]`` norm is recorded (default: every extracted layer).
    vision_layer : vision layer whose output norm is ``norm_vision`` (default: the last
        extracted one).
    vision_token_offset : vision token index of LLM visual token 0; ``"auto"`` = 0 when
        the counts match, 1 when the vision side has one extra (CLS); else NaN + note.
    device : ``"auto"`` → CUDA when available.
    vocab_block, query_block : streaming block sizes (memory ≈ query_block × vocab_block × 4 B).
    max_block_bytes : bound on the hidden states read per image block.

    Returns
    -------
    table : DataFrame, one row per valid visual token: ``image``, ``image_id``, ``token``,
        ``patch_row``, ``patch_col``, ``grid_rows``, ``grid_cols``, ``top{r}_id``,
        ``top{r}_sim`` (r = 1..k), ``norm_vision``, ``norm_h{l}``.
    info : excluded ids, vision mapping note, layers, timing.
    """
    t0 = time.perf_counter()
    voc = load_vocab(vocab)
    layers = layer_values(hidden)
    if 0 not in layers:
        raise ValueError("categorize needs layer 0 (h[0], the decoder input) in llm_hidden; "
                         f"the store has layers {layers}")
    if norm_layers is None:
        norm_layers = layers
    norm_layers = [int(l) for l in norm_layers]
    missing = sorted(set(norm_layers) - set(layers))
    if missing:
        raise ValueError(f"norm_layers {missing} not in the store (layers {layers})")
    read_layers = sorted(set(norm_layers) | {0})
    excl = excluded_ids(voc, exclude_special=exclude_special, exclude_ids=exclude_ids,
                        include_ids=include_ids)
    index = VocabIndex(voc.embedding, exclude=excl, normalize=True, device=device,
                       vocab_block=vocab_block)
    if index.dim != hidden.sizes["dim"]:
        raise ValueError(f"embedding dim {index.dim} != hidden dim {hidden.sizes['dim']}")
    table = token_index(hidden)
    valid = valid_mask(hidden)
    n_valid = valid.sum(axis=1)
    vmap, vl, vnote = _vision_mapping(hidden, vision_layer, vision_token_offset, n_valid)

    llm = hidden["llm_hidden"]
    itemsize = np.dtype(llm.dtype).itemsize
    per_image = len(read_layers) * hidden.sizes["token"] * hidden.sizes["dim"] * itemsize
    n_img = hidden.sizes["image"]
    n_tok = len(table)
    ids = np.empty((n_tok, k), dtype=np.int64)
    sims = np.empty((n_tok, k), dtype=np.float32)
    norms = {l: np.empty(n_tok, dtype=np.float32) for l in norm_layers}
    norm_vision = np.full(n_tok, np.nan, dtype=np.float32)
    l0 = read_layers.index(0)
    pos = 0
    blocks = list(image_blocks(n_img, per_image, max_block_bytes))
    bar = progress_bar(total=n_tok, enabled=progress, desc="categorize: h[0] neighbours", unit="tok",
                       unit_scale=True)
    for i0, i1 in blocks:
        arr = np.asarray(llm.isel(image=slice(i0, i1)).sel(layer=read_layers).transpose(
            "image", "layer", "token", "dim").values)
        m = valid[i0:i1]
        cnt = int(m.sum())
        sl = slice(pos, pos + cnt)
        h0 = arr[:, l0][m]  # (cnt, d), stored dtype
        ids[sl], sims[sl] = index.search(h0, k, query_block=query_block, on_block=bar.update)
        for j, l in enumerate(read_layers):
            if l in norms:
                x = torch.from_numpy(np.ascontiguousarray(arr[:, j][m])).float()
                norms[l][sl] = torch.linalg.vector_norm(x, dim=-1).numpy()
        vm = vmap[i0:i1]
        if vl is not None and (vm[m] >= 0).any():
            vis = hidden["vision_hidden"].isel(image=slice(i0, i1)).sel(vision_layer=vl)
            vis = np.asarray(vis.values)  # (b, n_v, vd)
            vnorm = torch.linalg.vector_norm(torch.from_numpy(vis).float(), dim=-1).numpy()
            bi, ti = np.nonzero(m)  # same order as the token table rows of this block
            j = vm[bi, ti]
            ok = j >= 0
            out_v = np.full(cnt, np.nan, dtype=np.float32)
            out_v[ok] = vnorm[bi[ok], j[ok]]
            norm_vision[sl] = out_v
        pos += cnt
        del arr
    bar.close()
    assert pos == n_tok
    for r in range(k):
        table[f"top{r + 1}_id"] = ids[:, r]
        table[f"top{r + 1}_sim"] = sims[:, r]
    table["norm_vision"] = norm_vision
    for l in norm_layers:
        table[f"norm_h{l}"] = norms[l]
    info = {
        "k": int(k),
        "n_tokens": int(n_tok),
        "n_images": int(n_img),
        "vocab_size": voc.size,
        "excluded_ids": excl.tolist(),
        "excluded_strings": [voc.strings[i] for i in excl[:200]],
        "exclude_special": bool(exclude_special),
        "norm_layers": norm_layers,
        "vision_layer": None if vl is None else (vl.item() if hasattr(vl, "item") else vl),
        "vision_norm_note": vnote,
        "device": str(index.device),
        "seconds": time.perf_counter() - t0,
    }
    return table, info


# --------------------------------------------------------------------------- the rule
def _topk_columns(table: pd.DataFrame, k: int | None) -> list[str]:
    cols = []
    r = 1
    while f"top{r}_id" in table.columns and (k is None or r <= k):
        cols.append(f"top{r}_id")
        r += 1
    if not cols or (k is not None and len(cols) < k):
        raise ValueError(f"table has {len(cols)} top-k id columns, rule needs k={k}")
    return cols


def apply_rule(table: pd.DataFrame, anchors: Mapping[str, Sequence[int]], *, k: int | None = None,
               inplace: bool = False) -> pd.DataFrame:
    """Apply the reference rule (methods.md §1.4) to a table with ``top{r}_id`` columns.

    Adds ``in_{g}`` (any anchor of g among the top-k), ``in_{g}_top1`` (anchor of g is the
    top-1), ``label`` (first matching group in the order vit_sink, llm_sink, dead, else
    alive) and ``label_top1`` (same with top-1 only). ``k`` = ranks used (default all
    ``top{r}_id`` columns). Returns a new DataFrame (``inplace``: ``table`` itself).
    """
    unknown = set(anchors) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown anchor groups {sorted(unknown)}; expected {GROUPS}")
    ids = table[_topk_columns(table, k)].to_numpy(np.int64)
    out = table if inplace else table.copy()
    flags, flags1 = [], []
    for g in GROUPS:
        a = np.asarray(list(anchors.get(g, [])), dtype=np.int64)
        f = np.isin(ids, a).any(axis=1) if a.size else np.zeros(len(ids), dtype=bool)
        f1 = np.isin(ids[:, 0], a) if a.size else np.zeros(len(ids), dtype=bool)
        out[f"in_{g}"] = f
        out[f"in_{g}_top1"] = f1
        flags.append(f)
        flags1.append(f1)
    out["label"] = np.select(flags, list(GROUPS), default="alive") if len(ids) else np.array([], dtype=object)
    out["label_top1"] = np.select(flags1, list(GROUPS), default="alive") if len(ids) else np.array([], dtype=object)
    return out


# --------------------------------------------------------------------------- summaries
def summarize(table: pd.DataFrame) -> dict[str, Any]:
    """Shares (top-k rule and top-1 rule), raw membership shares, overlap matrix,
    membership combinations, per-image alive share and median norms per label, from a
    table that went through :func:`apply_rule`."""
    n = len(table)

    def frac(x) -> float:
        return float(x) / n if n else float("nan")

    shares = {
        "topk": {lab: frac((table["label"] == lab).sum()) for lab in LABELS},
        "top1": {lab: frac((table["label_top1"] == lab).sum()) for lab in LABELS},
    }
    counts = {
        "topk": {lab: int((table["label"] == lab).sum()) for lab in LABELS},
        "top1": {lab: int((table["label_top1"] == lab).sum()) for lab in LABELS},
    }
    membership = {
        "topk": {g: frac(table[f"in_{g}"].sum()) for g in GROUPS},
        "top1": {g: frac(table[f"in_{g}_top1"].sum()) for g in GROUPS},
    }
    F = table[[f"in_{g}" for g in GROUPS]].to_numpy(bool)
    ov = (F.T.astype(np.int64) @ F.astype(np.int64)).tolist()
    combos: dict[str, int] = {}
    if n:
        rows, cnt = np.unique(F, axis=0, return_counts=True)
        combos = {"+".join(g for g, f in zip(GROUPS, row) if f) or "none": int(c) for row, c in zip(rows, cnt)}
    per_img = table.assign(_alive=table["label"] == "alive").groupby("image_id")["_alive"].mean()
    norm_cols = [c for c in table.columns if c.startswith("norm_")]
    norms_by_label = {
        lab: {c: float(np.nanmedian(g[c])) if np.isfinite(g[c]).any() else None for c in norm_cols}
        for lab, g in table.groupby("label")
    }
    return {
        "n_tokens": int(n),
        "n_images": int(table["image_id"].nunique()),
        "shares": shares,
        "counts": counts,
        "membership": membership,
        "overlap": {"groups": list(GROUPS), "counts": ov,
                    "shares": [[frac(c) for c in row] for row in ov],
                    "combinations": combos},
        "alive_share_per_image": {
            "mean": float(per_img.mean()) if len(per_img) else None,
            "sd": float(per_img.std(ddof=0)) if len(per_img) else None,
            "min": float(per_img.min()) if len(per_img) else None,
            "max": float(per_img.max()) if len(per_img) else None,
        },
        "median_norms_by_label": norms_by_label,
    }


def nearest_word_histogram(table: pd.DataFrame, strings: Sequence[str],
                           anchors: Mapping[str, Sequence[int]] | None = None) -> pd.DataFrame:
    """One row per vocabulary id that is a top-k neighbour of at least one token:
    ``token_id``, ``token_string``, ``n_top1``, ``share_top1``, ``n_topk`` (tokens with the
    id anywhere in their top-k), ``share_topk``, ``n_images_top1``, ``anchor_group``.
    Sorted by ``n_top1`` then ``n_topk`` descending."""
    n = len(table)
    cols = _topk_columns(table, None)
    top1 = table["top1_id"].to_numpy(np.int64)
    ids_all = table[cols].to_numpy(np.int64)
    u1, c1 = np.unique(top1, return_counts=True)
    # a token counts once per id even if an id repeats (it cannot: top-k ids are distinct)
    uk, ck = np.unique(ids_all[ids_all >= 0], return_counts=True)
    n_img = table.assign(_t=top1).groupby("_t")["image_id"].nunique()
    df = pd.DataFrame({"token_id": uk, "n_topk": ck})
    df["n_top1"] = pd.Series(dict(zip(u1, c1))).reindex(uk).fillna(0).astype(np.int64).to_numpy()
    df["n_images_top1"] = n_img.reindex(uk).fillna(0).astype(np.int64).to_numpy()
    df["share_top1"] = df["n_top1"] / max(n, 1)
    df["share_topk"] = df["n_topk"] / max(n, 1)
    df["token_string"] = [strings[i] for i in uk]
    grp = {}
    for g in GROUPS:
        for a in (anchors or {}).get(g, []):
            grp.setdefault(int(a), g)
    df["anchor_group"] = [grp.get(int(i)) for i in uk]
    df = df.sort_values(["n_top1", "n_topk", "token_id"], ascending=[False, False, True])
    return df[["token_id", "token_string", "n_top1", "share_top1", "n_topk", "share_topk",
               "n_images_top1", "anchor_group"]].reset_index(drop=True)


def add_neighbour_strings(table: pd.DataFrame, strings: Sequence[str], *, inplace: bool = False) -> pd.DataFrame:
    """Add ``top{r}_token`` string columns (objects shared with the vocabulary list)."""
    arr = np.asarray(list(strings) + [""], dtype=object)  # -1 → ""
    out = table if inplace else table.copy()
    for c in _topk_columns(table, None):
        out[c.replace("_id", "_token")] = arr[table[c].to_numpy(np.int64)]
    return out


_COLUMN_ORDER_HEAD = ["image_id", "image", "token", "patch_row", "patch_col", "grid_rows", "grid_cols",
                      "label", "label_top1"]


def _order_columns(table: pd.DataFrame, k: int) -> pd.DataFrame:
    head = [c for c in _COLUMN_ORDER_HEAD if c in table.columns]
    flags = [c for g in GROUPS for c in (f"in_{g}", f"in_{g}_top1") if c in table.columns]
    nn = [c for r in range(1, k + 1) for c in (f"top{r}_id", f"top{r}_sim", f"top{r}_token")
          if c in table.columns]
    first = head + flags + nn
    return table[first + [c for c in table.columns if c not in first]]


def categorize(
    hidden,
    vocab,
    out_dir: str | Path,
    *,
    anchors: Mapping[str, Sequence[int]] | None = None,
    discover_anchors: bool = True,
    model_anchors: Mapping[str, Any] | None = None,
    labels: PatchLabels | None = None,
    top_k: int = 3,
    exclude_special: bool = True,
    exclude_ids: Sequence[int] = (),
    include_ids: Sequence[int] = (),
    norm_layers: Sequence[int] | None = None,
    vision_layer: Any = None,
    vision_token_offset: int | str = "auto",
    num_layers: int | None = None,
    discovery: Mapping[str, Any] | None = None,
    device: str = "auto",
    vocab_block: int = 8192,
    query_block: int = 4096,
    max_block_bytes: int = 256 * 2**20,
    model: str | None = None,
    dataset: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Categorize every visual token (sink / dead / alive) and write the outputs.

    Parameters (config knobs)
    -------------------------
    hidden, vocab : the hidden-state store (``open_hidden``) and the vocabulary store.
    out_dir : directory for ``categories.parquet``, ``nearest_words.parquet``,
        ``anchors.json``, ``summary.json`` (created; files written atomically).
    anchors : configured anchor ids ``{group: [ids]}``; groups not given are discovered from
        the data (**[ours]**, :func:`.anchors.discover_anchors`) when ``discover_anchors``, else empty.
    discover_anchors : discover the anchors of groups ``anchors`` does not give.
    model_anchors : the model's anchors found once over all its data sets (the ``anchors.json``
        document of :func:`.model_anchors.discover_model_anchors`); when given, no discovery
        runs here and groups ``anchors`` does not give take the document's ids.
    labels : patch labels of the data set (``read_patch_labels``), used only by anchor
        discovery (its content test); optional.
    top_k : neighbours kept per token and used by the rule (reference k = 3).
    exclude_special / exclude_ids / include_ids : vocabulary rows removed from the candidates.
    norm_layers, vision_layer, vision_token_offset : see :func:`compute_h0_neighbours`.
    num_layers : L, to place the early-layer window of LLM-sink discovery (default from
        store attrs, else the largest extracted layer).
    discovery : keyword overrides for :func:`.anchors.discover_anchors` thresholds.
    device, vocab_block, query_block, max_block_bytes : compute knobs.
    model, dataset : names recorded in the summary.

    Returns the summary dict (also written to ``summary.json``).

    Raises
    ------
    ValueError
        the store has no layer 0 (h[0]); ``norm_layers`` not stored; the embedding and
        hidden sizes differ; an unknown anchor group; anchor ids outside the vocabulary;
        ``model_anchors`` of another model or vocabulary.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    voc = load_vocab(vocab)
    table, info = compute_h0_neighbours(
        hidden, voc, k=top_k, exclude_special=exclude_special, exclude_ids=exclude_ids,
        include_ids=include_ids, norm_layers=norm_layers, vision_layer=vision_layer,
        vision_token_offset=vision_token_offset, device=device, vocab_block=vocab_block,
        query_block=query_block, max_block_bytes=max_block_bytes, progress=progress,
    )
    L = num_layers_of(hidden, num_layers)
    methods_notes = [
        note("reference", "embedlens_rule",
             f"Top-{top_k} cosine neighbours of h[0] among the rows of E (float32), "
             f"{len(info['excluded_ids'])} special/added rows excluded; label = first group "
             "among vit_sink, llm_sink, dead with an anchor id in the top-k, else alive."),
    ]
    configured = {g: [int(i) for i in ids] for g, ids in (anchors or {}).items()}
    unknown = set(configured) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown anchor groups {sorted(unknown)}; expected {GROUPS}")
    to_discover = [g for g in GROUPS if g not in configured] if discover_anchors and model_anchors is None else []
    if model_anchors is not None:
        used, sources, evidence = _anchors.from_model_document(model_anchors, configured, vocab_size=voc.size,
                                                               model=model)
        methods_notes += list(model_anchors.get("methods_notes") or [])
    elif to_discover:
        token_labels = labels.for_table(table) if labels is not None and not labels.empty else None
        used, evidence = _anchors.discover_anchors(
            table, token_labels=token_labels,
            label_words=labels.tasks if labels is not None else None,
            strings=voc.strings, num_layers=L, fixed=configured, **dict(discovery or {}),
        )
        methods_notes += evidence.pop("methods_notes")
    else:
        used = {g: configured.get(g, []) for g in GROUPS}
        evidence = {"status": "no discovery run (every group configured, or discovery off)"}
    if model_anchors is None:
        sources = {g: "configured" if g in configured else ("discovered" if g in to_discover else "none")
                   for g in GROUPS}
    source = (sources["vit_sink"] if len(set(sources.values())) == 1 else "mixed")
    scope = "model" if model_anchors is not None else "dataset"
    bad = [i for ids in used.values() for i in ids if not 0 <= i < voc.size]
    if bad:
        raise ValueError(f"anchor ids outside the vocabulary (size {voc.size}): {bad}")
    excluded_anchor = [i for ids in used.values() for i in ids if i in set(info["excluded_ids"])]
    grid_unknown, grid_notes = grid_unknown_tokens(table, "anchor discovery's label-word test")
    notes = [info["vision_norm_note"], *grid_notes]
    if excluded_anchor:
        notes.append(f"anchor ids {excluded_anchor} are excluded candidates and can never match")

    apply_rule(table, used, k=top_k, inplace=True)
    add_neighbour_strings(table, voc.strings, inplace=True)
    table = _order_columns(table, top_k)
    hist = nearest_word_histogram(table, voc.strings, used)
    summary = summarize(table)
    anchors_doc = {
        "source": source,
        "sources": sources,
        "scope": scope,
        "datasets": (list(model_anchors.get("datasets") or []) if model_anchors is not None
                     else [dataset] if dataset else []),
        "anchors": used,
        "anchor_strings": {g: [voc.strings[i] for i in ids] for g, ids in used.items()},
        "evidence": evidence,
    }
    summary.update({
        "model": model,
        "dataset": dataset,
        "anchors": anchors_doc["anchors"],
        "anchor_strings": anchors_doc["anchor_strings"],
        "anchor_source": source,
        "anchor_sources": sources,
        "anchor_scope": scope,
        "anchor_datasets": anchors_doc["datasets"],
        "settings": {
            "top_k": top_k, "exclude_special": exclude_special, "exclude_ids": list(map(int, exclude_ids)),
            "include_ids": list(map(int, include_ids)), "vision_token_offset": vision_token_offset,
            "discover_anchors": discover_anchors, "discovery": dict(discovery or {}), "num_layers": L,
            "model_anchors": model_anchors is not None,
        },
        "excluded_ids": info["excluded_ids"],
        "excluded_strings": info["excluded_strings"],
        "vocab_size": info["vocab_size"],
        "vision_layer": info["vision_layer"],
        "grid_unknown": grid_unknown,
        "norm_layers": info["norm_layers"],
        "final_norm_applied_to_last_layer": final_norm_flag(hidden),
        "reference": {"alive_share_llava15_7b": REFERENCE_ALIVE_SHARE},
        "top_nearest_words": hist.head(20).to_dict(orient="records"),
        "notes": notes,
        "methods_notes": methods_notes,
        "device": info["device"],
        "seconds": time.perf_counter() - t0,
        "files": dict(OUTPUT_FILES),
    })
    write_parquet(table, out / OUTPUT_FILES["categories"])
    write_parquet(hist, out / OUTPUT_FILES["nearest_words"])
    write_json(anchors_doc, out / OUTPUT_FILES["anchors"])
    summary = step_summary("categorize", summary)
    write_json(summary, out / OUTPUT_FILES["summary"])
    return summary


def read_categories(out_dir: str | Path) -> pd.DataFrame:
    """Read ``categories.parquet`` from a categorize output directory (or the file)."""
    p = Path(out_dir)
    if p.is_dir():
        p = p / OUTPUT_FILES["categories"]
    return pd.read_parquet(p)


read_categorize = step_reader("categorize")
