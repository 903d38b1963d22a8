"""The hidden-state store: the contract between extraction and every analysis.

One Zarr v3 store per extraction shard (a range of images), listed by the ``hidden.json``
index (`write_index`, `open_index`), plus ``vocab.zarr`` per model. Every array and attribute
is described once, in `embedlens.store_schema` (`VARIABLES` / `SHARD_ATTRS`, re-exported
here): the writers attach the descriptions as CF attributes, so ``xarray.open_zarr``
explains a store without this package, and docs/architecture.md shows them (`doc_table`). A store is written under a temporary name and
renamed into place only when complete, so an interrupted job never leaves one that looks finished.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence
import warnings

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from .atomic import atomic_directory  # noqa: F401 - part of this module's API

# The stores' self-description lives in store_schema (one table, no dependencies);
# re-exported so that ``from embedlens.store import VARIABLES, doc_table`` keeps working.
from .store_schema import (  # noqa: F401 - part of this module's API
    COMPLETE_ATTR,
    INDEX_KEYS,
    LENS_VARIABLES,
    MODEL_ATTR_NAMES,
    MODEL_ATTRS,
    SHARD_ATTRS,
    SHARD_VARIABLES,
    VARIABLES,
    VOCAB_ATTRS,
    VOCAB_VARIABLES,
    Var,
    cf_attrs,
    describe_variables,
    display_token,
    doc_table,
    model_attrs,
)

# Consolidated metadata is what makes opening a store one read instead of one per
# array; zarr warns that it is not (yet) in the v3 spec. Known and accepted.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")

FLOAT16_MAX = float(np.finfo(np.float16).max)

# How the state arrays are encoded, measured at LLaVA-1.5-7B's size (576 tokens x 4096 dims x
# 33 layers, float16; docs/architecture.md "Writing a shard"): zstd (zarr's default) saves 8%
# of the bytes (a float's mantissa is noise) at 2-3x the write time, blosc-lz4 with
# bitshuffle saves 0.5%; no compressor writes at 0.6-0.8x a raw sequential write of the same
# bytes. ``write_empty_chunks``: zarr otherwise compares every chunk with the fill value
# before writing it (one more pass over 156 MB per image); a chunk of a written image is
# never all fill.
STATE_COMPRESSORS = None
STATE_ARRAY_CONFIG = {"write_empty_chunks": True}

class StoreOverflowError(RuntimeError):
    """Values too large for float16 (massive activations); the caller retries in float32."""


class NonFiniteError(RuntimeError):
    """NaN or inf in the states of an image: never stored. Names the image and the layers."""

    def __init__(self, image_id: str, layers: Sequence[int], vision_layers: Sequence[int], detail: str = ""):
        where = []
        if len(layers):
            where.append(f"LLM layers {list(layers)}")
        if len(vision_layers):
            where.append(f"vision layers {list(vision_layers)}")
        self.image_id, self.layers, self.vision_layers, self.detail = image_id, list(layers), list(vision_layers), detail
        super().__init__(f"non-finite (NaN/inf) hidden states for image {image_id} at {' and '.join(where)}"
                         + (f": {detail}" if detail else ""))


def _non_finite_layers(values, names: Sequence[int]) -> list[int]:
    """Entries of `names` (one per leading slice of `values`, a numpy array or a torch
    tensor) whose slice is not all finite."""
    if isinstance(values, np.ndarray):
        bad = ~np.isfinite(values).reshape(values.shape[0], -1).all(axis=1)
    else:  # a torch tensor, checked on its device; only one flag per layer comes back
        bad = (~values.isfinite().reshape(values.shape[0], -1).all(dim=1)).cpu().numpy()
    return [int(n) for n, b in zip(names, bad) if b]


def check_states(image_id: str, llm, vision, layers: Sequence[int], vision_layers: Sequence[int],
                 dtype) -> None:
    """The checks every stored image passes: finite values, and values within float16's
    range when stored as float16. ``llm`` (layer, token, dim) and ``vision`` (vlayer, vtoken,
    vdim, or None) are numpy arrays or torch tensors on any device (a tensor is checked where
    it is, so the extraction checks on the GPU and moves only the stored bytes).

    Raises:
        NonFiniteError: NaN/inf in ``llm`` or ``vision`` (naming the layers).
        StoreOverflowError: finite values beyond float16 when ``dtype`` is float16.
    """
    bad = _non_finite_layers(llm, layers)
    vbad = _non_finite_layers(vision, vision_layers) if vision is not None else []
    if bad or vbad:
        raise NonFiniteError(image_id, bad, vbad)
    if np.dtype(dtype) == np.float16:
        for what, values in (("hidden states", llm), ("vision hidden states", vision)):
            peak = _abs_max(values) if values is not None else 0.0
            if peak > FLOAT16_MAX:
                raise StoreOverflowError(f"{what} of image {image_id} exceed the float16 range "
                                         f"(max |h| = {peak:.3g})")


def _abs_max(values) -> float:
    """max |x| of a numpy array or torch tensor (0 when empty)."""
    if isinstance(values, np.ndarray):
        return float(np.abs(values).max(initial=0))
    return float(values.abs().max()) if values.numel() else 0.0


class ShardWriter:
    """Write one shard of hidden states image by image.

    The token dimension grows (``resize``) when a later image has more visual
    tokens than any before it, so dynamic-resolution models need no pre-pass.
    """

    def __init__(self, path: Path, *, n_images: int, layers: Sequence[int],
                 vision_layers: Sequence[int], dtype: str, attrs: dict):
        self.path = Path(path)
        self.n_images = n_images
        self.layers = list(layers)
        self.vision_layers = list(vision_layers)
        self.dtype = np.dtype(dtype)
        self.attrs = attrs
        self.root = zarr.open_group(str(self.path), mode="w", zarr_format=3)
        self.llm = None
        self.vision = None
        self.n_tokens = np.zeros(n_images, dtype=np.int32)
        self.n_vision_tokens = np.zeros(n_images, dtype=np.int32)
        self.grid = np.zeros((n_images, 2), dtype=np.int32)
        self.patch_row: list[np.ndarray] = [None] * n_images
        self.patch_col: list[np.ndarray] = [None] * n_images
        self.image_ids: list[str] = [None] * n_images
        self.vision_to_llm: list[np.ndarray | None] = [None] * n_images
        self.grid_known = np.ones(n_images, dtype=bool)
        self.layout_note: list[str] = [""] * n_images
        #: images written so far by `append` (the next free slot)
        self.n_written = 0

    def _ensure(self, attr, name, n_layers, n_tok, width):
        arr = getattr(self, attr)
        if arr is None:
            # One chunk = one image x one layer: an analysis reading one layer for all
            # images, or all layers for one image, touches only what it needs.
            arr = self.root.create_array(name, shape=(self.n_images, n_layers, n_tok, width),
                                         chunks=(1, 1, n_tok, width), dtype=self.dtype, fill_value=np.nan,
                                         compressors=STATE_COMPRESSORS, config=STATE_ARRAY_CONFIG,
                                         dimension_names=VARIABLES[name].dims, attributes=cf_attrs(name))
            setattr(self, attr, arr)
        elif n_tok > arr.shape[2]:
            arr.resize((self.n_images, n_layers, n_tok, width))
        return arr

    def append(self, image_id: str, llm: np.ndarray, vision: np.ndarray | None, patch_row: np.ndarray,
               patch_col: np.ndarray, grid: tuple[int, int], **kw) -> None:
        """`write` into the next free slot; `close` drops the slots never written (skipped images).
        Raises as `write`."""
        self.write(self.n_written, image_id, llm, vision, patch_row, patch_col, grid, **kw)

    def write(self, index: int, image_id: str, llm: np.ndarray, vision: np.ndarray | None,
              patch_row: np.ndarray, patch_col: np.ndarray, grid: tuple[int, int],
              vision_to_llm: np.ndarray | None = None, grid_known: bool = True,
              layout_note: str = "", checked: bool = False) -> None:
        """Store one image: ``llm`` (layer, token, dim), ``vision`` (vlayer, vtoken, vdim).

        ``vision_to_llm[j]`` = the LLM visual token that vision token j feeds (-1: none),
        so analyses can relate vision-encoder norms to LLM tokens on any architecture.
        ``grid_known`` False: the architecture's patch grid is unknown for this image (grid
        (0, 0), patches -1); ``layout_note`` says why or how tokens were placed.
        ``checked=True``: the caller has already made the checks below (`check_states`, on
        the device, before the cast to the store dtype) and gives arrays in the store dtype.

        Raises:
            NonFiniteError: NaN/inf in ``llm`` or ``vision`` (naming the layers).
            StoreOverflowError: finite values beyond float16 when storing float16.
        """
        if not checked:
            check_states(image_id, llm, vision, self.layers, self.vision_layers, self.dtype)
        n_tok = llm.shape[1]
        arr = self._ensure("llm", "llm_hidden", llm.shape[0], n_tok, llm.shape[2])
        arr[index, :, :n_tok, :] = llm.astype(self.dtype, copy=False)
        if vision is not None:
            varr = self._ensure("vision", "vision_hidden", vision.shape[0], vision.shape[1], vision.shape[2])
            varr[index, :, :vision.shape[1], :] = vision.astype(self.dtype, copy=False)
            self.n_vision_tokens[index] = vision.shape[1]
            if vision_to_llm is not None:
                self.vision_to_llm[index] = np.asarray(vision_to_llm, dtype=np.int32)
        self.n_tokens[index] = n_tok
        self.grid[index] = grid
        self.patch_row[index] = np.asarray(patch_row, dtype=np.int32)
        self.patch_col[index] = np.asarray(patch_col, dtype=np.int32)
        self.image_ids[index] = image_id
        self.grid_known[index] = bool(grid_known)
        self.layout_note[index] = str(layout_note)
        self.n_written = max(self.n_written, index + 1)

    def _trim(self, n: int) -> None:
        """Keep the first `n` image slots (the images actually written)."""
        if n == 0:
            raise RuntimeError("shard incomplete: no image written")
        for arr in (self.llm, self.vision):
            if arr is not None:
                arr.resize((n, *arr.shape[1:]))
        self.n_images = n
        for name in ("n_tokens", "n_vision_tokens", "grid", "grid_known"):
            setattr(self, name, getattr(self, name)[:n])
        for name in ("patch_row", "patch_col", "image_ids", "vision_to_llm", "layout_note"):
            setattr(self, name, getattr(self, name)[:n])

    def _coord(self, name, values, fill=None):
        values = np.asarray(values)
        # Variable-length UTF-8 for strings: the fixed-width numpy kind has no Zarr v3 spec.
        dtype = str if values.dtype.kind in "UO" else values.dtype
        arr = self.root.create_array(name, shape=values.shape, dtype=dtype, chunks=values.shape or None,
                                     dimension_names=VARIABLES[name].dims, fill_value=fill,
                                     attributes=cf_attrs(name))
        arr[...] = values
        return arr

    def close(self) -> None:
        """Write coordinates and attributes; call only after every image is written (or, with
        `append`, after the last one: unwritten trailing slots are dropped).

        Raises:
            RuntimeError: an image slot before the last written one was never written, or none was.
        """
        if self.n_written < self.n_images and all(v is None for v in self.image_ids[self.n_written:]):
            self._trim(self.n_written)
        missing = [i for i, v in enumerate(self.image_ids) if v is None]
        if missing:
            raise RuntimeError(f"shard incomplete: images {missing[:5]} not written")
        n_max = int(self.n_tokens.max())
        rows = np.full((self.n_images, n_max), -1, dtype=np.int32)
        cols = np.full((self.n_images, n_max), -1, dtype=np.int32)
        for i in range(self.n_images):
            rows[i, : self.n_tokens[i]] = self.patch_row[i]
            cols[i, : self.n_tokens[i]] = self.patch_col[i]
        valid = np.arange(n_max)[None, :] < self.n_tokens[:, None]
        self._coord("image_id", np.array(self.image_ids, dtype=object))
        self._coord("layer", np.array(self.layers, dtype=np.int32))
        self._coord("token", np.arange(n_max, dtype=np.int32))
        self._coord("patch_row", rows, -1)
        self._coord("patch_col", cols, -1)
        self._coord("token_valid", valid, False)
        self._coord("n_tokens", self.n_tokens)
        self._coord("grid_rows", self.grid[:, 0])
        self._coord("grid_cols", self.grid[:, 1])
        self._coord("grid_known", self.grid_known)
        self._coord("layout_note", np.array(self.layout_note, dtype=object))
        if self.vision is not None:
            self._coord("vision_layer", np.array(self.vision_layers, dtype=np.int32))
            self._coord("vision_token", np.arange(self.vision.shape[2], dtype=np.int32))
            self._coord("n_vision_tokens", self.n_vision_tokens)
            v2l = np.full((self.n_images, self.vision.shape[2]), -1, dtype=np.int32)
            for i, m in enumerate(self.vision_to_llm):
                if m is not None:
                    v2l[i, : len(m)] = m
            self._coord("vision_to_llm", v2l, -1)
        coords = [c for c in SHARD_VARIABLES[2:] if c in self.root]
        for name in ("llm_hidden", "vision_hidden"):
            if name in self.root:
                # xarray reads this CF attribute to know which arrays are coordinates.
                self.root[name].attrs["coordinates"] = " ".join(
                    c for c in coords if c not in ("layer", "token", "vision_layer", "vision_token"))
        attrs = dict(self.attrs)
        attrs["store_dtype"] = str(self.dtype)
        attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        attrs[COMPLETE_ATTR] = True
        self.root.attrs.update(_jsonable(attrs))
        zarr.consolidate_metadata(str(self.path))


def _jsonable(attrs: dict) -> dict:
    return json.loads(json.dumps(attrs, default=str))


def open_shard(path: str | Path) -> xr.Dataset:
    """Open one complete shard lazily; refuse an incomplete one.

    Raises:
        FileNotFoundError: no store at ``path``.
        RuntimeError: the store is incomplete (no `COMPLETE_ATTR`: an interrupted extraction).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such hidden-state store")
    ds = xr.open_zarr(str(path), consolidated=True)
    if not ds.attrs.get(COMPLETE_ATTR):
        raise RuntimeError(f"{path}: store is incomplete (interrupted extraction?); rerun the extract job")
    return ds


