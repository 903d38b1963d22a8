"""Shared pieces of the analyses: streamed vocabulary search, token tables, patch labels,
atomic output writing.

Nothing here knows about a particular analysis; categorize, lens, probe and align all
build on it. The hidden-state store and the materialized data set are read through their
documented formats (docs/architecture.md), so this module needs neither
``embedlens.store`` nor ``embedlens.datasets``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

_EPS = 1e-12

# Markers tokenizers put in front of / around a word piece (sentencepiece "▁", GPT-2 byte
# level "Ġ"/"Ċ", WordPiece "##").
_WORD_MARKERS = ("▁", "Ġ", "Ċ", "##", " ")


# --------------------------------------------------------------------------- devices
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) → CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def progress_bar(iterable=None, *, enabled: bool = True, **kw):
    """tqdm when enabled, otherwise the bare iterable (tests stay quiet)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, **kw)


# --------------------------------------------------------------------------- vocabulary
@dataclass
class Vocab:
    """The LLM input-embedding matrix with its token strings.

    ``embedding`` (V, d) float32; ``strings`` length V; ``is_special`` (V,) bool
    (added/special tokens as the tokenizer marks them).
    """

    embedding: np.ndarray
    strings: list[str]
    is_special: np.ndarray

    def __post_init__(self) -> None:
        self.embedding = np.asarray(self.embedding)
        self.strings = [str(s) for s in self.strings]
        self.is_special = np.asarray(self.is_special, dtype=bool)
        v = self.embedding.shape[0]
        if len(self.strings) != v or self.is_special.shape != (v,):
            raise ValueError(
                f"vocab: embedding has {v} rows but {len(self.strings)} strings and "
                f"{self.is_special.shape} special flags"
            )

    @property
    def size(self) -> int:
        return int(self.embedding.shape[0])


def load_vocab(vocab: Any) -> Vocab:
    """Accept a :class:`Vocab`, a path to ``vocab.zarr`` or an ``xarray.Dataset`` in the
    documented vocabulary-store format (``embedding (vocab, dim)``, coords
    ``token_string``, ``is_special``)."""
    if isinstance(vocab, Vocab):
        return vocab
    import xarray as xr

    if isinstance(vocab, (str, os.PathLike)):
        vocab = xr.open_zarr(vocab, consolidated=False)
    if isinstance(vocab, xr.Dataset):
        emb = np.asarray(vocab["embedding"].values, dtype=np.float32)
        n = emb.shape[0]
        strings = (
            [str(s) for s in vocab["token_string"].values]
            if "token_string" in vocab.variables
            else [str(i) for i in range(n)]
        )
        special = (
            np.asarray(vocab["is_special"].values, dtype=bool)
            if "is_special" in vocab.variables
            else np.zeros(n, dtype=bool)
        )
        return Vocab(emb, strings, special)
    raise TypeError(f"cannot read a vocabulary from {type(vocab).__name__}")


def excluded_ids(
    vocab: Vocab,
    *,
    exclude_special: bool = True,
    exclude_ids: Iterable[int] = (),
    include_ids: Iterable[int] = (),
) -> np.ndarray:
    """Sorted vocabulary ids removed from the lens candidates: the special/added rows
    (when ``exclude_special``), plus ``exclude_ids``, minus ``include_ids``."""
    ex: set[int] = set(np.flatnonzero(vocab.is_special).tolist()) if exclude_special else set()
    ex |= {int(i) for i in exclude_ids}
    ex -= {int(i) for i in include_ids}
    bad = [i for i in ex if not 0 <= i < vocab.size]
    if bad:
        raise ValueError(f"excluded ids outside the vocabulary (size {vocab.size}): {bad[:5]}")
    return np.array(sorted(ex), dtype=np.int64)


def normalize_word(s: str) -> str:
    """Token string or label word → comparable form: word-piece markers (▁, Ġ, Ċ, ##) and
    spaces stripped, lower-cased unless a single character (so the letter label "A" does
    not match the article "a", while "Red" matches "red")."""
    s = str(s)
    for m in _WORD_MARKERS:
        s = s.replace(m, "")
    s = s.strip()
    return s if len(s) <= 1 else s.lower()


