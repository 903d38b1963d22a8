"""The per-token input of the EmbedLens rule (docs/methods.md §1): the top-k neighbours of
``h[0]`` among the rows of the input-embedding matrix E, and the norms the report and
anchor discovery read (``h[l]`` per layer, the vision output of the 1:1 vision token).

Streamed: the store is read in memory-bounded image blocks and the vocabulary in row
blocks (:class:`.vocab.VocabIndex`), so no tokens × V matrix is ever held.
:func:`.categorize.categorize` applies the rule to this table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from embedlens.runtime import image_blocks, progress_bar
from embedlens.store import layer_values, token_index, valid_mask

from .vocab import VocabIndex, excluded_ids, load_vocab


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
    similarity_dtype: str = "float32",
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
    similarity_dtype : "float32", or "float16" (``VocabIndex(dtype=...)``): the table holds
        the float16 neighbours, and ``info["ids_float32"]`` (n, k) those of float32.

    Returns
    -------
    table : DataFrame, one row per valid visual token: ``image``, ``image_id``, ``token``,
        ``patch_row``, ``patch_col``, ``grid_rows``, ``grid_cols``, ``top{r}_id``,
        ``top{r}_sim`` (r = 1..k), ``norm_vision``, ``norm_h{l}``.
    info : excluded ids, vision mapping note, layers, timing (+ ``ids_float32`` with float16).

    Raises
    ------
    ValueError
        no layer 0 in the store; ``norm_layers`` not stored; embedding and hidden sizes differ;
        an unknown ``similarity_dtype``.
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
                       vocab_block=vocab_block, dtype=similarity_dtype)
    # float16: the float32 search beside it, to report what the half precision changes
    index32 = (None if similarity_dtype == "float32" else
               VocabIndex(voc.embedding, exclude=excl, device=device, vocab_block=vocab_block))
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
    ids32 = None if index32 is None else np.empty((n_tok, k), dtype=np.int64)
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
        if index32 is not None:
            ids32[sl] = index32.search(h0, k, query_block=query_block)[0]
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
    if ids32 is not None:
        info["ids_float32"] = ids32
    return table, info
