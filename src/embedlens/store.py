"""The hidden-state store: the contract between extraction and every analysis.

One Zarr v3 store per extraction shard (a range of images), listed by the ``hidden.json``
index (`write_index`, `open_index`), plus ``vocab.zarr`` per model. Every array and attribute
is described once, in `VARIABLES` / `SHARD_ATTRS`: the writers attach the descriptions as CF
attributes, so ``xarray.open_zarr`` explains a store without this module, and
docs/architecture.md shows them (`doc_table`). A store is written under a temporary name and
renamed into place only when complete, so an interrupted job never leaves one that looks finished.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence
import warnings

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from .atomic import atomic_directory  # noqa: F401 - part of this module's API

# Consolidated metadata is what makes opening a store one read instead of one per
# array; zarr warns that it is not (yet) in the v3 spec. Known and accepted.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")

FLOAT16_MAX = float(np.finfo(np.float16).max)

# A marker array written last: its presence (plus the rename) means "complete".
COMPLETE_ATTR = "embedlens_complete"

#: ``VLMAdapter.describe()`` keys recorded under their own name rather than ``model_<key>``,
#: so that no fact is stored twice under two names (None: not stored, the extraction records
#: it itself as ``compute_dtype`` / ``compute_dtype_used``).
MODEL_ATTR_NAMES = {"path": "model_path", "dtype": None, **{k: k for k in (
    "num_layers", "final_norm_applied_to_last_layer", "transformers_version", "torch_version")}}


def model_attrs(described: dict) -> dict:
    """A model's provenance (``VLMAdapter.describe()``) as store attributes: ``model_<key>``,
    except the keys of `MODEL_ATTR_NAMES`. Raises nothing."""
    names = {k: MODEL_ATTR_NAMES.get(k, f"model_{k}") for k in described}
    return {names[k]: v for k, v in described.items() if names[k] is not None}


# --------------------------------------------------------------------------- the contract
class Var(NamedTuple):
    dims: tuple[str, ...]
    long_name: str
    description: str
    units: str | None = None  # "1": a dimensionless number; None: an id, flag, text or index


_IT, _LT = ("image", "token"), ("image", "layer", "token", "k")
#: Every data variable and coordinate of a hidden-state shard, ``vocab.zarr`` and ``lens.zarr``.
#: The writers attach long_name/description/units as CF attributes (`cf_attrs`), so
#: ``xarray.open_zarr`` explains each array; docs/architecture.md's tables are `doc_table`.
VARIABLES: dict[str, Var] = {
    "llm_hidden": Var(("image", "layer", "token", "dim"), "LLM hidden state", "decoder hidden states at the "
                      "image's visual tokens in HF hidden_states order: layer 0 = decoder input (projector "
                      "output), layer l = output of decoder layer l; NaN where token_valid is False", "1"),
    "vision_hidden": Var(("image", "vision_layer", "vision_token", "vision_dim"), "vision-encoder hidden state",
                         "vision-encoder states of the image (when vision layers are configured); NaN past "
                         "n_vision_tokens", "1"),
    "image_id": Var(("image",), "image id", "the image's id in the materialized data set (dataset.json)"),
    "layer": Var(("layer",), "LLM layer", "HF hidden_states index: 0 = decoder input, l = output of decoder "
                 "layer l (the last, L = num_layers, carries the final norm when final_norm_applied_to_last_layer)"),
    "token": Var(("token",), "visual-token position", "position among the image's visual tokens in input order"),
    "patch_row": Var(_IT, "patch row", "row r of the token's patch in the grid; -1: none (separator, padding, no grid)", "1"),
    "patch_col": Var(_IT, "patch column", "column c of the token's patch; -1: none (separator, padding, no grid)", "1"),
    "token_valid": Var(_IT, "valid token", "True for the image's visual tokens, False for padding past "
                       "n_tokens (images of a store differ in token count)"),
    "n_tokens": Var(("image",), "visual tokens", "number of visual tokens of the image in the LLM input", "1"),
    "grid_rows": Var(("image",), "patch-grid rows", "rows R of the image's patch grid (the finest grid "
                     "covering the whole image); 0 where unknown", "1"),
    "grid_cols": Var(("image",), "patch-grid columns", "columns C of the image's patch grid; 0 where unknown", "1"),
    "grid_known": Var(("image",), "patch grid known", "False where the architecture's patch layout is unknown "
                      "for the image: grid 0 x 0, patches -1 (never guessed)"),
    "layout_note": Var(("image",), "layout note", "why the grid is unknown or how tokens were placed; '' if none"),
    "vision_layer": Var(("vision_layer",), "vision-encoder layer", "as configured: 0 = input of the first "
                        "encoder layer, k = output of encoder layer k (before post-norm/merger), < 0 from the end"),
    "vision_token": Var(("vision_token",), "vision-token position", "position among the image's vision tokens"),
    "n_vision_tokens": Var(("image",), "vision tokens", "number of vision-encoder tokens of the image", "1"),
    "vision_to_llm": Var(("image", "vision_token"), "visual token fed", "the visual token (index along token) "
                         "that this vision token alone feeds; -1: none (CLS, unpadded away, several feed one)"),
    "embedding": Var(("vocab", "dim"), "input embedding", "the LLM's input-embedding matrix E, one row per "
                     "token id, float32 (Gemma's sqrt(d) scale not applied)", "1"),
    "token_id": Var(("vocab",), "token id", "vocabulary id of the row"),
    "token_string": Var(("vocab",), "token string", "raw vocabulary string ('▁jav', 'Ġred'); '' past the tokenizer"),
    "is_special": Var(("vocab",), "special token", "special or added token, or a row past the tokenizer; "
                      "excluded from lens candidates unless configured"),
    "emb_id": Var(_LT, "embedding-lens token id", "id of the k-th nearest input-embedding row to h[l] by "
                  "cosine (excluded rows left out); -1 for invalid tokens"),
    "emb_sim": Var(_LT, "embedding-lens cosine", "cosine of h[l] with that row; NaN for invalid tokens", "1"),
    "logit_id": Var(_LT, "logit-lens token id", "id of the k-th largest logit of lm_head(final_norm(h[l])) "
                    "(excluded rows left out); -1 for invalid tokens"),
    "logit": Var(_LT, "logit-lens logit", "that logit; NaN for invalid tokens", "1"),
    "logprob": Var(_LT, "logit-lens log-probability", "natural-log probability of that token: logit minus "
                   "the log-sum-exp over all vocabulary rows; NaN for invalid tokens", "1"),
    "k": Var(("k",), "rank", "rank of the neighbour, 1 = nearest"),
    "final_norm_applied_by_lens": Var(("layer",), "final norm applied by the lens", "True where the logit "
                                      "lens applied final_norm before lm_head (not where HF already had)"),
}
SHARD_VARIABLES = ("llm_hidden", "vision_hidden", "image_id", "layer", "token", "patch_row", "patch_col",
                   "token_valid", "n_tokens", "grid_rows", "grid_cols", "grid_known", "layout_note",
                   "vision_layer", "vision_token", "n_vision_tokens", "vision_to_llm")
VOCAB_VARIABLES = ("embedding", "token_id", "token_string", "is_special")
LENS_VARIABLES = ("emb_id", "emb_sim", "logit_id", "logit", "logprob", "image_id", "layer", "token", "k",
                  "patch_row", "patch_col", "token_valid", "final_norm_applied_by_lens")

#: The model's provenance (`model_attrs`), in both a shard and ``vocab.zarr``.
MODEL_ATTRS = {
    "model": "the model's name in config.yaml", "model_path": "the directory the model was loaded from",
    "num_layers": "L, the decoder layers (hidden_states has L + 1 entries)",
    "final_norm_applied_to_last_layer": "True: the last hidden_states entry already carries the final norm (HF)",
    "model_architecture": "model class (config.architectures[0])", "model_model_type": "config model_type",
    "model_hidden_size": "d of the LLM", "model_vocab_size": "V, rows of the input embedding",
    "model_tokenizer_size": "tokens the tokenizer knows (rows past it: padding)",
    "model_image_token_id": "id of the image placeholder token",
    "model_vision_model_type": "vision config model_type", "model_num_vision_layers": "vision-encoder layers",
    "model_vision_hidden_size": "vision-encoder width", "model_embed_scale": "the embedding layer's scale "
    "(Gemma: sqrt(d); not applied to embedding)", "model_chat_template": "True: the prompt is a chat user turn",
    "transformers_version": "transformers version", "torch_version": "torch version",
}
#: Every attribute of a hidden-state shard.
SHARD_ATTRS = {
    **MODEL_ATTRS, "revision": "commit of a cached Hugging Face snapshot; null for a local directory",
    "dataset": "the data set's name", "image_range": "[start, stop): the data set's images in this shard",
    "prompt": "text after the image", "compute_dtype": "forward-pass dtype as configured",
    "compute_dtype_used": "forward-pass dtype used (float16 that gave NaN/inf is redone in bfloat16/float32)",
    "store_dtype_requested": "dtype on disk as configured",
    "store_dtype": "dtype on disk (float32 where float16 overflowed)",
    "settings": "the settings that define the stored values (layers, vision_layers, compute_dtype, "
    "store_dtype, prompt)", "settings_hash": "hash of settings", "device": "device of the forward pass",
    "python_version": "Python version", "final_batch_size": "batch size at the end of the shard",
    "batch_backoffs": "batch-size reductions taken (out of memory; a batch that only fails as a batch)",
    "batch_check": "first-batch self-check: image_id, batch_size, max_rel_diff, tolerance (null: not run)",
    "skipped_images": "image_id, file, reason of images left out under on_bad_image: skip",
    "extraction_notes": "fallbacks taken (dtype, batch size)", "created": "UTC time the shard was completed",
    COMPLETE_ATTR: "True: written completely (open_shard refuses a shard without it)",
}
VOCAB_ATTRS = (*MODEL_ATTRS, COMPLETE_ATTR)
#: The keys of ``hidden.json`` (`write_index`).
INDEX_KEYS = {
    "shards": "the shard paths, sorted", "n_images": "images over all shards",
    "layers": "the LLM layers stored", "max_tokens": "the widest image's visual tokens",
    "n_grid_unknown": "images whose patch grid is unknown", "skipped_images": "every shard's skipped_images",
    "extraction_notes": "every shard's extraction_notes", "model": "the model's name",
    "settings_hash": "the shards' settings_hash",
}


def cf_attrs(name: str) -> dict:
    """CF attributes (long_name, description, units) of a store array.

    Raises:
        KeyError: ``name`` is not in `VARIABLES` (every written array must be described).
    """
    if name not in VARIABLES:
        raise KeyError(f"store array {name!r} has no entry in embedlens.store.VARIABLES")
    v = VARIABLES[name]
    return {"long_name": v.long_name, "description": v.description, **({"units": v.units} if v.units else {})}


def describe_variables(ds: xr.Dataset) -> xr.Dataset:
    """Attach `cf_attrs` to every data variable and coordinate of ``ds`` (in place), for
    writers that go through xarray. Raises KeyError as `cf_attrs`."""
    for name, var in ds.variables.items():
        var.attrs.update(cf_attrs(str(name)))
    return ds


def doc_table(kind: str) -> str:
    """The Markdown table of docs/architecture.md for ``kind`` (shard, shard_attrs, vocab, lens,
    index), generated from the tables above (tests/test_store.py keeps the page in step).

    Raises:
        KeyError: an unknown ``kind``.
    """
    names = {"shard": SHARD_VARIABLES, "vocab": VOCAB_VARIABLES, "lens": LENS_VARIABLES}
    if kind in names:
        rows = ["| array | dims | units | long_name: description |", "|---|---|---|---|"]
        rows += [f"| `{n}` | {', '.join(VARIABLES[n].dims)} | {VARIABLES[n].units or ''} | "
                 f"{VARIABLES[n].long_name}: {VARIABLES[n].description} |" for n in names[kind]]
    else:
        table = {"shard_attrs": SHARD_ATTRS, "index": INDEX_KEYS}[kind]
        rows = ["| attribute | meaning |" if kind != "index" else "| key | meaning |", "|---|---|"]
        rows += [f"| `{n}` | {text} |" for n, text in table.items()]
    return "\n".join(rows) + "\n"


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


def _non_finite_layers(values: np.ndarray, names: Sequence[int]) -> list[int]:
    """Entries of `names` (one per leading slice of `values`) whose slice is not all finite."""
    bad = ~np.isfinite(values).reshape(values.shape[0], -1).all(axis=1)
    return [int(n) for n, b in zip(names, bad) if b]


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
              layout_note: str = "") -> None:
        """Store one image: ``llm`` (layer, token, dim), ``vision`` (vlayer, vtoken, vdim).

        ``vision_to_llm[j]`` = the LLM visual token that vision token j feeds (-1: none),
        so analyses can relate vision-encoder norms to LLM tokens on any architecture.
        ``grid_known`` False: the architecture's patch grid is unknown for this image (grid
        (0, 0), patches -1); ``layout_note`` says why or how tokens were placed.

        Raises:
            NonFiniteError: NaN/inf in ``llm`` or ``vision`` (naming the layers).
            StoreOverflowError: finite values beyond float16 when storing float16.
        """
        bad = _non_finite_layers(llm, self.layers)
        vbad = _non_finite_layers(vision, self.vision_layers) if vision is not None else []
        if bad or vbad:
            raise NonFiniteError(image_id, bad, vbad)
        if self.dtype == np.float16 and np.abs(llm).max(initial=0) > FLOAT16_MAX:
            raise StoreOverflowError(
                f"hidden states of image {image_id} exceed the float16 range "
                f"(max |h| = {np.abs(llm).max():.3g})")
        n_tok = llm.shape[1]
        arr = self._ensure("llm", "llm_hidden", llm.shape[0], n_tok, llm.shape[2])
        arr[index, :, :n_tok, :] = llm.astype(self.dtype)
        if vision is not None:
            if self.dtype == np.float16 and np.abs(vision).max(initial=0) > FLOAT16_MAX:
                raise StoreOverflowError(f"vision hidden states of image {image_id} overflow float16")
            varr = self._ensure("vision", "vision_hidden", vision.shape[0], vision.shape[1], vision.shape[2])
            varr[index, :, :vision.shape[1], :] = vision.astype(self.dtype)
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
                special_ids: Iterable[int], attrs: dict) -> None:
    """The vocabulary embedding matrix and token strings, stored once per model (atomically).

    Raises:
        OSError: ``path``'s directory cannot be written.
    """
    special = np.zeros(embedding.shape[0], dtype=bool)
    special[[i for i in special_ids if i < embedding.shape[0]]] = True
    strings = list(token_strings) + [""] * (embedding.shape[0] - len(token_strings))
    with atomic_directory(path) as tmp:
        ds = xr.Dataset(
            {"embedding": (("vocab", "dim"), embedding.astype(np.float32))},
            coords={"token_id": ("vocab", np.arange(embedding.shape[0], dtype=np.int64)),
                    "token_string": ("vocab", np.array(strings[: embedding.shape[0]], dtype=object)),
                    "is_special": ("vocab", special)},
            attrs=_jsonable({**attrs, COMPLETE_ATTR: True}))
        describe_variables(ds)
        rows = max(1, min(embedding.shape[0], (16 << 20) // max(1, embedding.shape[1] * 4)))
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