def open_hidden(paths: Iterable[str | Path]) -> xr.Dataset:
    """Join shards along ``image`` lazily.

    Shards whose token counts differ are padded with NaN and ``token_valid = False``
    (xarray's outer join on the ``token`` coordinate).

    Raises:
        ValueError: No path given.
        FileNotFoundError, RuntimeError: A shard is missing or incomplete (see `open_shard`).
    """
    return _join([open_shard(p) for p in sorted(map(str, paths))])


def _join(shards: list[xr.Dataset]) -> xr.Dataset:
    if not shards:
        raise ValueError("open_hidden: no shard paths given")
    if len(shards) == 1:
        return shards[0]
    joined = xr.concat(shards, dim="image", join="outer", data_vars="minimal",
                       coords="different", compat="equals", combine_attrs="drop_conflicts",
                       fill_value={"token_valid": False, "patch_row": -1, "patch_col": -1})
    joined["token_valid"] = joined["token_valid"].fillna(False).astype(bool)
    return joined


# --------------------------------------------------------------------------- hidden.json
def write_index(shards: Iterable[str | Path], out: str | Path) -> dict:
    """Check that the shards of a model x data set open and join, and write their index
    ``hidden.json`` (the file analyses take): shard paths, sizes, layers, and the per-shard
    records that a join of attributes would drop (images left out, fallbacks taken).
    Returns the index.

    Raises:
        ValueError: No shard given.
        FileNotFoundError, RuntimeError: A shard is missing or incomplete (see `open_shard`).
    """
    paths = sorted(map(str, shards))
    opened = [open_shard(p) for p in paths]
    ds = _join(opened)
    skipped = [rec for sh in opened for rec in sh.attrs.get("skipped_images") or []]
    notes = [note for sh in opened for note in sh.attrs.get("extraction_notes") or []]
    index = {"shards": paths,
             "n_images": int(ds.sizes["image"]), "layers": [int(x) for x in ds["layer"].values],
             "max_tokens": int(ds.sizes["token"]),
             "n_grid_unknown": int((~ds["grid_known"].values.astype(bool)).sum()) if "grid_known" in ds else 0,
             "skipped_images": skipped, "extraction_notes": notes,
             "model": ds.attrs.get("model"), "settings_hash": ds.attrs.get("settings_hash")}
    Path(out).write_text(json.dumps(index, indent=2))
    return index


