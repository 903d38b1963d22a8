"""The LLM vocabulary as the analyses see it, and the streamed top-k search against it.

:class:`Vocab` holds the input-embedding matrix E (V, d) with its token strings;
:class:`VocabIndex` finds the k nearest rows (cosine or logits) of many query vectors
without ever holding a (queries x V) matrix. Every lens (h[0] categorization, the
embedding/logit lens, hit@k) goes through it (docs/methods.md §1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embedlens.runtime import progress_bar, resolve_device
from embedlens.store import display_token

_EPS = 1e-12

#: ``VocabIndex(dtype=...)`` / ``categorize(similarity_dtype=...)`` → the dtype of the products.
SIMILARITY_DTYPES = {"float32": torch.float32, "float16": torch.float16}

# Markers tokenizers put in front of / around a word piece (sentencepiece "▁", GPT-2 byte
# level "Ġ"/"Ċ", WordPiece "##").
_WORD_MARKERS = ("▁", "Ġ", "Ċ", "##", " ")


@dataclass
class Vocab:
    """The LLM input-embedding matrix with its token strings.

    ``embedding`` (V, d) float32; ``strings`` length V, the raw pieces ("▁jav", "Ġred": what
    matching and anchors use); ``is_special`` (V,) bool (added/special tokens as the
    tokenizer marks them); ``texts`` length V, the pieces decoded for reading ("jav",
    "red"; default: ``embedlens.store.display_token`` of each piece).

    Raises
    ------
    ValueError
        the lengths of ``strings``, ``is_special`` or ``texts`` differ from the rows.
    """

    embedding: np.ndarray
    strings: list[str]
    is_special: np.ndarray
    texts: list[str] | None = None

    def __post_init__(self) -> None:
        self.embedding = np.asarray(self.embedding)
        self.strings = [str(s) for s in self.strings]
        self.is_special = np.asarray(self.is_special, dtype=bool)
        self.texts = ([display_token(s) for s in self.strings] if self.texts is None
                      else [str(s) for s in self.texts])
        v = self.embedding.shape[0]
        if len(self.strings) != v or self.is_special.shape != (v,) or len(self.texts) != v:
            raise ValueError(
                f"vocab: embedding has {v} rows but {len(self.strings)} strings, {len(self.texts)} texts "
                f"and {self.is_special.shape} special flags"
            )

    @property
    def size(self) -> int:
        return int(self.embedding.shape[0])


def load_vocab(vocab: Any) -> Vocab:
    """Accept a :class:`Vocab`, a path to ``vocab.zarr`` or an ``xarray.Dataset`` in the
    documented vocabulary-store format (``embedding (vocab, dim)``, coords
    ``token_string``, ``token_text``, ``is_special``; a store without ``token_text``, written
    before it existed, gets ``display_token`` of each piece)."""
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
        texts = ([str(s) for s in vocab["token_text"].values] if "token_text" in vocab.variables else None)
        return Vocab(emb, strings, special, texts)
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

    ``dtype``: "float32" (default), or "float16": rows and queries are normalized in float32,
    then rounded to float16 and multiplied in float16, as code running a float16 model
    computes the similarity (LLaVA-1.5's released code); scores come back as float32.
    Memory: one copy of the matrix (in ``dtype``, on ``device``) plus one
    ``query_block × vocab_block`` score block.

    Raises
    ------
    ValueError
        a matrix that is not 2-D, excluded ids outside it, every row excluded, an unknown
        ``dtype``.
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
        dtype: str = "float32",
    ) -> None:
        if dtype not in SIMILARITY_DTYPES:
            raise ValueError(f"similarity dtype must be one of {list(SIMILARITY_DTYPES)}, got {dtype!r}")
        self.dtype = SIMILARITY_DTYPES[dtype]
        self.device = torch.device(resolve_device(device))
        if isinstance(matrix, torch.Tensor):
            w = matrix.detach().to(device=self.device, dtype=torch.float32, copy=True)
        else:
            w = torch.from_numpy(np.array(matrix, dtype=np.float32, copy=True)).to(self.device)
        if w.ndim != 2:
            raise ValueError(f"vocabulary matrix must be 2-D, got shape {tuple(w.shape)}")
        if normalize:  # in place: a single copy of E in memory
            w.div_(torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min_(_EPS))
        self.matrix = w if self.dtype == torch.float32 else w.to(self.dtype)
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

    def fit_query_block(self, requested: int, n: int) -> int:
        """Query rows per block: ``requested`` on the CPU; on a GPU as many as fit in half of
        its free memory (at least ``requested``, at most ``n``), so that each pass over the
        vocabulary serves as many queries as the device holds: the vocabulary blocks are
        streamed once per query block, and a large GPU is idle on small matmuls.
        Per row: a float32 score row of one vocabulary block, with the log-sum-exp and top-k
        temporaries (3 x vocab_block), and the query before and after normalizing (2 x d).
        The results do not depend on the block (every row is searched on its own)."""
        requested = max(1, int(requested))
        if self.device.type != "cuda" or n <= requested:
            return requested
        free, _ = torch.cuda.mem_get_info(self.device)
        per_row = 4 * (3 * self.vocab_block + 2 * self.dim)
        return max(requested, min(int(n), int(0.5 * free) // per_row))

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
        torch, a dask-less xarray ``.values``); cast to float32 block by block, blocks of
        ``query_block`` rows (on a GPU more: `fit_query_block`).
        ``on_block(m)`` is called after each query block of m rows (progress reporting).
        """
        n = len(queries)
        query_block = self.fit_query_block(query_block, n)
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
            q = q.to(self.dtype)
            m = q.shape[0]
            best_v = torch.full((m, k_eff), -math.inf, device=self.device)
            best_i = torch.full((m, k_eff), -1, dtype=torch.int64, device=self.device)
            if logsumexp:
                run_max = torch.full((m,), -math.inf, device=self.device)
                run_sum = torch.zeros(m, device=self.device)
            for b, start in enumerate(range(0, self.size, self.vocab_block)):
                stop = min(start + self.vocab_block, self.size)
                s = (q @ self.matrix[start:stop].T).float()
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
