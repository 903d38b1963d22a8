"""The deterministic synthetic data set: one coloured shape and, 60 % of the time, a
capital letter in another colour, on a light background, aligned to a G x G cell grid.

Why a cell grid: every object occupies a block of whole cells, so the label of each
cell is known exactly from the rendered pixels instead of being guessed from a
bounding box. Objects are painted with *binary* masks (no anti-aliasing), so the
pixels and the labels are the same thing.

Per-cell labelling rule (the "coverage rule"), with ``coverage`` = share of the
cell's pixels painted by the object:

- shape cells: ``coverage >= SHAPE_MIN_COVERAGE`` (0.5) -> shape / colour / object;
- letter cells: ``coverage >= LETTER_MIN_COVERAGE`` (0.1; glyph strokes are thin, so
  a cell that holds a clear piece of the letter counts) -> character / colour / object;
- cells with no object pixel at all -> background (every other task ``-1``);
- cells with a little object but below the threshold are *ambiguous*: ``-1`` in every
  task, including ``background``, so probes never train on a half-object cell.

Determinism: image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so the
same seed gives byte-identical images, and ``make_examples(10, s)`` is a prefix of
``make_examples(20, s)``. (Glyph shapes come from Pillow's bundled font; a different
Pillow/FreeType build may change letter pixels by a few pixels.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Well-separated, nameable colours (RGB). Kept away from the light background
# (every background channel is >= 226), so no object colour can be mistaken for it.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (225, 195, 0),
    "green": (35, 150, 60),
    "blue": (35, 85, 215),
    "purple": (125, 55, 185),
    "pink": (240, 105, 185),
    "brown": (125, 75, 35),
}
COLOUR_NAMES: list[str] = list(COLOURS)
SHAPE_NAMES: list[str] = ["circle", "square", "triangle", "star", "cross", "diamond"]
LETTERS: list[str] = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
BACKGROUND_NAMES: list[str] = ["object", "background"]

#: label task -> class names (index = label value); the order is part of the contract.
LABEL_TASKS: dict[str, list[str]] = {
    "colour": COLOUR_NAMES,
    "shape": SHAPE_NAMES,
    "character": LETTERS,
    "background": BACKGROUND_NAMES,
}

SHAPE_MIN_COVERAGE = 0.5
LETTER_MIN_COVERAGE = 0.1

QUESTIONS: dict[str, str] = {
    "shape": "What shape is in the image?",
    "colour": "What colour is the shape?",
    "character": "Which letter is in the image?",
    "letter_colour": "What colour is the letter?",
}
#: How an answer to each question is phrased when it is scored (``embedlens.vqa``): the
#: text after the generation prompt that the answer continues, and the template of each
#: choice's text (``{c}`` = the choice, ``{art}`` = its article "a"/"an"). Picked for
#: embedlens-mini among 2-4 phrasings per type on validation images (synthetic seed
#: 999998, disjoint from training and evaluation): see ``src/embedlens/mini/MODEL_CARD.md``.
#: Items carry the result (``answer_prefix``, ``choice_texts``), so ``eval-model`` and the
#: compression benchmark score them the same way.
ANSWER_FORMAT: dict[str, tuple[str, str]] = {
    "shape": ("It is a", "{c}"),
    "colour": ("The shape is", "{c}"),
    "character": ("It is the letter", "{c}"),
    "letter_colour": ("It is", "{art} {c} letter"),
}


def article(word: str) -> str:
    """The indefinite article of ``word`` ("an orange", "a red")."""
    return "an" if word[0].lower() in "aeiou" else "a"


_VQA_CHOICES: dict[str, list[str]] = {
    "shape": SHAPE_NAMES,
    "colour": COLOUR_NAMES,
    "character": LETTERS,
    "letter_colour": COLOUR_NAMES,
}


@dataclass
class SyntheticExample:
    """One synthetic image with its exact labels, caption and VQA items."""

    image_id: str
    image: Image.Image  # RGB, image_size x image_size
    caption: str
    labels: dict[str, np.ndarray]  # task -> (G, G) int16, -1 = no label
    vqa: list[dict]
    # Ground truth, handy for training/evaluating without parsing the caption.
    shape: str = ""
    colour: str = ""
    letter: str | None = None
    letter_colour: str | None = None
    shape_block: tuple[int, int, int] = (0, 0, 0)  # (row, col, size) in cells
    letter_block: tuple[int, int, int] | None = None
    # Exact boxes of the painted pixels, (x, y, width, height) in pixels with (x, y) the
    # top-left pixel edge (COCO's bbox convention): the tight box of the binary mask.
    shape_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    letter_box: tuple[int, int, int, int] | None = None
    meta: dict = field(default_factory=dict)


def _cell_edges(image_size: int, grid: int) -> np.ndarray:
    # Integer pixel edges of the G cells; exact (equal cells) when G divides the size.
    return (np.arange(grid + 1) * image_size) // grid


def _cell_coverage(mask: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of each cell's pixels that are True in ``mask`` -> (G, G) float."""
    g = len(edges) - 1
    cov = np.zeros((g, g), dtype=np.float64)
    for r in range(g):
        for c in range(g):
            block = mask[edges[r] : edges[r + 1], edges[c] : edges[c + 1]]
            cov[r, c] = block.mean() if block.size else 0.0
    return cov