def read_index(path: str | Path) -> dict:
    """The ``hidden.json`` index written by `write_index`, as a dict.

    Raises:
        FileNotFoundError: No such file.
        KeyError: The file lists no ``shards`` (not an index).
    """
    index = json.loads(Path(path).read_text())
    if "shards" not in index:
        raise KeyError(f"{path}: not a hidden-state index (no 'shards'); written by `embedlens index-hidden`")
    return index


def open_index(path: str | Path) -> xr.Dataset:
    """The joined hidden-state store of a model x data set, from its ``hidden.json`` index.

    Raises:
        FileNotFoundError, KeyError, RuntimeError: as `read_index` (no index, not an index) and
            `open_shard` (a listed shard missing or incomplete).
    """
    return open_hidden(read_index(path)["shards"])


# --------------------------------------------------------------------------- readers
# Work on any ``xarray.Dataset`` in the store format (lazy from `open_hidden`, or built in
# memory by a test); a missing optional coordinate gets its documented default.
def token_index(hidden) -> pd.DataFrame:
    """One row per *valid* visual token of a hidden-state store (``open_hidden`` dataset):
    ``image`` (position along the image dim), ``image_id``, ``token``, ``patch_row``,
    ``patch_col``, ``grid_rows``, ``grid_cols``. Row order = image, then token.

    Raises:
        KeyError: ``hidden`` has no ``image`` or ``token`` dimension.
    """
    img, tok = np.nonzero(valid_mask(hidden))

    def coord(name: str, *index) -> np.ndarray:
        if name in hidden.variables:
            return np.asarray(hidden[name].values)[index].astype(np.int32)
        return np.full(img.shape, -1, dtype=np.int32)

    image_ids = (np.asarray([str(x) for x in hidden["image_id"].values], dtype=object)
                 if "image_id" in hidden.variables
                 else np.asarray([str(i) for i in range(hidden.sizes["image"])], dtype=object))
    return pd.DataFrame({"image": img.astype(np.int32), "image_id": image_ids[img],
                         "token": tok.astype(np.int32), "patch_row": coord("patch_row", img, tok),
                         "patch_col": coord("patch_col", img, tok), "grid_rows": coord("grid_rows", img),
                         "grid_cols": coord("grid_cols", img)})


