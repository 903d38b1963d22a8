"""Small local stand-ins of standard benchmarks, in the hub data sets' column layout.

Each stand-in is a folder ``<dir>/data/<split>-00000-of-00001.parquet`` (images embedded
as PNG bytes, ``{"bytes", "path"}``, with the ``datasets`` feature metadata), so the
*official* lmms-eval task reads it with ``dataset_path`` pointed at the folder, exactly as
it reads the real data set. Images come from the synthetic generator
(:mod:`embedlens.datasets.synthetic`), whose every shape, colour, letter and exact box is
known, so every answer is known too. Deterministic: the same seed and size give the same
files' content.

Stand-ins (name -> lmms-eval task, split, columns the official task code reads):

- ``pope`` -> ``pope`` (``test``): ``question``, ``answer`` yes/no, ``question_id``,
  ``image_source``, ``category``, ``image``; two questions per image (the shape or letter
  present: yes; one absent: no), balanced.
- ``mme`` -> ``mme`` (``test``): ``question_id`` = ``<category>/<image file>`` (as in MME),
  ``question`` ending "Please answer yes or no.", ``answer`` Yes/No, ``category``
  (``color``, ``existence``, ``OCR``, all perception), ``image``; one yes and one no
  question per image.
- ``textvqa`` -> ``textvqa_val`` (``validation``): ``question``, ``answers`` (10 human-style
  strings, some matching only after the official normalization), ``ocr_tokens``,
  ``image_id``, ``question_id``, ``image``; what letter (or, without one, what shape).
- ``mmstar`` -> ``mmstar`` (``val``): ``index``, ``question`` with "Options: A: ..., B: ...",
  ``answer`` letter, ``category``/``l2_category`` (fine-grained perception: recognition,
  localization), ``image``.
- ``refcoco`` -> ``refcoco_bbox_rec_val`` (``val``): ``question_id``, ``answer`` (list of
  referring expressions), ``bbox`` [x, y, w, h] in pixels (COCO; the task normalizes it),
  ``file_name``, ``image_id``, ``image``; the shape, and the letter when there is one.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from embedlens.datasets.synthetic import COLOUR_NAMES, LETTERS, SHAPE_NAMES, SyntheticExample, make_examples

#: stand-in -> (lmms-eval task, split)
STANDINS: dict[str, tuple[str, str]] = {
    "pope": ("pope", "test"),
    "mme": ("mme", "test"),
    "textvqa": ("textvqa_val", "validation"),
    "mmstar": ("mmstar", "val"),
    "refcoco": ("refcoco_bbox_rec_val", "val"),
}

# Each stand-in draws its own images: synthetic seed = benchmarks.standins.seed + offset.
_SEED_OFFSET = {name: i for i, name in enumerate(STANDINS)}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _other(rng: np.random.Generator, options: list[str], exclude: str) -> str:
    pool = [o for o in options if o != exclude]
    return pool[int(rng.integers(len(pool)))]


def _pope(examples: list[SyntheticExample], seed: int) -> list[dict]:
    rows = []
    for i, ex in enumerate(examples):
        rng = np.random.default_rng([seed, 1, i])
        if ex.letter is not None and i % 2 == 1:
            present, absent = f"letter {ex.letter}", f"letter {_other(rng, LETTERS, ex.letter)}"
        else:
            present, absent = ex.shape, _other(rng, SHAPE_NAMES, ex.shape)
        pair = [("yes", present), ("no", absent)]
        if i % 2 == 1:  # alternate the order so position says nothing about the answer
            pair.reverse()
        for answer, obj in pair:
            n = len(rows)
            rows.append({"id": str(n), "question_id": str(n), "question": f"Is there a {obj} in the image?",
                         "answer": answer, "image_source": ex.image_id, "category": "random",
                         "image": ex.image})
    return rows


def _mme(examples: list[SyntheticExample], seed: int) -> list[dict]:
    rows = []
    suffix = " Please answer yes or no."
    for i, ex in enumerate(examples):
        rng = np.random.default_rng([seed, 2, i])
        category = ("color", "existence", "OCR")[i % 3]
        if category == "OCR" and ex.letter is None:
            category = "existence"
        if category == "color":
            qs = [(f"Is the {ex.shape} {ex.colour}?", "Yes"),
                  (f"Is the {ex.shape} {_other(rng, COLOUR_NAMES, ex.colour)}?", "No")]
        elif category == "OCR":
            qs = [(f"Is the letter in the image {ex.letter}?", "Yes"),
                  (f"Is the letter in the image {_other(rng, LETTERS, ex.letter)}?", "No")]
        else:
            qs = [(f"Is there a {ex.shape} in this image?", "Yes"),
                  (f"Is there a {_other(rng, SHAPE_NAMES, ex.shape)} in this image?", "No")]
        for question, answer in qs:
            rows.append({"question_id": f"{category}/{ex.image_id}.png", "question": question + suffix,
                         "answer": answer, "category": category, "image": ex.image})
    return rows


def _textvqa(examples: list[SyntheticExample], seed: int) -> list[dict]:
    rows = []
    for i, ex in enumerate(examples):
        rng = np.random.default_rng([seed, 3, i])
        if ex.letter is not None:
            question, truth, wrong = "what letter is in the image?", ex.letter, _other(rng, LETTERS, ex.letter)
            variants = [truth, truth.lower(), f"the letter {truth}", f"{truth}."]
        else:
            question, truth, wrong = "what shape is in the image?", ex.shape, _other(rng, SHAPE_NAMES, ex.shape)
            variants = [truth, f"a {truth}", truth.capitalize(), f"{truth}."]
        # Ten annotator answers: mostly the truth in forms the official normalization maps
        # together (case, article, punctuation), one other phrasing, one or two wrong ones.
        n_wrong = 1 + int(rng.integers(2))
        answers = [variants[int(k)] for k in rng.integers(len(variants), size=10 - n_wrong)] + [wrong] * n_wrong
        rows.append({"image_id": ex.image_id, "question_id": i, "question": question,
                     "question_tokens": question.rstrip("?").split(), "answers": answers,
                     "ocr_tokens": [ex.letter] if ex.letter else [], "image_classes": [ex.shape],
                     "image_width": ex.image.width, "image_height": ex.image.height, "set_name": "val",
                     "image": ex.image})
    return rows


def _where(ex: SyntheticExample, grid: int) -> str:
    r, c, size = ex.shape_block
    vertical = "top" if r + size / 2 <= grid / 2 else "bottom"
    horizontal = "left" if c + size / 2 <= grid / 2 else "right"
    return f"{vertical} {horizontal}"


def _mmstar(examples: list[SyntheticExample], seed: int, grid: int = 8) -> list[dict]:
    rows = []
    places = ["top left", "top right", "bottom left", "bottom right"]
    for i, ex in enumerate(examples):
        rng = np.random.default_rng([seed, 4, i])
        if i % 2 == 0:
            question, truth, pool, l2 = "What shape is in the image?", ex.shape, SHAPE_NAMES, "recognition"
        else:
            question, truth, pool, l2 = f"Where is the {ex.shape} in the image?", _where(ex, grid), places, "localization"
        options = [truth] + [o for o in rng.permutation([o for o in pool if o != truth])[:3]]
        options = [str(o) for o in rng.permutation(options)]
        letters = "ABCD"
        text = f"{question}\nOptions: " + ", ".join(f"{letters[k]}: {o}" for k, o in enumerate(options))
        rows.append({"index": i, "question": text, "answer": letters[options.index(truth)],
                     "category": "fine-grained perception", "l2_category": l2,
                     "meta_info": json.dumps({"source": "embedlens synthetic", "image_id": ex.image_id}),
                     "image": ex.image})
    return rows


def _refcoco(examples: list[SyntheticExample], seed: int) -> list[dict]:
    rows = []
    for ex in examples:
        objects = [("shape", [f"{ex.colour} {ex.shape}"], ex.shape_box)]
        if ex.letter is not None:
            objects.append(("letter", [f"{ex.letter_colour} letter {ex.letter}"], ex.letter_box))
        for what, expressions, (x, y, w, h) in objects:
            rows.append({"question_id": f"{ex.image_id}-{what}", "image_id": ex.image_id,
                         "file_name": f"{ex.image_id}.png",
                         "question": "Please carefully observe the area circled in the image and come up "
                                     "with a caption for the area.",
                         "answer": expressions, "bbox": [float(x), float(y), float(w), float(h)],
                         "segmentation": [float(x), float(y), float(x + w), float(y), float(x + w),
                                          float(y + h), float(x), float(y + h)],
                         "iscrowd": 0, "image": ex.image})
    return rows


_BUILDERS: dict[str, Callable[[list[SyntheticExample], int], list[dict]]] = {
    "pope": _pope, "mme": _mme, "textvqa": _textvqa, "mmstar": _mmstar, "refcoco": _refcoco,
}


def standin_rows(name: str, n_images: int, seed: int) -> list[dict]:
    """The rows of stand-in ``name`` (images as PIL), deterministic from ``seed``.

    Raises:
        KeyError: unknown stand-in (the message lists the known ones).
    """
    if name not in _BUILDERS:
        raise KeyError(f"unknown stand-in {name!r}; known: {sorted(_BUILDERS)}")
    seed = int(seed) + _SEED_OFFSET[name]
    return _BUILDERS[name](make_examples(int(n_images), seed), seed)


def write_standin(name: str, out: str | Path, *, n_images: int, seed: int) -> dict[str, Any]:
    """Write stand-in ``name`` to ``out`` (atomically) in the hub layout; returns its
    ``standin.json`` record: name, lmms-eval task, split, seed, n_images, n_docs, columns."""
    import datasets

    from embedlens.atomic import atomic_directory

    task, split = STANDINS[name]
    rows = standin_rows(name, n_images, seed)
    for k, row in enumerate(rows):
        image_id = row.get("image_id") or row.get("image_source") or f"{name}-{k:05d}"
        row["image"] = {"bytes": _png(row["image"]), "path": f"{image_id}.png"}
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    features = datasets.Features({key: _feature(key, values) for key, values in columns.items()})
    record = {"name": name, "task": task, "split": split, "seed": int(seed), "n_images": int(n_images),
              "n_docs": len(rows), "columns": list(columns)}
    with atomic_directory(out) as tmp:
        (tmp / "data").mkdir()
        ds = datasets.Dataset.from_dict(columns, features=features)
        ds.to_parquet(str(tmp / "data" / f"{split}-00000-of-00001.parquet"))
        (tmp / "standin.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _feature(key: str, values: list):
    import datasets

    if key == "image":
        return datasets.Image()
    first = values[0]
    if isinstance(first, list):
        inner = datasets.Value("float64") if key in ("bbox", "segmentation") else datasets.Value("string")
        return datasets.List(inner)
    if isinstance(first, (bool, np.bool_)):
        return datasets.Value("bool")
    if isinstance(first, (int, np.integer)):
        return datasets.Value("int64")
    if isinstance(first, float):
        return datasets.Value("float64")
    return datasets.Value("string")


def build_standins(out_dir: str | Path, names: list[str] | None = None, *, seed: int,
                   n_images: Mapping[str, int]) -> list[dict[str, Any]]:
    """The ``embedlens standins`` step: write each stand-in to ``<out_dir>/<name>``.

    Args:
        out_dir: parent folder (the workflow's ``results/benchmarks/data``).
        names: stand-ins to build (``None`` = all of :data:`STANDINS`).
        seed: ``benchmarks.standins.seed``.
        n_images: ``benchmarks.standins.n_images``: stand-in -> images.

    Raises:
        KeyError: a name without an ``n_images`` entry, or an unknown stand-in.
    """
    out = []
    for name in names or list(STANDINS):
        if name not in STANDINS:
            raise KeyError(f"unknown stand-in {name!r}; known: {sorted(STANDINS)}")
        if name not in n_images:
            raise KeyError(f"benchmarks.standins.n_images has no entry for {name!r}")
        out.append(write_standin(name, Path(out_dir) / name, n_images=n_images[name], seed=seed))
    return out