def _shape_mask(kind: str, w: int, h: int) -> np.ndarray:
    """Binary mask (h, w) of a shape filling a w x h box (drawn without anti-aliasing)."""
    img = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(img)
    x1, y1 = w - 1, h - 1
    cx, cy = (w - 1) / 2, (h - 1) / 2
    if kind == "circle":
        d.ellipse([0, 0, x1, y1], fill=255)
    elif kind == "square":
        d.rectangle([0, 0, x1, y1], fill=255)
    elif kind == "triangle":
        d.polygon([(cx, 0), (x1, y1), (0, y1)], fill=255)
    elif kind == "diamond":
        d.polygon([(cx, 0), (x1, cy), (cx, y1), (0, cy)], fill=255)
    elif kind == "cross":
        # Arms 0.42 of the box wide: thick enough that a 2 x 2 block still has
        # cells above the 0.5 coverage threshold.
        aw, ah = 0.21 * w, 0.21 * h
        d.rectangle([cx - aw, 0, cx + aw, y1], fill=255)
        d.rectangle([0, cy - ah, x1, cy + ah], fill=255)
    elif kind == "star":
        # Five-pointed star with a fat inner radius (reads as a star even when small),
        # its points' bounding box stretched onto the whole box.
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.5
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        sx, sy = x1 / (max(xs) - min(xs)), y1 / (max(ys) - min(ys))
        d.polygon([((x - min(xs)) * sx, (y - min(ys)) * sy) for x, y in pts], fill=255)
    else:  # pragma: no cover - guarded by SHAPE_NAMES
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPE_NAMES}")
    return np.asarray(img) >= 128


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow >= 10.1 ships a scalable font (Aileron) behind load_default(size=...);
    # older builds or builds without FreeType return a small bitmap font, which still
    # works because glyphs are rescaled to their block below (just blockier).
    try:
        return ImageFont.load_default(size=160)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