def valid_mask(hidden) -> np.ndarray:
    """(image, token) bool mask of valid tokens.

    Raises:
        KeyError: No ``token_valid`` and no ``image``/``token`` dimension.
    """
    if "token_valid" in hidden.variables:
        return np.asarray(hidden["token_valid"].values, dtype=bool)
    return np.ones((hidden.sizes["image"], hidden.sizes["token"]), dtype=bool)


def final_norm_flag(hidden) -> bool | None:
    """The store's record of whether HF's last hidden state carries the final norm
    (``final_norm_applied_to_last_layer``); None when not recorded. Raises nothing."""
    # Stores written before the attribute names were unified also carry the adapter's copy
    # ``model_final_norm_applied_to_last_layer``: read as a fallback so they keep working.
    for key in ("final_norm_applied_to_last_layer", "model_final_norm_applied_to_last_layer"):
        v = hidden.attrs.get(key)
        if v is not None:
            return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes")
    return None


def layer_values(hidden) -> list[int]:
    """The extracted LLM layers (HF ``hidden_states`` indices), in store order.

    Raises:
        KeyError: ``hidden`` has no ``layer`` coordinate.
    """
    return [int(x) for x in np.asarray(hidden["layer"].values)]


def num_layers_of(hidden, num_layers: int | None = None) -> int | None:
    """L (decoder layers) from the argument, else from store attrs/settings, else None.

    Raises:
        ValueError, TypeError: The recorded value is not an integer.
    """
    if num_layers is not None:
        return int(num_layers)
    attrs = dict(hidden.attrs)
    # ``model_num_layers``: the adapter's copy in stores written before the attribute names
    # were unified (now only ``num_layers``); read as a fallback so old stores keep working.
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


