"""Patch labels of a materialized data set, mapped onto visual tokens.

A data set labels each cell of a G x G grid per image (``labels.npz``, format in
docs/architecture.md); a token takes the label of the cell under its centre, by the one
rule in :func:`embedlens.datasets.token_cells`. Tokens of images whose patch grid is
unknown get no label, and :func:`grid_unknown_tokens` counts them for the summaries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from embedlens.datasets.materialize import token_cells


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
        out: dict[str, np.ndarray] = {}
        for task, grid in self.grids.items():
            g = grid.shape[1]
            cr = token_cells(patch_row, grid_rows, g)
            cc = token_cells(patch_col, grid_cols, g)
            ok = (img >= 0) & (cr >= 0) & (cc >= 0)
            lab = np.full(img.shape, -1, dtype=np.int64)
            lab[ok] = grid[img[ok], cr[ok], cc[ok]]
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