@functools.lru_cache(maxsize=4096)
def _glyph_mask(letter: str, w: int, h: int) -> np.ndarray:
    """Binary (h, w) mask of a bold ``letter`` scaled to fit a w x h box, centred."""
    font = _font()
    # The regular weight is emboldened with a stroke in the same "ink".
    is_ft = isinstance(font, ImageFont.FreeTypeFont)
    stroke = 12 if is_ft else 0
    l, t, r, b = font.getbbox(letter, stroke_width=stroke)
    canvas = Image.new("L", (r - l + 4, b - t + 4), 0)
    ImageDraw.Draw(canvas).text(
        (2 - l, 2 - t), letter, font=font, fill=255, stroke_width=stroke, stroke_fill=255
    )
    bbox = canvas.getbbox()
    glyph = canvas.crop(bbox) if bbox else canvas
    gw, gh = glyph.size
    scale = min(w / gw, h / gh)
    tw, th = max(1, round(gw * scale)), max(1, round(gh * scale))
    glyph = glyph.resize((tw, th), Image.Resampling.BILINEAR)
    out = np.zeros((h, w), dtype=bool)
    oy, ox = (h - th) // 2, (w - tw) // 2
    out[oy : oy + th, ox : ox + tw] = np.asarray(glyph) >= 128
    return out


def _caption(colour: str, shape: str, letter: str | None, letter_colour: str | None) -> str:
    text = f"{article(colour).capitalize()} {colour} {shape}"
    if letter is not None:
        text += f" and {article(letter_colour)} {letter_colour} letter {letter}"
    return text + "."


def _block_range(grid: int) -> tuple[range, range]:
    # Shape blocks 3x3..4x4 and letter blocks 2x2..3x3 on the default 8 x 8 grid;
    # scaled for other grids so objects keep their relative size. Shapes start at
    # 3x3 because a 2x2 star or diamond covers no cell by half (no shape label at all).
    smin = max(2, round(3 * grid / 8))
    smax = max(smin, round(grid / 2))
    lmin = max(2, round(grid / 4))
    lmax = max(lmin, round(3 * grid / 8))
    return range(smin, smax + 1), range(lmin, lmax + 1)


