"""Token groups and the features the probes and the alignment read from the store.

Shared by :mod:`.probe` and :mod:`.align`: both select tokens by category group and read
the same per-token features (an LLM layer's ``h[l]`` or the vision output mapped 1:1),
streamed over image blocks so a store larger than memory is never loaded whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from embedlens.runtime import image_blocks

#: the token groups of probes and alignment: name → category labels (None = every token).
GROUP_DEFS: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "alive": ("alive",),
    "dead": ("dead",),
    "sink": ("vit_sink", "llm_sink"),
}


def resolve_groups(groups: Mapping[str, Sequence[str] | None] | Sequence[str] | None) -> dict[str, tuple[str, ...] | None]:
    """Token groups: ``None`` → all four defaults; a list of names from ``GROUP_DEFS``;
    or a mapping name → category labels (``None`` = every token)."""
    if groups is None:
        return dict(GROUP_DEFS)
    if isinstance(groups, Mapping):
        return {str(k): (None if v is None else tuple(v)) for k, v in groups.items()}
    unknown = [g for g in groups if g not in GROUP_DEFS]
    if unknown:
        raise ValueError(f"unknown token groups {unknown}; expected some of {list(GROUP_DEFS)}")
    return {g: GROUP_DEFS[g] for g in groups}


def gather_features(hidden, feature: str, layer: int | None, rows_img: np.ndarray,
                     rows_tok: np.ndarray, *, vision_layer=None, vision_map=None,
                     max_block_bytes: int = 256 * 2**20) -> np.ndarray:
    """(n_rows, d) float32 features for (image position, token) rows; NaN rows where the
    feature is unavailable (vision tokens not 1:1)."""
    n_img = hidden.sizes["image"]
    if feature == "vision":
        var = hidden["vision_hidden"]
        vt_dim = [d for d in var.dims if d not in ("image", "vision_layer")][0]
        d = var.shape[-1]
        per_image = hidden.sizes[vt_dim] * d * np.dtype(var.dtype).itemsize
    else:
        var = hidden["llm_hidden"]
        d = hidden.sizes["dim"]
        per_image = hidden.sizes["token"] * d * np.dtype(var.dtype).itemsize
    out = np.full((rows_img.size, d), np.nan, dtype=np.float32)
    order = np.argsort(rows_img, kind="stable")
    si = rows_img[order]
    for i0, i1 in image_blocks(n_img, per_image, max_block_bytes):
        a, b = np.searchsorted(si, [i0, i1])
        if a == b:
            continue
        idx = order[a:b]
        if feature == "vision":
            arr = np.asarray(var.isel(image=slice(i0, i1)).sel(vision_layer=vision_layer).values)
            j = vision_map[rows_img[idx], rows_tok[idx]]
            ok = j >= 0
            out[idx[ok]] = arr[rows_img[idx[ok]] - i0, j[ok]]
        else:
            arr = np.asarray(var.isel(image=slice(i0, i1)).sel(layer=layer).transpose("image", "token", "dim").values)
            out[idx] = arr[rows_img[idx] - i0, rows_tok[idx]]
    return out
