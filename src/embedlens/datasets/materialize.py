"""Write any data-set source to ``results/datasets/{name}/`` and read it back.

Layout (the contract in docs/architecture.md, "Materialized data set"):
``dataset.json`` (records, label vocabulary, VQA items, bad images), ``images/{id}.png``
(normalised RGB) and, when the set has labels, ``labels.npz`` (task -> (n, G, G) int16).

Atomicity (:func:`embedlens.atomic.atomic_directory`): everything is written to a hidden
sibling ``.{name}.tmp-XXXX/`` and renamed into place only when complete, so a directory
named ``{name}`` is always a complete data set; an exception (or Ctrl-C) midway removes
the temp dir, and a temp dir left by a killed process is removed by the next run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from embedlens.atomic import atomic_directory
from embedlens.datasets.images import DEFAULT_MAX_PIXELS
from embedlens.datasets.sources import (
    ON_BAD_IMAGE,
    SourceData,
    SourceItem,
    folder_source,
    manifest_source,
    skimage_source,
)
from embedlens.datasets.synthetic import LABEL_TASKS, make_examples

# Spec keys per source and their defaults (None = required). Mirrors the data-set part
# of workflow/schemas/config.schema.yaml; checked here too so that `materialize` called
# directly (tests, notebooks) fails with the same kind of message.
SPEC_DEFAULTS: dict[str, dict] = {
    "synthetic": {"n_images": 64, "seed": 0, "image_size": 224, "grid": 8, "p_letter": 0.6},
    "skimage": {"names": None, "limit": None},
    "folder": {"path": None, "recursive": False, "limit": None},
    "manifest": {"path": None},
}
_REQUIRED = {"folder": ("path",), "manifest": ("path",)}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def effective_spec(name: str, spec: dict) -> dict:
    """``spec`` with defaults filled; unknown or missing keys raise naming the key."""
    where = f"datasets.{name}"
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: must be a mapping with a 'source' key, got {type(spec).__name__}")
    source = spec.get("source")
    if source not in SPEC_DEFAULTS:
        raise ValueError(f"{where}.source: must be one of {sorted(SPEC_DEFAULTS)}, got {source!r}")
    allowed = SPEC_DEFAULTS[source]
    unknown = sorted(set(spec) - set(allowed) - {"source"})
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown} for source {source!r}; allowed: {sorted(allowed)}"
        )
    for key in _REQUIRED.get(source, ()):
        if spec.get(key) in (None, ""):
            raise ValueError(f"{where}.{key}: required for source {source!r}")
    out = {"source": source}
    for key, default in allowed.items():
        out[key] = spec.get(key, default)
    return out


@dataclass
class _Collected:
    label_tasks: dict[str, list[str]]
    label_grid: int | None
    items: Iterator[SourceItem]
    bad_images: list[dict]


def _synthetic_items(spec: dict) -> Iterator[SourceItem]:
    for ex in make_examples(
        spec["n_images"], spec["seed"], spec["image_size"], spec["grid"], spec["p_letter"]
    ):
        yield SourceItem(
            image_id=ex.image_id, image=ex.image, caption=ex.caption, source_path=None,
            labels=ex.labels, vqa=ex.vqa,
        )


def _open_source(spec: dict, on_bad_image: str, max_pixels) -> _Collected:
    src = spec["source"]
    if src == "synthetic":
        return _Collected(dict(LABEL_TASKS), spec["grid"], _synthetic_items(spec), [])
    if src == "skimage":
        data: SourceData = skimage_source(spec["names"], spec["limit"], on_bad_image, max_pixels)
    elif src == "folder":
        data = folder_source(spec["path"], spec["recursive"], spec["limit"], on_bad_image, max_pixels)
    else:
        data = manifest_source(spec["path"], on_bad_image, max_pixels)
    return _Collected(data.label_tasks, data.label_grid, iter(data.items), data.bad_images)


def _save_labels(path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez_compressed(path, **arrays)


def _write(tmp: Path, name: str, spec: dict, src: _Collected) -> int:
    (tmp / "images").mkdir()
    records: list[dict] = []
    vqa: list[dict] = []
    labels: dict[str, list[np.ndarray]] = {t: [] for t in src.label_tasks}
    seen: set[str] = set()
    for item in src.items:
        if item.image_id in seen:
            raise ValueError(f"data set {name!r}: duplicate image_id {item.image_id!r}")
        seen.add(item.image_id)
        rel = f"images/{item.image_id}.png"
        # optimize/compress defaults: PNG output is byte-identical for identical pixels.
        item.image.convert("RGB").save(tmp / rel, format="PNG")
        records.append(
            {"image_id": item.image_id, "file": rel, "caption": item.caption,
             "source_path": item.source_path}
        )
        vqa.extend(item.vqa)
        g = src.label_grid
        for task in src.label_tasks:
            arr = None if item.labels is None else item.labels.get(task)
            if arr is None:
                arr = np.full((g, g), -1, dtype=np.int16)
            labels[task].append(np.asarray(arr, dtype=np.int16))
    if not records:
        detail = ""
        if src.bad_images:
            b = src.bad_images[0]
            detail = (f": all {len(src.bad_images)} image(s) were bad, e.g. {b['file']}: "
                      f"{b['reason']}")
        raise ValueError(f"data set {name!r} has no usable images{detail}")
    if src.label_tasks:
        _save_labels(tmp / "labels.npz", {t: np.stack(v) for t, v in labels.items()})
    meta = {
        "name": name,
        "source": spec["source"],
        "spec": spec,
        "n_images": len(records),
        "images": records,
        "label_tasks": src.label_tasks,
        "label_grid": src.label_grid if src.label_tasks else None,
        "vqa": vqa,
        "bad_images": list(src.bad_images),
    }
    with open(tmp / "dataset.json", "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    return len(records)


def materialize(
    name: str,
    spec: dict,
    out_dir: str | os.PathLike,
    on_bad_image: str = "fail",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Path:
    """Materialize data set ``name`` described by ``spec`` into ``out_dir`` (the data
    set's own directory, e.g. ``results/datasets/{name}``) and return it.

    ``spec["source"]`` is one of synthetic / skimage / folder / manifest (keys and
    defaults in :data:`SPEC_DEFAULTS`). An existing data set at ``out_dir`` is replaced;
    a non-empty ``out_dir`` that is not a data set is refused (never deleted).

    Raises
    ------
    ValueError
        a bad name, ``on_bad_image`` or spec (the key named), duplicate image ids, or no
        usable image.
    FileExistsError
        ``out`` exists and is not a materialized data set.
    embedlens.datasets.images.BadImageError
        an unreadable image with ``on_bad_image="fail"``.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"data set name {name!r} must match {_NAME.pattern}")
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
    spec = effective_spec(name, spec)
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory; remove it first")
        if any(out.iterdir()) and not (out / "dataset.json").is_file():
            # A guard against e.g. --out results/datasets (the parent): replacing it
            # would delete every other data set.
            raise FileExistsError(
                f"{out} is a non-empty directory without dataset.json, so not a data set; "
                "refusing to replace it. Pass the data set's own directory "
                "(results/datasets/<name>) or remove it first."
            )
    src = _open_source(spec, on_bad_image, max_pixels)  # config errors before any writing
    with atomic_directory(out) as tmp:
        _write(tmp, name, spec, src)
    return out