# --------------------------------------------------------------------------- search
class VocabIndex:
    """Top-k search of query vectors against the rows of a (V, d) matrix, streamed over
    blocks of rows so that no (queries × V) matrix is ever held.

    ``normalize=True`` → cosine similarity (rows and queries L2-normalized, float32):
    the EmbedLens / embedding lens. ``normalize=False`` → raw dot products plus ``bias``
    (the logit lens with an LM head); then :meth:`search` can also return the exact
    log-sum-exp over *all* rows (excluded rows included) for log-probabilities.

    Rows listed in ``exclude`` never appear in the results. Ties: the k kept entries are
    ordered by (score descending, id ascending); which of several exactly tied rows is kept
    at the boundary follows ``torch.topk``.
    Memory: one copy of the matrix (float32, on ``device``) plus one
    ``query_block × vocab_block`` score block.
    """

    def __init__(
        self,
        matrix: Any,
        *,
        exclude: Sequence[int] | np.ndarray = (),
        normalize: bool = True,
        bias: Any = None,
        device: str | torch.device | None = "auto",
        vocab_block: int = 8192,
    ) -> None:
        self.device = resolve_device(device)
        if isinstance(matrix, torch.Tensor):
            w = matrix.detach().to(device=self.device, dtype=torch.float32, copy=True)
        else:
            w = torch.from_numpy(np.array(matrix, dtype=np.float32, copy=True)).to(self.device)
        if w.ndim != 2:
            raise ValueError(f"vocabulary matrix must be 2-D, got shape {tuple(w.shape)}")
        if normalize:  # in place: a single copy of E in memory
            w.div_(torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min_(_EPS))
        self.matrix = w
        self.normalize = normalize
        self.bias = (
            None
            if bias is None
            else torch.as_tensor(np.asarray(bias, dtype=np.float32)).to(self.device)
        )
        self.vocab_block = int(vocab_block)
        self.excluded = np.array(sorted({int(i) for i in np.asarray(exclude).ravel()}), dtype=np.int64)
        if self.excluded.size and (self.excluded[0] < 0 or self.excluded[-1] >= self.size):
            raise ValueError("excluded ids outside the matrix")
        self._block_masks: list[torch.Tensor | None] = []
        for start in range(0, self.size, self.vocab_block):
            stop = min(start + self.vocab_block, self.size)
            sel = self.excluded[(self.excluded >= start) & (self.excluded < stop)] - start
            self._block_masks.append(
                torch.from_numpy(sel).to(self.device) if sel.size else None
            )
        if self.size - self.excluded.size < 1:
            raise ValueError("every vocabulary row is excluded")

    @property
    def size(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @torch.no_grad()
    def search(
        self,
        queries: Any,
        k: int,
        *,
        query_block: int = 4096,
        logsumexp: bool = False,
        progress: bool = False,
        desc: str | None = None,
        on_block=None,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k rows for each query.

        Returns ``ids`` (n, k) int64 and ``scores`` (n, k) float32 (cosine or logit),
        sorted best first; with ``logsumexp=True`` also ``lse`` (n,) float32 over all rows.
        Queries: anything indexable by row slices giving (m, d) arrays/tensors (numpy,
        torch, a dask-less xarray ``.values``); cast to float32 block by block.
        ``on_block(m)`` is called after each query block of m rows (progress reporting).
        """
        n = len(queries)
        k_eff = min(int(k), self.size - int(self.excluded.size))
        if k_eff < 1:
            raise ValueError("k must be >= 1")
        ids_out = np.full((n, k), -1, dtype=np.int64)
        val_out = np.full((n, k), -np.inf, dtype=np.float32)
        lse_out = np.empty(n, dtype=np.float32) if logsumexp else None
        starts = range(0, n, max(1, int(query_block)))
        for qs in progress_bar(starts, enabled=progress and n > 0, desc=desc or "vocab search",
                               unit="block", leave=False):
            qe = min(qs + query_block, n)
            q = queries[qs:qe]
            q = (q.to(self.device, torch.float32) if isinstance(q, torch.Tensor)
                 else torch.from_numpy(np.asarray(q, dtype=np.float32)).to(self.device))
            if q.ndim != 2 or q.shape[1] != self.dim:
                raise ValueError(f"queries must be (n, {self.dim}), got {tuple(q.shape)}")
            if self.normalize:
                q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True).clamp_min(_EPS)
            m = q.shape[0]
            best_v = torch.full((m, k_eff), -math.inf, device=self.device)
            best_i = torch.full((m, k_eff), -1, dtype=torch.int64, device=self.device)
            if logsumexp:
                run_max = torch.full((m,), -math.inf, device=self.device)
                run_sum = torch.zeros(m, device=self.device)
            for b, start in enumerate(range(0, self.size, self.vocab_block)):
                stop = min(start + self.vocab_block, self.size)
                s = q @ self.matrix[start:stop].T
                if self.bias is not None:
                    s += self.bias[start:stop]
                if logsumexp:
                    bmax = s.max(dim=1).values
                    new_max = torch.maximum(run_max, bmax)
                    run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(
                        s - new_max[:, None]
                    ).sum(dim=1)
                    run_max = new_max
                mask = self._block_masks[b]
                if mask is not None:
                    s.index_fill_(1, mask, -math.inf)
                kb = min(k_eff, stop - start)
                v, i = s.topk(kb, dim=1)
                cat_v = torch.cat([best_v, v], dim=1)
                cat_i = torch.cat([best_i, i + start], dim=1)
                best_v, pos = cat_v.topk(k_eff, dim=1)
                best_i = cat_i.gather(1, pos)
            bv = best_v.cpu().numpy()
            bi = best_i.cpu().numpy()
            order = np.lexsort((bi, -bv), axis=1)  # score desc, then id asc
            val_out[qs:qe, :k_eff] = np.take_along_axis(bv, order, axis=1)
            ids_out[qs:qe, :k_eff] = np.take_along_axis(bi, order, axis=1)
            if logsumexp:
                lse_out[qs:qe] = (run_max + torch.log(run_sum)).cpu().numpy()
            if on_block is not None:
                on_block(qe - qs)
        if logsumexp:
            return ids_out, val_out, lse_out
        return ids_out, val_out


# --------------------------------------------------------------------------- the store
# Read through embedlens.store (the store's owner); re-exported for the analyses.
from embedlens.store import (  # noqa: E402,F401
    final_norm_flag,
    layer_values,
    num_layers_of,
    token_index,
    valid_mask,
)


def image_blocks(n_images: int, bytes_per_image: int, max_block_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, stop) image ranges whose read stays under ``max_block_bytes`` (≥ 1 image)."""
    per = max(1, int(max_block_bytes) // max(1, int(bytes_per_image)))
    for s in range(0, n_images, per):
        yield s, min(s + per, n_images)


# --------------------------------------------------------------------------- labels
@dataclass
class PatchLabels:
    """Per-cell labels of a materialized data set (``labels.npz`` + ``dataset.json``).

    ``tasks``: task → label words (index = label value); ``grids``: task → int array
    (n_images, G, G), -1 = no label; ``image_ids``: the images in grid order.
    """

    tasks: dict[str, list[str]]
    grids: dict[str, np.ndarray]
    image_ids: list[str]
    _pos: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.image_ids = [str(x) for x in self.image_ids]
        self._pos = {iid: i for i, iid in enumerate(self.image_ids)}
        for t, g in self.grids.items():
            if t not in self.tasks:
                raise ValueError(f"labels: grid for unknown task {t!r}")
            g = np.asarray(g)
            if g.ndim != 3 or g.shape[0] != len(self.image_ids) or g.shape[1] != g.shape[2]:
                raise ValueError(f"labels: task {t!r} grid has shape {g.shape}, expected "
                                 f"({len(self.image_ids)}, G, G)")
            self.grids[t] = g

    @property
    def empty(self) -> bool:
        return not self.grids

    def for_tokens(
        self,
        image_id: Sequence[str],
        patch_row: np.ndarray,
        patch_col: np.ndarray,
        grid_rows: np.ndarray,
        grid_cols: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Label value per token and task by the cell-under-token-centre rule:
        ``cell = floor((r + 0.5) * G / R)`` (same for columns). -1 where the image has no
        labels, the patch position is unknown, or the cell is unlabelled."""
        img = np.array([self._pos.get(str(x), -1) for x in image_id], dtype=np.int64)
        r = np.asarray(patch_row, dtype=np.float64)
        c = np.asarray(patch_col, dtype=np.float64)
        rr = np.asarray(grid_rows, dtype=np.float64)
        cc = np.asarray(grid_cols, dtype=np.float64)
        ok = (img >= 0) & (r >= 0) & (c >= 0) & (rr > 0) & (cc > 0)
        out: dict[str, np.ndarray] = {}
        for task, grid in self.grids.items():
            g = grid.shape[1]
            with np.errstate(invalid="ignore", divide="ignore"):
                cr = np.floor((r + 0.5) * g / np.where(rr > 0, rr, 1)).astype(np.int64)
                cc_ = np.floor((c + 0.5) * g / np.where(cc > 0, cc, 1)).astype(np.int64)
            cr = np.clip(cr, 0, g - 1)
            cc_ = np.clip(cc_, 0, g - 1)
            lab = np.full(img.shape, -1, dtype=np.int64)
            lab[ok] = grid[img[ok], cr[ok], cc_[ok]]
            out[task] = lab
        return out

    def for_table(self, table: pd.DataFrame) -> dict[str, np.ndarray]:
        """:meth:`for_tokens` over a token table with the :func:`token_index` columns."""
        return self.for_tokens(
            table["image_id"].astype(str).to_numpy(),
            table["patch_row"].to_numpy(),
            table["patch_col"].to_numpy(),
            table["grid_rows"].to_numpy(),
            table["grid_cols"].to_numpy(),
        )


def grid_unknown_tokens(table: pd.DataFrame, step: str) -> tuple[dict[str, int], list[str]]:
    """Tokens of images whose patch grid is unknown (``grid_rows``/``grid_cols`` 0 in the
    store: tiles + thumbnail, separator tokens, dynamic resolution). They have no patch
    position, so every label-based measure leaves them out; this counts them for the
    summary and words the note ``step`` reports. Returns ``({"n_images", "n_tokens"},
    notes)``; notes is empty when every grid is known."""
    if table.empty or "grid_rows" not in table or "grid_cols" not in table:
        return {"n_images": 0, "n_tokens": 0}, []
    unknown = (table["grid_rows"].to_numpy() <= 0) | (table["grid_cols"].to_numpy() <= 0)
    n_tok = int(unknown.sum())
    n_img = int(table.loc[unknown, "image_id"].nunique()) if n_tok else 0
    notes = [] if not n_tok else [
        f"{n_tok} tokens of {n_img} image(s) whose patch grid is unknown (see the store's "
        f"grid_known/layout_note) have no patch label and are left out of {step}"]
    return {"n_images": n_img, "n_tokens": n_tok}, notes


def read_patch_labels(dataset_dir: str | os.PathLike) -> PatchLabels:
    """Read ``dataset.json`` + ``labels.npz`` of a materialized data set (documented
    format). A set without labels gives an empty :class:`PatchLabels`."""
    d = Path(dataset_dir)
    meta = json.loads((d / "dataset.json").read_text())
    tasks = {str(t): [str(w) for w in words] for t, words in (meta.get("label_tasks") or {}).items()}
    image_ids = [str(im["image_id"]) for im in meta.get("images", [])]
    grids: dict[str, np.ndarray] = {}
    npz = d / "labels.npz"
    if tasks and npz.exists():
        with np.load(npz, allow_pickle=False) as z:
            for t in tasks:
                if t in z.files:
                    grids[t] = np.asarray(z[t]).astype(np.int64)
    return PatchLabels({t: w for t, w in tasks.items() if t in grids}, grids, image_ids)


# --------------------------------------------------------------------------- outputs
def _atomic(path: Path, write) -> None:
    from embedlens.atomic import atomic_file

    with atomic_file(path) as tmp:
        write(str(tmp))


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a DataFrame to Parquet atomically (temporary name, then rename)."""
    p = Path(path)
    _atomic(p, lambda tmp: df.to_parquet(tmp, index=False, engine="pyarrow"))
    return p


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _finite(o):
    """Replace non-finite floats by None (JSON has no NaN)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically; NaN/inf become null."""
    p = Path(path)
    text = json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=2)

    def w(tmp):
        Path(tmp).write_text(text + "\n")

    _atomic(p, w)
    return p


def note(tag: str, procedure: str, text: str) -> dict[str, str]:
    """One ``methods_notes`` entry: tag ∈ {"reference", "ours", "deviation"}."""
    return {"tag": tag, "procedure": procedure, "text": text}


# --------------------------------------------------------------------------- statistics
def robust_z(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Robust z-score (x − median) / (1.4826·MAD); falls back to 1.2533·mean absolute
    deviation when MAD = 0; all-equal data → z = 0. Returns (z, median, scale)."""
    x = np.asarray(x, dtype=np.float64)
    fin = np.isfinite(x)
    if not fin.any():
        return np.full(x.shape, np.nan), float("nan"), float("nan")
    med = float(np.median(x[fin]))
    dev = np.abs(x[fin] - med)
    scale = 1.4826 * float(np.median(dev))
    if scale <= 0:
        scale = 1.2533 * float(dev.mean())
    if scale <= 0:
        z = np.where(fin, 0.0, np.nan)
        return z, med, 0.0
    return (x - med) / scale, med, scale


def uncertainty_coefficient(indicator: np.ndarray, labels: np.ndarray) -> float:
    """U(X|Y) = I(X; Y) / H(X): the fraction of the entropy of ``indicator`` explained
    by ``labels`` (0 = the labels say nothing about it, 1 = they determine it)."""
    x = np.asarray(indicator).astype(np.int64)
    y = np.asarray(labels).astype(np.int64)
    if x.size == 0:
        return float("nan")
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    joint = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(joint, (xi, yi), 1)
    p = joint / joint.sum()
    px = p.sum(1)
    py = p.sum(0)
    hx = -float(np.sum(px[px > 0] * np.log(px[px > 0])))
    # A constant indicator has H(X) = 0 up to round-off; the ratio would be noise (>1).
    if xi.max() == 0 or hx < 1e-12:
        return 0.0
    nz = p > 0
    mi = float(np.sum(p[nz] * np.log(p[nz] / (px[:, None] * py[None, :])[nz])))
    return min(1.0, max(0.0, mi / hx))


# --------------------------------------------------------------------------- config
#: config.yaml key → keyword argument, per analysis step (``None`` = consumed elsewhere).
CONFIG_KEYS: dict[str, dict[str, str | None]] = {
    "categorize": {"top_k": "k", "exclude_special": "exclude_special",
                   "discover_anchors": "discover", "block_rows": "vocab_block",
                   "exclude_ids": "exclude_ids", "include_ids": "include_ids",
                   "query_block": "query_block", "device": "device"},
    "lens": {"top_k": "k", "layers": "layers", "max_images": "max_images",
             "block_rows": "vocab_block", "device": "device"},
    "probe": {"layers": "layers", "tasks": "tasks", "groups": "groups",
              "test_fraction": "test_fraction", "min_tokens": "min_tokens",
              "min_test_tokens": "min_test_tokens", "bootstrap": "n_bootstrap",
              "max_iter": "max_iter", "C": "C", "seed": "seed", "hit_k": "hit_k",
              "max_tokens": "max_tokens", "pca_components": "pca_components",
              "control_type": "control_type", "include_vision": "include_vision"},
    "align": {"layers": "layers", "groups": "groups", "centring": "centring", "seed": "seed",
              "tasks": "tasks", "max_tokens": "max_tokens", "cka_max_tokens": "cka_max_tokens",
              "extra_words": None, "templates": None, "compositions": None},
}


def config_kwargs(step: str, section: dict[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments of an analysis entry point from its ``config.yaml`` section.

    ``categorize``: the anchor-discovery thresholds (``vit_norm_z``, ``llm_norm_z``,
    ``llm_sink_layers``, ``hub_*``, ... = ``anchors.DEFAULTS``) go into ``discovery``.
    ``align``: ``extra_words``/``templates``/``compositions`` belong to ``build_prompts``
    and are left out. Unknown keys are an error, so config and library cannot drift apart.
    """
    from .anchors import DEFAULTS as DISCOVERY

    keys = CONFIG_KEYS[step]
    out: dict[str, Any] = {}
    discovery: dict[str, Any] = {}
    for k, v in (section or {}).items():
        if step == "categorize" and k in DISCOVERY:
            discovery[k] = v
        elif k in keys:
            if keys[k] is not None:
                out[keys[k]] = v
        else:
            raise KeyError(f"{step}.{k}: not a setting of embedlens.analysis.{step}")
    if discovery:
        out["discovery"] = discovery
    return out
