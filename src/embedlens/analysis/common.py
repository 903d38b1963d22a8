"""Readers of the hidden-state store as the analyses use it: the token table, the valid
mask, layer values, the final-norm flag and the decoder depth (format:
docs/architecture.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pandas as pd


def token_index(hidden) -> pd.DataFrame:
    """One row per *valid* visual token of a hidden-state store (``open_hidden`` dataset):
    ``image`` (position along the image dim), ``image_id``, ``token``, ``patch_row``,
    ``patch_col``, ``grid_rows``, ``grid_cols``. Row order = image, then token."""
    n_img = hidden.sizes["image"]
    n_tok = hidden.sizes["token"]
    valid = (
        np.asarray(hidden["token_valid"].values, dtype=bool)
        if "token_valid" in hidden.variables
        else np.ones((n_img, n_tok), dtype=bool)
    )
    img, tok = np.nonzero(valid)

    def coord2(name: str) -> np.ndarray:
        if name in hidden.variables:
            return np.asarray(hidden[name].values)[img, tok].astype(np.int32)
        return np.full(img.shape, -1, dtype=np.int32)

    def coord1(name: str) -> np.ndarray:
        if name in hidden.variables:
            return np.asarray(hidden[name].values)[img].astype(np.int32)
        return np.full(img.shape, -1, dtype=np.int32)

    image_ids = (
        np.asarray([str(x) for x in hidden["image_id"].values], dtype=object)
        if "image_id" in hidden.variables
        else np.asarray([str(i) for i in range(n_img)], dtype=object)
    )
    return pd.DataFrame(
        {
            "image": img.astype(np.int32),
            "image_id": image_ids[img],
            "token": tok.astype(np.int32),
            "patch_row": coord2("patch_row"),
            "patch_col": coord2("patch_col"),
            "grid_rows": coord1("grid_rows"),
            "grid_cols": coord1("grid_cols"),
        }
    )


def valid_mask(hidden) -> np.ndarray:
    """(image, token) bool mask of valid tokens."""
    if "token_valid" in hidden.variables:
        return np.asarray(hidden["token_valid"].values, dtype=bool)
    return np.ones((hidden.sizes["image"], hidden.sizes["token"]), dtype=bool)


def image_blocks(n_images: int, bytes_per_image: int, max_block_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, stop) image ranges whose read stays under ``max_block_bytes`` (≥ 1 image)."""
    per = max(1, int(max_block_bytes) // max(1, int(bytes_per_image)))
    for s in range(0, n_images, per):
        yield s, min(s + per, n_images)


def final_norm_flag(hidden) -> bool | None:
    """The store's record of whether HF's last hidden state carries the final norm
    (``final_norm_applied_to_last_layer`` or the extractor's ``model_…`` attribute)."""
    for key in ("final_norm_applied_to_last_layer", "model_final_norm_applied_to_last_layer"):
        v = hidden.attrs.get(key)
        if v is not None:
            return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes")
    return None


def layer_values(hidden) -> list[int]:
    return [int(x) for x in np.asarray(hidden["layer"].values)]


def num_layers_of(hidden, num_layers: int | None = None) -> int | None:
    """L (decoder layers) from the argument, else from store attrs/settings, else None."""
    if num_layers is not None:
        return int(num_layers)
    attrs = dict(hidden.attrs)
    for key in ("num_layers", "model_num_layers", "num_hidden_layers", "llm_num_layers"):
        if key in attrs:
            return int(attrs[key])
    settings = attrs.get("settings")
    if isinstance(settings, str):
        try:
            settings = json.loads(settings)
        except ValueError:
            settings = None
    if isinstance(settings, dict):
        for key in ("num_layers", "num_hidden_layers", "llm_num_layers"):
            if key in settings:
                return int(settings[key])
    return None