# --------------------------------------------------------------------------- reading


@dataclass
class Dataset:
    """A materialized data set, read back by :func:`load_dataset`."""

    path: Path
    name: str
    source: str
    spec: dict
    images: list[dict]
    label_tasks: dict[str, list[str]]
    label_grid: int | None
    labels: dict[str, np.ndarray]  # task -> (n, G, G) int16; {} when unlabelled
    vqa: list[dict]
    bad_images: list[dict]
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {r["image_id"]: i for i, r in enumerate(self.images)}

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_ids(self) -> list[str]:
        return [r["image_id"] for r in self.images]

    def index_of(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise KeyError(f"data set {self.name!r} has no image {image_id!r}") from None

    def image(self, i: int | str) -> Image.Image:
        """Image ``i`` (index or image_id) as a loaded RGB PIL image."""
        idx = self.index_of(i) if isinstance(i, str) else int(i)
        p = self.path / self.images[idx]["file"]
        with Image.open(p) as im:
            return im.convert("RGB")  # convert loads the pixels and detaches from the file


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Read a directory written by :func:`materialize`."""
    d = Path(path)
    meta_path = d / "dataset.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{d} is not a materialized data set (no dataset.json); "
            "create it with `embedlens materialize`"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e.msg}); re-materialize the data set") from e
    for key in ("name", "images", "label_tasks", "vqa"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing key {key!r}; re-materialize the data set")
    n = len(meta["images"])
    label_tasks = meta["label_tasks"] or {}
    grid = meta.get("label_grid")
    labels: dict[str, np.ndarray] = {}
    if label_tasks:
        npz = d / "labels.npz"
        if not npz.is_file():
            raise FileNotFoundError(f"{npz} missing although dataset.json lists label tasks")
        with np.load(npz, allow_pickle=False) as z:
            for task in label_tasks:
                if task not in z.files:
                    raise ValueError(f"{npz}: no array for label task {task!r}")
                arr = z[task]
                if arr.shape != (n, grid, grid):
                    raise ValueError(
                        f"{npz}: {task!r} has shape {arr.shape}, expected {(n, grid, grid)}"
                    )
                labels[task] = arr.astype(np.int16, copy=False)
    return Dataset(
        path=d,
        name=meta["name"],
        source=meta.get("source", ""),
        spec=meta.get("spec", {}),
        images=meta["images"],
        label_tasks=label_tasks,
        label_grid=grid,
        labels=labels,
        vqa=meta["vqa"],
        bad_images=meta.get("bad_images", []),
    )


def token_cells(patch: np.ndarray | int, grid_tokens: np.ndarray | int, label_grid: int) -> np.ndarray:
    """Cell index under the centre of each token: ``floor((p + 0.5) * G / R)``, computed
    in integers (``((2p + 1) G) // (2R)``) so it is exact. The one token-to-cell rule of
    the project (data set labels, analyses). ``patch`` and ``grid_tokens`` (R) broadcast;
    -1 for p outside ``0..R-1``, and where ``R == 0`` (the store's mark of an image whose
    grid is unknown)."""
    p = np.asarray(patch, dtype=np.int64)
    r = np.asarray(grid_tokens, dtype=np.int64)
    cell = ((2 * p + 1) * int(label_grid)) // (2 * np.where(r > 0, r, 1))
    return np.where((r > 0) & (p >= 0) & (p < r), cell, -1)


def token_labels(
    dataset: Dataset,
    image_index,
    patch_row,
    patch_col,
    grid_rows: int,
    grid_cols: int,
) -> dict[str, np.ndarray]:
    """Labels of the tokens at ``(patch_row, patch_col)`` of an ``grid_rows x grid_cols``
    token grid of image(s) ``image_index``: each token takes the label of the cell under
    its centre. Arguments broadcast like numpy indices; tokens with a patch position
    outside the grid (e.g. -1 for non-patch tokens) get -1. Returns task -> int16 array
    (``{}`` for a data set without labels)."""
    if not dataset.labels:
        return {}
    g = int(dataset.label_grid)
    cr = token_cells(patch_row, grid_rows, g)
    cc = token_cells(patch_col, grid_cols, g)
    img = np.asarray(image_index, dtype=np.int64)
    img, cr, cc = np.broadcast_arrays(img, cr, cc)
    valid = (cr >= 0) & (cc >= 0)
    out = {}
    for task, arr in dataset.labels.items():
        vals = arr[img, np.where(valid, cr, 0), np.where(valid, cc, 0)]
        out[task] = np.where(valid, vals, -1).astype(np.int16)
    return out
