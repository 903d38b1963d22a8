"""Layer lens: what does a visual token "mean" at depth l (docs/methods.md §1, last paragraph).

Per extracted layer l and visual token, the top-k vocabulary neighbours of ``h[l]`` by

(a) the *embedding lens*: float32 cosine with the rows of the input embedding E (the same
    search as EmbedLens at l = 0, special/added rows excluded unless configured);
(b) the *logit lens*: ``lm_head(final_norm(h[l]))``. HF's ``hidden_states`` already carry
    the final norm in their last entry (l = L), so it is *not* applied a second time there
    (``final_norm_applied_to_last_layer``, from the store attrs unless given). The same
    rows are excluded from the top-k as in (a); the log-probabilities use the log-sum-exp
    over *all* rows.

Both are streamed over vocabulary blocks. Stored once as Zarr (``lens.zarr``), so plots
never recompute them; dims ``(image, layer, token, k)``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedlens.atomic import atomic_directory
from embedlens.runtime import image_blocks, progress_bar
from embedlens.store import (
    describe_variables,
    final_norm_flag,
    layer_values,
    num_layers_of,
    valid_mask,
)

from .outputs import step_reader, step_summary, write_json
from .reference import check_mode, vocabulary_search_note
from .vocab import VocabIndex, excluded_ids, load_vocab

#: Files of the step's directory.
OUTPUT_FILES = {"lens": "lens.zarr", "summary": "summary.json"}


def _as_bool(x: Any) -> bool | None:
    if x is None:
        return None
    if isinstance(x, str):
        return x.strip().lower() in ("1", "true", "yes")
    return bool(x)


def _head_weight(lm_head: Any) -> tuple[Any, Any]:
    if lm_head is None:
        return None, None
    if isinstance(lm_head, torch.nn.Module):
        w = lm_head.weight.detach()
        b = getattr(lm_head, "bias", None)
        return w, (None if b is None else b.detach().float().cpu().numpy())
    return lm_head, None


def select_images(hidden, images: Sequence[Any] | None = None, max_images: int | None = None) -> np.ndarray:
    """Positions along ``image`` to process: the listed image ids (or positions), else all;
    then the first ``max_images``."""
    n = hidden.sizes["image"]
    if images is None:
        pos = np.arange(n)
    else:
        ids = [str(x) for x in hidden["image_id"].values] if "image_id" in hidden.variables else []
        where = {iid: i for i, iid in enumerate(ids)}
        pos = []
        for x in images:
            if isinstance(x, (int, np.integer)):
                pos.append(int(x))
            elif str(x) in where:
                pos.append(where[str(x)])
            else:
                raise KeyError(f"image {x!r} not in the store")
        pos = np.asarray(pos, dtype=np.int64)
    if max_images is not None:
        pos = pos[: int(max_images)]
    return pos


def layer_lens(
    hidden,
    vocab,
    out_dir: str | Path,
    *,
    top_k: int = 5,
    layers: Sequence[int] | str | None = "all",
    lm_head: Any = None,
    final_norm: Any = None,
    final_norm_applied_to_last_layer: bool | None = None,
    num_layers: int | None = None,
    exclude_special: bool = True,
    exclude_ids: Sequence[int] = (),
    include_ids: Sequence[int] = (),
    images: Sequence[Any] | None = None,
    max_images: int | None = None,
    device: str = "auto",
    vocab_block: int = 8192,
    query_block: int = 4096,
    max_block_bytes: int = 256 * 2**20,
    mode: str = "ours",
    model: str | None = None,
    dataset: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute and store the embedding lens and logit lens for every extracted layer.

    Parameters (config knobs)
    -------------------------
    hidden, vocab : hidden-state store (``open_hidden``) and vocabulary store.
    out_dir : the step's directory: ``lens.zarr`` (written under a temporary name and
        renamed) and ``summary.json`` (the one summary shape, ``outputs.SUMMARY_KEYS``);
        ``lens.zarr``        and renamed, replacing an existing one.
    top_k : neighbours per token, layer and lens (the store's ``k`` dimension).
    layers : layers to process (``None``/``"all"``: every extracted layer).
    lm_head : the adapter's ``lm_head`` module (or a (V, d) weight); ``None`` → embedding
        lens only (logit variables absent, noted).
    final_norm : the adapter's ``final_norm`` module; applied (in float32, on a copy) to
        ``h[l]`` before ``lm_head`` except on the last layer when
        ``final_norm_applied_to_last_layer``.
    final_norm_applied_to_last_layer : default from the store attrs, else True (HF).
    num_layers : L (default from store attrs, else the largest extracted layer, noted).
    exclude_special / exclude_ids / include_ids : rows removed from the top-k.
    images / max_images : subset of images (ids or positions; first n) to keep it cheap.
    device, vocab_block, query_block, max_block_bytes : compute knobs.
    mode : the model's ``mode`` in config.yaml, recorded in ``settings`` (the config's
        reference modes set ``exclude_special=False``: every row, as the reference code).

    Output variables (dims image, layer, token, k; invalid tokens: id -1, value NaN):
    ``emb_id`` int32, ``emb_sim`` float32; with a head also ``logit_id`` int32,
    ``logit`` float32, ``logprob`` float32. Coords: ``image_id``, ``layer``, ``token``,
    ``k`` (rank 1..k), ``patch_row``, ``patch_col``, ``token_valid``,
    ``final_norm_applied_by_lens (layer)``. Token strings are in the vocabulary store.
    Returns the step summary (also written to ``summary.json``).

    Raises
    ------
    ValueError
        ``layers`` not in the store, no image selected, an unknown ``mode``.
    KeyError
        an ``images`` entry that is not in the store.
    """
    k = int(top_k)  # the store's dimension name
    import xarray as xr

    t0 = time.perf_counter()
    check_mode(mode)
    voc = load_vocab(vocab)
    all_layers = layer_values(hidden)
    layers = all_layers if layers in (None, "all") else [int(l) for l in layers]
    missing = sorted(set(layers) - set(all_layers))
    if missing:
        raise ValueError(f"layers {missing} not in the store (layers {all_layers})")
    notes: list[str] = []
    L = num_layers_of(hidden, num_layers)
    if L is None:
        L = max(all_layers)
        notes.append(f"num_layers unknown: assumed the largest extracted layer {L} is the last (L)")
    applied_last = _as_bool(final_norm_applied_to_last_layer)
    if applied_last is None:
        applied_last = final_norm_flag(hidden)
    if applied_last is None:
        applied_last = True
        notes.append("final_norm_applied_to_last_layer not recorded: assumed True (HF behaviour)")

    excl = excluded_ids(voc, exclude_special=exclude_special, exclude_ids=exclude_ids,
                        include_ids=include_ids)
    emb_index = VocabIndex(voc.embedding, exclude=excl, normalize=True, device=device,
                           vocab_block=vocab_block)
    w, b = _head_weight(lm_head)
    logit_index = None
    norm_mod = None
    norm_by_layer = {l: False for l in layers}
    if w is not None:
        n_head = int(w.shape[0])
        logit_index = VocabIndex(w, exclude=excl[excl < n_head], normalize=False, bias=b,
                                 device=device, vocab_block=vocab_block)
        if final_norm is not None:
            norm_mod = copy.deepcopy(final_norm).to(device=logit_index.device, dtype=torch.float32).eval()
            norm_by_layer = {l: not (applied_last and l == L) for l in layers}
        else:
            notes.append("no final_norm supplied: the logit lens applies lm_head to raw h[l]")
    else:
        notes.append("no lm_head supplied: logit lens not computed")

    pos = select_images(hidden, images, max_images)
    valid_all = valid_mask(hidden)
    llm = hidden["llm_hidden"]
    T = hidden.sizes["token"]
    itemsize = np.dtype(llm.dtype).itemsize
    per_image = len(layers) * T * hidden.sizes["dim"] * itemsize
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out_path = out / OUTPUT_FILES["lens"]
    info = {
        "model": model, "dataset": dataset,
        "settings": {"top_k": k, "layers": layers, "max_images": max_images,
                     "exclude_special": exclude_special, "exclude_ids": list(map(int, exclude_ids)),
                     "include_ids": list(map(int, include_ids)), "mode": mode},
        "k": int(k), "layers": layers, "num_layers": L,
        "final_norm_applied_to_last_layer": applied_last,
        "final_norm_applied_by_lens": {str(l): v for l, v in norm_by_layer.items()},
        "logit_lens": logit_index is not None,
        "excluded_ids": excl.tolist(), "n_images": int(len(pos)), "notes": notes,
        "methods_notes": [vocabulary_search_note(
            "layer_lens", "Embedding lens = top-k cosine with E; logit lens = top-k of lm_head(final_norm(h[l])), "
            "final norm not re-applied to the last HF hidden state (already normed).", excl, voc.strings)],
    }
    first = True
    with atomic_directory(out_path) as tmp:
        blocks = list(image_blocks(len(pos), per_image, max_block_bytes))
        for s, e in progress_bar(blocks, enabled=progress, desc="layer lens", unit="block"):
            sel = pos[s:e]
            arr = np.asarray(llm.isel(image=sel).sel(layer=layers).transpose(
                "image", "layer", "token", "dim").values)
            m = valid_all[sel]
            nb, nl = arr.shape[0], arr.shape[1]
            res = {
                "emb_id": np.full((nb, nl, T, k), -1, np.int32),
                "emb_sim": np.full((nb, nl, T, k), np.nan, np.float32),
            }
            if logit_index is not None:
                res["logit_id"] = np.full((nb, nl, T, k), -1, np.int32)
                res["logit"] = np.full((nb, nl, T, k), np.nan, np.float32)
                res["logprob"] = np.full((nb, nl, T, k), np.nan, np.float32)
            for j, l in enumerate(layers):
                x = arr[:, j][m]
                if not len(x):
                    continue
                ids, sims = emb_index.search(x, k, query_block=query_block)
                res["emb_id"][:, j][m] = ids
                res["emb_sim"][:, j][m] = sims
                if logit_index is not None:
                    xt = torch.from_numpy(np.ascontiguousarray(x)).float()
                    if norm_by_layer[l]:
                        with torch.no_grad():
                            xt = torch.cat([norm_mod(xt[i:i + query_block].to(logit_index.device)).float().cpu()
                                            for i in range(0, len(xt), query_block)])
                    lid, lval, lse = logit_index.search(xt, k, query_block=query_block, logsumexp=True)
                    res["logit_id"][:, j][m] = lid
                    res["logit"][:, j][m] = lval
                    res["logprob"][:, j][m] = lval - lse[:, None]
            dims = ("image", "layer", "token", "k")
            coords = {
                "image_id": ("image", np.asarray([str(v) for v in hidden["image_id"].values[sel]], dtype=object)),
                "layer": np.asarray(layers, dtype=np.int64),
                "token": np.arange(T),
                "k": np.arange(1, k + 1),
                "token_valid": (("image", "token"), m),
                "final_norm_applied_by_lens": ("layer", np.asarray([norm_by_layer[l] for l in layers])),
            }
            for c in ("patch_row", "patch_col"):
                if c in hidden.variables:
                    coords[c] = (("image", "token"), np.asarray(hidden[c].values)[sel].astype(np.int32))
            ds = describe_variables(xr.Dataset({n: (dims, v) for n, v in res.items()}, coords=coords))
            if first:
                enc = {n: {"chunks": (max(1, nb), 1, T, k)} for n in res}
                ds.to_zarr(tmp, mode="w", encoding=enc, consolidated=False, zarr_format=3)
                first = False
            else:
                ds.to_zarr(tmp, append_dim="image", consolidated=False)
            del arr
        if first:
            raise ValueError("layer lens: no images selected")
    info["seconds"] = time.perf_counter() - t0
    info["files"] = dict(OUTPUT_FILES)
    summary = step_summary("lens", info)
    write_json(summary, out / OUTPUT_FILES["summary"])
    return summary


def open_lens(path: str | Path):
    """Open the lens store written by :func:`layer_lens` (lazy xarray Dataset); ``path``
    is the step's directory or its ``lens.zarr``."""
    import xarray as xr

    p = Path(path)
    if (p / OUTPUT_FILES["lens"]).exists():
        p = p / OUTPUT_FILES["lens"]
    return xr.open_zarr(p, consolidated=False)


read_lens = step_reader("lens")
