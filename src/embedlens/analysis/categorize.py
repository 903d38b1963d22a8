"""EmbedLens categorization of visual tokens at the input level (docs/methods.md §1).

The reference rule, reproduced exactly when anchors are given:

1. ``h[0]`` (the decoder input, before any norm) at every visual position;
2. float32 cosine similarity with every row of the input-embedding matrix E, streamed over
   blocks of vocabulary rows (never a tokens × V matrix); rows the tokenizer marks as
   added/special are excluded unless configured otherwise (recorded; the released reference
   code searches every row: ``exclude_special=False``, set by ``mode: reference``);
   ``similarity_dtype="float16"`` computes it in float16 as code running a float16 model
   does, and reports how many labels the float32 computation would change;
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

from embedlens.store import display_token, final_norm_flag, num_layers_of

from . import anchors as _anchors
from .labels import PatchLabels, grid_unknown_tokens
from .neighbours import _vision_mapping, compute_h0_neighbours  # noqa: F401 - this module's API
from .outputs import step_reader, step_summary, write_json, write_parquet
from .reference import check_mode, preprocess_note, rule_note, store_preprocess
from .vocab import load_vocab

GROUPS = ("vit_sink", "llm_sink", "dead")
LABELS = GROUPS + ("alive",)

#: Reference anchors (docs/methods.md §1.5) for LLaVA-1.5-7B (Vicuna / Llama-2 vocabulary).
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
    """Apply the reference rule (docs/methods.md §1.4) to a table with ``top{r}_id`` columns.

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