# --------------------------------------------------------------------------- vocabulary
def write_vocab(path: str | Path, embedding: np.ndarray, token_strings: Sequence[str],
                special_ids: Iterable[int], attrs: dict, token_texts: Sequence[str | None] | None = None) -> None:
    """The vocabulary embedding matrix, token strings (raw pieces), their decoded texts and
    the special-token flags, stored once per model (atomically).

    ``token_texts``: the tokenizer's decoding of each piece (``VLMAdapter.token_texts``);
    a missing one (None, or no list at all) is `display_token` of the piece.

    Raises:
        OSError: ``path``'s directory cannot be written.
    """
    n = embedding.shape[0]
    special = np.zeros(n, dtype=bool)
    special[[i for i in special_ids if i < n]] = True
    strings = (list(token_strings) + [""] * (n - len(token_strings)))[:n]
    texts = list(token_texts or [])[:n]
    texts = [display_token(s) if i >= len(texts) or texts[i] is None else str(texts[i])
             for i, s in enumerate(strings)]
    with atomic_directory(path) as tmp:
        ds = xr.Dataset(
            {"embedding": (("vocab", "dim"), embedding.astype(np.float32))},
            coords={"token_id": ("vocab", np.arange(n, dtype=np.int64)),
                    "token_string": ("vocab", np.array(strings, dtype=object)),
                    "token_text": ("vocab", np.array(texts, dtype=object)),
                    "is_special": ("vocab", special)},
            attrs=_jsonable({**attrs, COMPLETE_ATTR: True}))
        describe_variables(ds)
        rows = max(1, min(n, (16 << 20) // max(1, embedding.shape[1] * 4)))
        ds.to_zarr(str(tmp), mode="w", zarr_format=3, consolidated=True,
                   encoding={"embedding": {"chunks": (rows, embedding.shape[1])}})


def open_vocab(path: str | Path) -> xr.Dataset:
    """Open a ``vocab.zarr`` written by `write_vocab` lazily.

    Raises:
        FileNotFoundError: no store at ``path``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no vocabulary store; run the export_vocab rule")
    return xr.open_zarr(str(path), consolidated=True)
