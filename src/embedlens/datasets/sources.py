"""Image sources other than the synthetic set: ``skimage``, ``folder``, ``manifest``.

Each source function returns a :class:`SourceData` whose ``items`` is a *lazy*
iterator (a folder of thousands of photos is never held in memory at once). Bad
images follow ``on_bad_image``: ``"fail"`` raises :class:`BadImageError` naming the
file and the reason; ``"skip"`` appends ``{"file", "reason"}`` to
``SourceData.bad_images`` while the items are consumed.

Manifest format (paths are relative to the manifest file):

- JSONL, one object per line::

    {"image": "imgs/a.jpg", "image_id": "a", "caption": "...",
     "labels": {"scene": "indoor", "object": [["cat", null], ["cat", "dog"]]},
     "vqa": [{"question": "...", "choices": ["x", "y"], "answer": "x", "type": "t",
              "answer_prefix": "It is", "choice_texts": ["an x", "a y"]}]}

  A label is either one class name for the whole image (an image-level label, spread
  over every cell) or a G x G nested list of class names (``null`` = no label for that
  cell). All 2-D labels of a manifest must share one G; with only image-level labels
  G = 1 (every token takes the image's label).
- CSV with a header: ``image`` (required), ``image_id``, ``caption``, image-level label
  columns named ``label_<task>`` (empty = no label), and VQA columns ``question``,
  ``choices`` (``"a|b|c"``), ``answer``, ``type``, ``item_id``, ``answer_prefix``,
  ``choice_texts`` (``"a|b|c"``). Several rows may name the same image (one per
  question); the image fields are taken from its first row.

A VQA item's optional ``answer_prefix`` and ``choice_texts`` (one per choice) say how its
answer is phrased when scored: the prompt ends with the prefix and each choice's text
follows it after a space (``embedlens.vqa.item_framing``); without them the bare choices
follow the generation prompt.

Class names per task are sorted (stable across runs); label values are indices into
that list. VQA ``type`` defaults to ``"custom"``; ``item_id`` to ``{image_id}-q{k}``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from embedlens.datasets.images import DEFAULT_MAX_PIXELS, BadImageError, load_rgb

ON_BAD_IMAGE = ("fail", "skip")

#: Extensions a ``folder`` source picks up (case-insensitive); other files are ignored,
#: so README files and the like in an image folder do no harm.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
     ".pbm", ".pnm", ".jfif", ".jpe"}
)

#: The scikit-image sample images we may use, by name -> file in ``skimage/data/``.
#: Only files that ship inside the installed package are used (no download).
SKIMAGE_FILES: dict[str, str] = {
    "astronaut": "astronaut.png",
    "camera": "camera.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "coins": "coins.png",
    "moon": "moon.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "retina": "retina.jpg",
    "motorcycle": "motorcycle_left.png",
    "page": "page.png",
    "text": "text.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "brick": "brick.png",
    "cell": "cell.png",
    "clock": "clock_motion.png",
    "microaneurysms": "microaneurysms.png",
    # Not natural photographs; usable by name, left out of the default list.
    "horse": "horse.png",
    "logo": "logo.png",
    "color": "color.png",
    "phantom": "phantom.png",
    "chessboard": "chessboard_RGB.png",
}
#: The default (``names`` not given): the natural photographs / micrographs, in this order.
SKIMAGE_DEFAULT = [
    "astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon",
    "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle", "page", "text",
    "grass", "gravel", "brick", "cell", "clock", "microaneurysms",
]

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class SourceItem:
    """One usable image of a source."""

    image_id: str
    image: Image.Image  # RGB, already normalised
    caption: str | None = None
    source_path: str | None = None
    labels: dict[str, np.ndarray] | None = None  # task -> (G, G) int16, -1 = no label
    vqa: list[dict] = field(default_factory=list)


@dataclass
class SourceData:
    """A source's images (lazy) plus its label vocabulary and the bad files met so far."""

    items: Iterable[SourceItem]
    label_tasks: dict[str, list[str]] = field(default_factory=dict)
    label_grid: int | None = None
    bad_images: list[dict] = field(default_factory=list)


def _check_on_bad(on_bad_image: str) -> None:
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")


def _load_or_record(path: Path, shown: str, on_bad_image: str, bad: list[dict], max_pixels):
    """Load ``path``; on a bad image raise (fail) or record and return None (skip)."""
    try:
        return load_rgb(path, max_pixels=max_pixels)
    except BadImageError as e:
        if on_bad_image == "fail":
            # Re-raise with the path the user wrote (not an absolute temp path) and the
            # way out, so the message is actionable as it stands.
            raise BadImageError(
                shown, f"{e.reason} (set on_bad_image: skip to leave bad files out)"
            ) from e
        bad.append({"file": shown, "reason": e.reason})
        return None