def _overlaps(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    ar, ac, asz = a
    br, bc, bsz = b
    return not (ar + asz <= br or br + bsz <= ar or ac + asz <= bc or bc + bsz <= ac)


def _make_one(index: int, seed: int, image_size: int, grid: int, p_letter: float) -> SyntheticExample:
    rng = np.random.default_rng([seed, index])
    edges = _cell_edges(image_size, grid)
    shape_sizes, letter_sizes = _block_range(grid)

    # Light background, varied slightly per image (a faint tint), uniform within the image.
    bg = tuple(int(v) for v in rng.integers(226, 251, size=3))
    shape = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))]
    ci = int(rng.integers(len(COLOUR_NAMES)))
    colour = COLOUR_NAMES[ci]
    has_letter = bool(rng.random() < p_letter)
    letter = LETTERS[int(rng.integers(len(LETTERS)))]
    # The letter colour always differs from the shape colour.
    li = int(rng.integers(len(COLOUR_NAMES) - 1))
    letter_colour = COLOUR_NAMES[li if li < ci else li + 1]

    ssz = int(rng.choice(list(shape_sizes)))
    shape_block = (int(rng.integers(grid - ssz + 1)), int(rng.integers(grid - ssz + 1)), ssz)

    letter_block = None
    if has_letter:
        # Every free placement of every allowed size, then one at random: always
        # succeeds when any placement exists, and stays deterministic.
        cands = [
            (r, c, lsz)
            for lsz in letter_sizes
            for r in range(grid - lsz + 1)
            for c in range(grid - lsz + 1)
            if not _overlaps((r, c, lsz), shape_block)
        ]
        if cands:
            letter_block = cands[int(rng.integers(len(cands)))]
        else:  # grid too small for two blocks: the image simply has no letter
            has_letter = False
    if not has_letter:
        letter = None
        letter_colour = None

    canvas = Image.new("RGB", (image_size, image_size), bg)
    labels = {t: np.full((grid, grid), -1, dtype=np.int16) for t in LABEL_TASKS}
    any_ink = np.zeros((image_size, image_size), dtype=bool)

    def place(block, mask_fn, rgb, min_cov, assign):
        r, c, sz = block
        y0, y1 = int(edges[r]), int(edges[r + sz])
        x0, x1 = int(edges[c]), int(edges[c + sz])
        # A small margin inside the block keeps neighbouring objects from touching.
        m = max(1, round(0.06 * (x1 - x0)))
        local = mask_fn(x1 - x0 - 2 * m, y1 - y0 - 2 * m)
        full = np.zeros((image_size, image_size), dtype=bool)
        full[y0 + m : y1 - m, x0 + m : x1 - m] = local
        canvas.paste(rgb, mask=Image.fromarray(full.astype(np.uint8) * 255, "L"))
        any_ink[full] = True
        cov = _cell_coverage(full, edges)
        sel = cov >= min_cov
        for task, value in assign.items():
            labels[task][sel] = value
        labels["background"][sel] = 0
        ys, xs = np.nonzero(full)
        return (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))

    shape_box = place(
        shape_block,
        lambda w, h: _shape_mask(shape, w, h),
        COLOURS[colour],
        SHAPE_MIN_COVERAGE,
        {"colour": ci, "shape": SHAPE_NAMES.index(shape)},
    )
    letter_box = None
    if letter is not None:
        letter_box = place(
            letter_block,
            lambda w, h: _glyph_mask(letter, w, h),
            COLOURS[letter_colour],
            LETTER_MIN_COVERAGE,
            {"colour": COLOUR_NAMES.index(letter_colour), "character": LETTERS.index(letter)},
        )
    # Cells without a single object pixel are background; partly covered cells that
    # missed the threshold stay -1 everywhere (ambiguous).
    empty = _cell_coverage(any_ink, edges) == 0
    labels["background"][empty] = 1

    image_id = f"synthetic-{index:05d}"
    truth = {"shape": shape, "colour": colour, "character": letter, "letter_colour": letter_colour}
    vqa = []
    for qtype in ("shape", "colour", "character", "letter_colour"):
        if truth[qtype] is None:
            continue
        vqa.append(
            {
                "item_id": f"{image_id}-{qtype}",
                "image_id": image_id,
                "type": qtype,
                "question": QUESTIONS[qtype],
                "choices": list(_VQA_CHOICES[qtype]),
                "answer": truth[qtype],
                "answer_prefix": ANSWER_FORMAT[qtype][0],
                "choice_texts": [ANSWER_FORMAT[qtype][1].format(c=c, art=article(c))
                                 for c in _VQA_CHOICES[qtype]],
            }
        )
    return SyntheticExample(
        image_id=image_id,
        image=canvas,
        caption=_caption(colour, shape, letter, letter_colour),
        labels=labels,
        vqa=vqa,
        shape=shape,
        colour=colour,
        letter=letter,
        letter_colour=letter_colour,
        shape_block=shape_block,
        letter_block=letter_block,
        shape_box=shape_box,
        letter_box=letter_box,
        meta={"background_rgb": list(bg)},
    )


def make_examples(
    n: int, seed: int, image_size: int = 224, grid: int = 8, p_letter: float = 0.6
) -> list[SyntheticExample]:
    """Generate ``n`` synthetic examples, deterministically from ``seed``.

    ``grid`` is the label grid G (labels are (G, G) per task); ``image_size`` should be
    a multiple of ``grid`` for equal cells (224 / 8 = 28 px), though any size >= 4 G
    works. ``p_letter`` is the probability that an image carries a letter.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"synthetic: n_images must be a non-negative integer, got {n!r}")
    if not isinstance(grid, (int, np.integer)) or grid < 4:
        raise ValueError(f"synthetic: grid must be an integer >= 4, got {grid!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 4 * grid:
        raise ValueError(
            f"synthetic: image_size must be an integer >= 4 * grid = {4 * grid}, got {image_size!r}"
        )
    if not 0.0 <= float(p_letter) <= 1.0:
        raise ValueError(f"synthetic: p_letter must be within [0, 1], got {p_letter!r}")
    return [_make_one(i, int(seed), int(image_size), int(grid), float(p_letter)) for i in range(int(n))]