def _float32_labels(table: pd.DataFrame, ids32: np.ndarray, anchors: Mapping[str, Sequence[int]],
                    k: int) -> dict[str, Any]:
    """Add the float32 search's labels (``label_float32``, ``label_top1_float32``) to a
    float16 ``table`` that went through :func:`apply_rule`; returns the shares of tokens
    whose label (top-k rule, top-1 rule), top-k id list or top-1 id differ."""
    t32 = apply_rule(pd.DataFrame({f"top{r + 1}_id": ids32[:, r] for r in range(k)}), anchors, k=k)
    table["label_float32"] = t32["label"].to_numpy()
    table["label_top1_float32"] = t32["label_top1"].to_numpy()
    ids16 = table[_topk_columns(table, k)].to_numpy(np.int64)
    n = max(len(table), 1)
    return {"dtype": "float16", "compared_with": "float32", "n_tokens": int(len(table)),
            "label_flip_share": float((table["label"] != table["label_float32"]).sum() / n),
            "label_top1_flip_share": float((table["label_top1"] != table["label_top1_float32"]).sum() / n),
            "topk_ids_change_share": float((np.sort(ids16, axis=1) != np.sort(ids32, axis=1)).any(axis=1).sum() / n),
            "top1_change_share": float((ids16[:, 0] != ids32[:, 0]).sum() / n)}


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
                           anchors: Mapping[str, Sequence[int]] | None = None,
                           texts: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per vocabulary id that is a top-k neighbour of at least one token:
    ``token_id``, ``token_string`` (raw piece), ``token_text`` (decoded for reading:
    ``texts``, default ``display_token`` of the piece), ``n_top1``, ``share_top1``, ``n_topk`` (tokens with the
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
    df["token_text"] = [texts[i] for i in uk] if texts is not None else df["token_string"].map(display_token)
    grp = {}
    for g in GROUPS:
        for a in (anchors or {}).get(g, []):
            grp.setdefault(int(a), g)
    df["anchor_group"] = [grp.get(int(i)) for i in uk]
    df = df.sort_values(["n_top1", "n_topk", "token_id"], ascending=[False, False, True])
    return df[["token_id", "token_string", "token_text", "n_top1", "share_top1", "n_topk", "share_topk",
               "n_images_top1", "anchor_group"]].reset_index(drop=True)


def add_neighbour_strings(table: pd.DataFrame, strings: Sequence[str], *, texts: Sequence[str] | None = None,
                          inplace: bool = False) -> pd.DataFrame:
    """Add ``top{r}_token`` (the raw piece, "▁yellow") and ``top{r}_text`` (decoded for
    reading, "yellow": ``texts``, default ``display_token`` of the piece) columns."""
    arr = np.asarray(list(strings) + [""], dtype=object)  # -1 → ""
    txt = np.asarray(list(texts if texts is not None else map(display_token, strings)) + [""], dtype=object)
    out = table if inplace else table.copy()
    for c in _topk_columns(table, None):
        out[c.replace("_id", "_token")] = arr[table[c].to_numpy(np.int64)]
        out[c.replace("_id", "_text")] = txt[table[c].to_numpy(np.int64)]
    return out


_COLUMN_ORDER_HEAD = ["image_id", "image", "token", "patch_row", "patch_col", "grid_rows", "grid_cols",
                      "label", "label_top1"]


def _order_columns(table: pd.DataFrame, k: int) -> pd.DataFrame:
    head = [c for c in _COLUMN_ORDER_HEAD if c in table.columns]
    flags = [c for g in GROUPS for c in (f"in_{g}", f"in_{g}_top1") if c in table.columns]
    nn = [c for r in range(1, k + 1) for c in (f"top{r}_id", f"top{r}_sim", f"top{r}_token", f"top{r}_text")
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
    similarity_dtype: str = "float32",
    mode: str = "ours",
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
    exclude_special / exclude_ids / include_ids : vocabulary rows removed from the candidates
        (the reference searches every row: ``exclude_special=False``, no ``exclude_ids``).
    similarity_dtype : "float32" (docs/methods.md), or "float16" as a float16 model's code computes
        it: the labels are float16's, the table adds ``label_float32``/``label_top1_float32``
        and the summary's ``similarity_check`` the share of labels (and top-k ids) that differ.
    mode : the model's ``mode`` in config.yaml (``ours``, ``reference``, ``reference-float16``),
        recorded in ``settings``; the config turns it into the knobs above (a reference mode
        with special rows excluded is a ValueError).
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
        ``model_anchors`` of another model or vocabulary; an unknown ``mode`` or
        ``similarity_dtype``; a reference ``mode`` with ``exclude_special``.
    """
    t0 = time.perf_counter()
    if check_mode(mode) != "ours" and exclude_special:
        raise ValueError(f"categorize: mode {mode!r} searches every vocabulary row, as the reference code "
                         "does; exclude_special=True contradicts it (set exclude_special: false or mode: ours)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    voc = load_vocab(vocab)
    table, info = compute_h0_neighbours(
        hidden, voc, k=top_k, exclude_special=exclude_special, exclude_ids=exclude_ids,
        include_ids=include_ids, norm_layers=norm_layers, vision_layer=vision_layer,
        vision_token_offset=vision_token_offset, device=device, vocab_block=vocab_block,
        query_block=query_block, max_block_bytes=max_block_bytes, similarity_dtype=similarity_dtype,
        progress=progress,
    )
    ids32 = info.pop("ids_float32", None)
    L = num_layers_of(hidden, num_layers)
    preprocess = store_preprocess(hidden)
    methods_notes = [rule_note(top_k, info["excluded_ids"], voc.strings, similarity_dtype),
                     preprocess_note(preprocess)]
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
    check = None
    if ids32 is not None:
        check = _float32_labels(table, ids32, used, top_k)
        notes.append(f"similarity in float16: {check['label_flip_share']:.2%} of the labels (top-{top_k} rule) "
                     f"and {check['topk_ids_change_share']:.2%} of the top-{top_k} id lists differ from float32")
    add_neighbour_strings(table, voc.strings, texts=voc.texts, inplace=True)
    table = _order_columns(table, top_k)
    hist = nearest_word_histogram(table, voc.strings, used, texts=voc.texts)
    summary = summarize(table)
    anchors_doc = {
        "source": source,
        "sources": sources,
        "scope": scope,
        "datasets": (list(model_anchors.get("datasets") or []) if model_anchors is not None
                     else [dataset] if dataset else []),
        "anchors": used,
        "anchor_strings": {g: [voc.strings[i] for i in ids] for g, ids in used.items()},
        "anchor_texts": {g: [voc.texts[i] for i in ids] for g, ids in used.items()},
        "evidence": evidence,
    }
    summary.update({
        "model": model,
        "dataset": dataset,
        "anchors": anchors_doc["anchors"],
        "anchor_strings": anchors_doc["anchor_strings"],
        "anchor_texts": anchors_doc["anchor_texts"],
        "anchor_source": source,
        "anchor_sources": sources,
        "anchor_scope": scope,
        "anchor_datasets": anchors_doc["datasets"],
        "settings": {
            "top_k": top_k, "exclude_special": exclude_special, "exclude_ids": list(map(int, exclude_ids)),
            "include_ids": list(map(int, include_ids)), "vision_token_offset": vision_token_offset,
            "discover_anchors": discover_anchors, "discovery": dict(discovery or {}), "num_layers": L,
            "model_anchors": model_anchors is not None,
            "similarity_dtype": similarity_dtype, "mode": mode,
        },
        "preprocess": preprocess,
        "all_rows_searched": not info["excluded_ids"],
        "similarity_check": check,
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