def sanitize_id(text: str) -> str:
    """A file-name-safe image id from free text (used for ids derived from paths)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return s or "image"


def _unique(image_id: str, seen: set[str]) -> str:
    out, k = image_id, 1
    while out in seen:
        k += 1
        out = f"{image_id}-{k}"
    seen.add(out)
    return out


# --------------------------------------------------------------------------- skimage


def skimage_data_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def bundled_skimage_names() -> list[str]:
    """Names from :data:`SKIMAGE_FILES` whose file is inside the installed package."""
    d = skimage_data_dir()
    return [n for n, f in SKIMAGE_FILES.items() if (d / f).is_file()]


def skimage_source(
    names: list[str] | None = None,
    limit: int | None = None,
    on_bad_image: str = "fail",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> SourceData:
    """scikit-image's bundled sample images (never downloads). Ids are the names."""
    _check_on_bad(on_bad_image)
    d = skimage_data_dir()
    available = bundled_skimage_names()
    if names is None:
        chosen = [n for n in SKIMAGE_DEFAULT if n in available]
    else:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(
                f"skimage: {unknown} not available offline in scikit-image at {d}; "
                f"choose from {available}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"skimage: names lists an image twice: {names}")
        chosen = list(names)
    if limit is not None:
        chosen = chosen[:limit]
    data = SourceData(items=[])

    def gen() -> Iterator[SourceItem]:
        for n in chosen:
            shown = f"skimage.data/{SKIMAGE_FILES[n]}"
            img = _load_or_record(d / SKIMAGE_FILES[n], shown, on_bad_image, data.bad_images, max_pixels)
            if img is not None:
                yield SourceItem(image_id=n, image=img, source_path=shown)

    data.items = gen()
    return data


# --------------------------------------------------------------------------- folder


def list_image_files(root: Path, recursive: bool = False) -> list[Path]:
    """Image files under ``root`` by extension, hidden files skipped, sorted by the
    relative POSIX path (the same order on every OS and file system)."""
    it = root.rglob("*") if recursive else root.iterdir()
    files = []
    for p in it:
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def folder_source(
    path: str | os.PathLike,
    recursive: bool = False,
    limit: int | None = None,
    on_bad_image: str = "fail",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> SourceData:
    """A directory of images. Ids come from the relative path without extension
    (``sub/cat.jpg`` -> ``sub_cat``; a clash gets ``-2``, ``-3``...). ``limit`` caps the
    number of *usable* images; bad files met before it is reached are still reported."""
    _check_on_bad(on_bad_image)
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"folder source: {root} is not a directory (datasets.<name>.path)")
    files = list_image_files(root, recursive)
    if not files:
        raise ValueError(
            f"folder source: no image files in {root}"
            + ("" if recursive else " (sub-folders are not searched; set recursive: true)")
            + f"; extensions looked for: {sorted(IMAGE_EXTENSIONS)}"
        )
    data = SourceData(items=[])

    def gen() -> Iterator[SourceItem]:
        seen: set[str] = set()
        n = 0
        for f in files:
            if limit is not None and n >= limit:
                return
            rel = f.relative_to(root).as_posix()
            shown = str(Path(path) / rel)
            img = _load_or_record(f, shown, on_bad_image, data.bad_images, max_pixels)
            if img is None:
                continue
            n += 1
            image_id = _unique(sanitize_id(rel.rsplit(".", 1)[0]), seen)
            yield SourceItem(image_id=image_id, image=img, source_path=shown)

    data.items = gen()
    return data


# --------------------------------------------------------------------------- manifest


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and line."""


@dataclass
class _Row:
    where: str  # "manifest.csv:3" for messages
    image: str
    image_id: str | None
    caption: str | None
    labels: dict  # task -> str | nested list | None
    vqa: list[dict]


def _read_jsonl(path: Path) -> list[_Row]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for ln, line in enumerate(fh, 1):
            where = f"{path}:{ln}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise ManifestError(f"{where}: each line must be a JSON object")
            unknown = set(obj) - {"image", "image_id", "caption", "labels", "vqa"}
            if unknown:
                raise ManifestError(
                    f"{where}: unknown keys {sorted(unknown)}; allowed: image, image_id, "
                    "caption, labels, vqa"
                )
            if not isinstance(obj.get("image"), str) or not obj["image"]:
                raise ManifestError(f"{where}: 'image' (a path relative to the manifest) is required")
            labels = obj.get("labels") or {}
            if not isinstance(labels, dict):
                raise ManifestError(f"{where}: 'labels' must be an object task -> label")
            vqa = obj.get("vqa") or []
            if not isinstance(vqa, list) or not all(isinstance(q, dict) for q in vqa):
                raise ManifestError(f"{where}: 'vqa' must be a list of objects")
            rows.append(
                _Row(where, obj["image"], obj.get("image_id"), obj.get("caption"), labels, vqa)
            )
    return rows


def _read_csv(path: Path) -> list[_Row]:
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as fh:  # -sig: Excel's BOM
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "image" not in cols:
            raise ManifestError(f"{path}: CSV needs an 'image' column; found columns {cols}")
        known = {"image", "image_id", "caption", "question", "choices", "answer", "type", "item_id",
                 "answer_prefix", "choice_texts"}
        unknown = [c for c in cols if c not in known and not c.startswith("label_")]
        if unknown:
            raise ManifestError(
                f"{path}: unknown columns {unknown}; allowed: {sorted(known)} and label_<task>"
            )
        label_cols = [c for c in cols if c.startswith("label_")]
        for ln, rec in enumerate(reader, 2):  # line 1 is the header
            where = f"{path}:{ln}"
            get = lambda k: (rec.get(k) or "").strip() or None  # noqa: E731
            if not get("image"):
                raise ManifestError(f"{where}: empty 'image'")
            vqa = []
            if get("question"):
                if not get("choices") or not get("answer"):
                    raise ManifestError(f"{where}: a question needs 'choices' (a|b|c) and 'answer'")
                q = {
                    "question": get("question"),
                    "choices": [c.strip() for c in get("choices").split("|")],
                    "answer": get("answer"),
                }
                if get("type"):
                    q["type"] = get("type")
                if get("item_id"):
                    q["item_id"] = get("item_id")
                if get("answer_prefix"):
                    q["answer_prefix"] = get("answer_prefix")
                if get("choice_texts"):
                    q["choice_texts"] = [c.strip() for c in get("choice_texts").split("|")]
                vqa.append(q)
            labels = {c[len("label_"):]: get(c) for c in label_cols}
            rows.append(_Row(where, get("image"), get("image_id"), get("caption"), labels, vqa))
    return rows


def _merge_rows(rows: list[_Row]) -> list[_Row]:
    """Rows naming the same image (same image_id, else same path) become one image."""
    merged: dict[tuple, _Row] = {}
    for r in rows:
        key = ("id", r.image_id) if r.image_id else ("path", r.image)
        if key in merged:
            first = merged[key]
            if first.image != r.image:
                raise ManifestError(
                    f"{r.where}: image_id {r.image_id!r} already used for {first.image!r} "
                    f"({first.where}); image ids must be unique"
                )
            first.vqa.extend(r.vqa)
        else:
            merged[key] = _Row(r.where, r.image, r.image_id, r.caption, dict(r.labels), list(r.vqa))
    return list(merged.values())


def _label_grid(rows: list[_Row]) -> int:
    grid = None
    for r in rows:
        for task, lab in r.labels.items():
            if isinstance(lab, list):
                g = len(lab)
                if g == 0 or not all(isinstance(x, list) and len(x) == g for x in lab):
                    raise ManifestError(
                        f"{r.where}: labels.{task} must be a square G x G list of lists "
                        "(or one class name for the whole image)"
                    )
                if grid is not None and g != grid:
                    raise ManifestError(
                        f"{r.where}: labels.{task} is {g} x {g} but earlier labels are "
                        f"{grid} x {grid}; one label grid per manifest"
                    )
                grid = g
            elif lab is not None and not isinstance(lab, str):
                raise ManifestError(
                    f"{r.where}: labels.{task} must be a class name, null, or a G x G list"
                )
    return grid or 1


def _cells(lab, where: str, task: str) -> Iterator[str | None]:
    for row in lab:
        for v in row:
            if v is not None and not isinstance(v, str):
                raise ManifestError(f"{where}: labels.{task} cells must be class names or null, got {v!r}")
            yield v


def manifest_source(
    path: str | os.PathLike,
    on_bad_image: str = "fail",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> SourceData:
    """Images listed in a CSV or JSONL manifest (format in the module docstring)."""
    _check_on_bad(on_bad_image)
    mpath = Path(path)
    if not mpath.is_file():
        raise FileNotFoundError(f"manifest source: {mpath} does not exist (datasets.<name>.path)")
    suffix = mpath.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = _read_jsonl(mpath)
    elif suffix == ".csv":
        rows = _read_csv(mpath)
    else:
        raise ManifestError(f"{mpath}: manifest must end in .csv or .jsonl, got {suffix!r}")
    rows = _merge_rows(rows)
    if not rows:
        raise ManifestError(f"{mpath}: manifest lists no images")

    # Ids first (all of them, before any image is read) so a clash fails fast.
    seen: set[str] = set()
    ids = []
    for r in rows:
        if r.image_id is not None:
            if not _SAFE_ID.match(r.image_id):
                raise ManifestError(
                    f"{r.where}: image_id {r.image_id!r} must match {_SAFE_ID.pattern} "
                    "(it becomes a file name)"
                )
            if r.image_id in seen:
                raise ManifestError(f"{r.where}: duplicate image_id {r.image_id!r}")
            seen.add(r.image_id)
    for r in rows:
        ids.append(r.image_id or _unique(sanitize_id(r.image.rsplit(".", 1)[0]), seen))

    grid = _label_grid(rows)
    tasks: dict[str, set[str]] = {}
    for r in rows:
        for task, lab in r.labels.items():
            vals = tasks.setdefault(task, set())
            if isinstance(lab, str):
                vals.add(lab)
            elif isinstance(lab, list):
                vals.update(v for v in _cells(lab, r.where, task) if v is not None)
    # A task with no value anywhere (an empty label column) carries nothing to probe.
    label_tasks = {t: sorted(v) for t, v in sorted(tasks.items()) if v}

    # VQA items: validated up front, with defaults filled.
    all_vqa: list[list[dict]] = []
    for r, image_id in zip(rows, ids):
        items = []
        for k, q in enumerate(r.vqa):
            where = f"{r.where}: vqa[{k}]"
            unknown = set(q) - {"question", "choices", "answer", "type", "item_id", "answer_prefix",
                                "choice_texts"}
            if unknown:
                raise ManifestError(f"{where}: unknown keys {sorted(unknown)}")
            if not isinstance(q.get("question"), str) or not q["question"].strip():
                raise ManifestError(f"{where}: 'question' is required")
            choices = q.get("choices")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise ManifestError(f"{where}: 'choices' must list at least two strings")
            if len(set(choices)) != len(choices):
                raise ManifestError(f"{where}: 'choices' has duplicates: {choices}")
            if q.get("answer") not in choices:
                raise ManifestError(f"{where}: answer {q.get('answer')!r} is not one of the choices {choices}")
            item = {
                "item_id": str(q.get("item_id") or f"{image_id}-q{k}"),
                "image_id": image_id,
                "type": str(q.get("type") or "custom"),
                "question": q["question"],
                "choices": list(choices),
                "answer": q["answer"],
            }
            if q.get("answer_prefix") is not None:
                if not isinstance(q["answer_prefix"], str):
                    raise ManifestError(f"{where}: 'answer_prefix' must be a string")
                item["answer_prefix"] = q["answer_prefix"]
            if q.get("choice_texts") is not None:
                texts = q["choice_texts"]
                if (not isinstance(texts, list) or len(texts) != len(choices)
                        or not all(isinstance(t, str) and t.strip() for t in texts)):
                    raise ManifestError(f"{where}: 'choice_texts' must list one non-empty string per "
                                        f"choice ({len(choices)}), got {texts!r}")
                item["choice_texts"] = list(texts)
            items.append(item)
        all_vqa.append(items)
    item_ids = [q["item_id"] for items in all_vqa for q in items]
    if len(set(item_ids)) != len(item_ids):
        dup = sorted({i for i in item_ids if item_ids.count(i) > 1})
        raise ManifestError(f"{mpath}: duplicate VQA item_id(s) {dup[:5]}")

    data = SourceData(items=[], label_tasks=label_tasks, label_grid=grid if label_tasks else None)
    base = mpath.parent

    def labels_of(r: _Row) -> dict[str, np.ndarray] | None:
        if not label_tasks:
            return None
        out = {}
        for task, names in label_tasks.items():
            arr = np.full((grid, grid), -1, dtype=np.int16)
            lab = r.labels.get(task)
            if isinstance(lab, str):
                arr[:] = names.index(lab)
            elif isinstance(lab, list):
                for i, v in enumerate(_cells(lab, r.where, task)):
                    if v is not None:
                        arr[i // grid, i % grid] = names.index(v)
            out[task] = arr
        return out

    def gen() -> Iterator[SourceItem]:
        for r, image_id, vqa in zip(rows, ids, all_vqa):
            shown = str(mpath.parent / r.image)
            img = _load_or_record(base / r.image, shown, on_bad_image, data.bad_images, max_pixels)
            if img is None:
                continue
            yield SourceItem(
                image_id=image_id,
                image=img,
                caption=r.caption,
                source_path=shown,
                labels=labels_of(r),
                vqa=vqa,
            )

    data.items = gen()
    return data


SOURCE_FUNCTIONS: dict[str, Callable[..., SourceData]] = {
    "skimage": skimage_source,
    "folder": folder_source,
    "manifest": manifest_source,
}


def manifest_has_vqa(path: str | Path) -> bool:
    """Whether a manifest carries any multiple-choice item (cheap: no image is read).

    The workflow asks this at planning time to know whether a compress job exists.
    A missing or unreadable manifest answers False; materializing it reports the error.
    """
    path = Path(path)
    try:
        rows = _read_csv(path) if path.suffix.lower() == ".csv" else _read_jsonl(path)
    except (OSError, ManifestError):
        return False
    return any(r.vqa for r in rows)
