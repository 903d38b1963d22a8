"""Tests of the data-set layer: synthetic set, image reading, sources, materialize."""

from __future__ import annotations

import importlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedlens.datasets import (
    BadImageError,
    ManifestError,
    folder_source,
    load_dataset,
    load_rgb,
    make_examples,
    manifest_source,
    materialize,
    skimage_source,
    token_labels,
)
from embedlens.datasets.synthetic import (
    COLOUR_NAMES,
    COLOURS,
    LABEL_TASKS,
    LETTERS,
    SHAPE_NAMES,
)

# The package exports the *function* materialize, which shadows the module's name.
materialize_mod = importlib.import_module("embedlens.datasets.materialize")


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def cell_pixels(arr: np.ndarray, r: int, c: int, grid: int) -> np.ndarray:
    s = arr.shape[0]
    e = (np.arange(grid + 1) * s) // grid
    return arr[e[r] : e[r + 1], e[c] : e[c + 1]].reshape(-1, 3)


@pytest.fixture(scope="module")
def examples():
    return make_examples(40, seed=7)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_by_seed():
    a = make_examples(6, seed=3)
    b = make_examples(6, seed=3)
    for x, y in zip(a, b):
        assert png_bytes(x.image) == png_bytes(y.image)
        assert x.caption == y.caption and x.vqa == y.vqa
        for t in LABEL_TASKS:
            np.testing.assert_array_equal(x.labels[t], y.labels[t])
    c = make_examples(6, seed=4)
    assert [png_bytes(x.image) for x in a] != [png_bytes(x.image) for x in c]
    # Image i depends on (seed, i) only: a shorter run is a prefix of a longer one.
    longer = make_examples(9, seed=3)
    assert [png_bytes(x.image) for x in longer[:6]] == [png_bytes(x.image) for x in a]


def test_synthetic_basic_properties(examples):
    ids = [e.image_id for e in examples]
    assert ids == [f"synthetic-{i:05d}" for i in range(40)]
    for e in examples:
        assert e.image.mode == "RGB" and e.image.size == (224, 224)
        for t, arr in e.labels.items():
            assert arr.shape == (8, 8) and arr.dtype == np.int16
            assert arr.min() >= -1 and arr.max() < len(LABEL_TASKS[t])
        # every image has shape cells; a letter, when present, has letter cells
        assert (e.labels["shape"] >= 0).any()
        assert (e.labels["character"] >= 0).any() == (e.letter is not None)
        # light background
        assert min(e.meta["background_rgb"]) >= 220
    n_letter = sum(e.letter is not None for e in examples)
    assert 10 <= n_letter <= 36  # p_letter = 0.6 of 40
    assert all(e.letter is None for e in make_examples(5, 0, p_letter=0.0))
    assert all(e.letter is not None for e in make_examples(5, 0, p_letter=1.0))


def test_synthetic_labels_line_up_with_pixels(examples):
    for e in examples:
        arr = np.asarray(e.image)
        bg = np.array(e.meta["background_rgb"], dtype=np.uint8)
        lab = e.labels
        for r in range(8):
            for c in range(8):
                px = cell_pixels(arr, r, c, 8)
                is_bg = (px == bg).all(axis=1)
                if lab["background"][r, c] == 1:
                    assert is_bg.all(), (e.image_id, r, c)
                    assert lab["colour"][r, c] == lab["shape"][r, c] == lab["character"][r, c] == -1
                    continue
                if lab["background"][r, c] == -1:  # ambiguous: some object, under threshold
                    assert not is_bg.all()
                    assert lab["colour"][r, c] == lab["shape"][r, c] == lab["character"][r, c] == -1
                    continue
                rgb = np.array(COLOURS[COLOUR_NAMES[lab["colour"][r, c]]], dtype=np.uint8)
                share = (px == rgb).all(axis=1).mean()
                # the only two colours in an object cell: the background and the object's
                assert ((px == rgb).all(axis=1) | is_bg).all()
                if lab["shape"][r, c] >= 0:
                    assert SHAPE_NAMES[lab["shape"][r, c]] == e.shape
                    assert COLOUR_NAMES[lab["colour"][r, c]] == e.colour
                    assert share >= 0.5 and lab["character"][r, c] == -1
                else:
                    assert LETTERS[lab["character"][r, c]] == e.letter
                    assert COLOUR_NAMES[lab["colour"][r, c]] == e.letter_colour
                    assert share >= 0.1
        # the shape's colour is at the centre of its block
        r0, c0, sz = e.shape_block
        centre = arr[(r0 * 28 + (r0 + sz) * 28) // 2, (c0 * 28 + (c0 + sz) * 28) // 2]
        assert tuple(centre) == COLOURS[e.colour]


def test_synthetic_captions_and_vqa_consistent(examples):
    for e in examples:
        shapes = {SHAPE_NAMES[v] for v in np.unique(e.labels["shape"]) if v >= 0}
        assert shapes == {e.shape}
        assert e.shape in e.caption and e.colour in e.caption
        assert e.caption.endswith(".") and e.caption[0].isupper()
        by_type = {q["type"]: q for q in e.vqa}
        assert by_type["shape"]["answer"] == e.shape
        assert by_type["colour"]["answer"] == e.colour
        assert by_type["shape"]["choices"] == SHAPE_NAMES
        assert by_type["colour"]["choices"] == COLOUR_NAMES
        if e.letter is None:
            assert set(by_type) == {"shape", "colour"}
            assert "letter" not in e.caption
        else:
            assert set(by_type) == {"shape", "colour", "character", "letter_colour"}
            assert by_type["character"]["choices"] == LETTERS
            chars = {LETTERS[v] for v in np.unique(e.labels["character"]) if v >= 0}
            assert chars == {by_type["character"]["answer"]} == {e.letter}
            cols = {COLOUR_NAMES[v] for v in np.unique(e.labels["colour"][e.labels["character"] >= 0])}
            assert cols == {by_type["letter_colour"]["answer"]}
            assert e.letter_colour != e.colour
            # the scored phrasing of the answer is the caption's own ("an orange letter")
            lc = by_type["letter_colour"]
            text = lc["choice_texts"][lc["choices"].index(lc["answer"])]
            assert lc["answer_prefix"] == "It is" and f"{text} {e.letter}" in e.caption
            assert f"letter {e.letter}." in e.caption
        for q in e.vqa:
            assert q["answer"] in q["choices"] and q["image_id"] == e.image_id
        assert len({q["item_id"] for q in e.vqa}) == len(e.vqa)
    # articles
    caps = [e.caption for e in make_examples(200, 1)]
    assert not any(" a orange" in c or c.startswith("A orange") for c in caps)
    assert any(c.startswith("An orange") for c in caps)


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="grid"):
        make_examples(1, 0, grid=2)
    with pytest.raises(ValueError, match="image_size"):
        make_examples(1, 0, image_size=16, grid=8)
    with pytest.raises(ValueError, match="p_letter"):
        make_examples(1, 0, p_letter=1.5)


def test_synthetic_other_grid():
    ex = make_examples(4, 0, image_size=224, grid=16)
    assert ex[0].labels["shape"].shape == (16, 16)
    assert all((e.labels["shape"] >= 0).any() for e in ex)


# --------------------------------------------------------------------------- materialize + token_labels


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("res") / "datasets" / "synthetic"
    return materialize("synthetic", {"source": "synthetic", "n_images": 12, "seed": 5}, out)


def test_materialize_synthetic_layout(synth_dir):
    meta = json.loads((synth_dir / "dataset.json").read_text())
    assert meta["name"] == "synthetic" and meta["source"] == "synthetic"
    assert meta["n_images"] == 12 == len(meta["images"])
    assert meta["spec"] == {"source": "synthetic", "n_images": 12, "seed": 5, "image_size": 224,
                            "grid": 8, "p_letter": 0.6}
    assert meta["label_tasks"] == LABEL_TASKS and meta["label_grid"] == 8
    assert meta["bad_images"] == []
    rec = meta["images"][0]
    assert rec == {"image_id": "synthetic-00000", "file": "images/synthetic-00000.png",
                   "caption": rec["caption"], "source_path": None}
    with np.load(synth_dir / "labels.npz", allow_pickle=False) as z:
        assert sorted(z.files) == sorted(LABEL_TASKS)
        assert all(z[t].shape == (12, 8, 8) and z[t].dtype == np.int16 for t in z.files)
    ds = load_dataset(synth_dir)
    ex = make_examples(12, 5)
    assert len(ds) == 12 and ds.name == "synthetic"
    assert png_bytes(ds.image(3)) == png_bytes(ex[3].image)
    assert ds.image("synthetic-00003").size == (224, 224)
    assert [r["caption"] for r in ds.images] == [e.caption for e in ex]
    assert ds.vqa == [q for e in ex for q in e.vqa]
    np.testing.assert_array_equal(ds.labels["shape"][4], ex[4].labels["shape"])
    assert not list(synth_dir.parent.glob("*.tmp-*"))


def test_materialize_byte_identical(tmp_path, synth_dir):
    other = materialize("synthetic", {"source": "synthetic", "n_images": 12, "seed": 5},
                        tmp_path / "synthetic")
    for f in sorted((synth_dir / "images").iterdir()):
        assert f.read_bytes() == (other / "images" / f.name).read_bytes()
    assert (synth_dir / "dataset.json").read_bytes() == (other / "dataset.json").read_bytes()


def test_token_labels_cell_under_token_centre(synth_dir):
    ds = load_dataset(synth_dir)
    lab = ds.labels
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    got = token_labels(ds, 2, rows.ravel(), cols.ravel(), 8, 8)
    for t in LABEL_TASKS:  # 8 x 8 tokens on an 8 x 8 grid: identity
        np.testing.assert_array_equal(got[t].reshape(8, 8), lab[t][2])
    rows, cols = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    got = token_labels(ds, 2, rows.ravel(), cols.ravel(), 16, 16)
    for t in LABEL_TASKS:  # 16 x 16 tokens: each cell covers 2 x 2 tokens
        np.testing.assert_array_equal(got[t].reshape(16, 16), np.kron(lab[t][2], np.ones((2, 2), int)))
    # 4 x 4 tokens: centre of token r lies at (r + .5) * 2 cells -> cell 2r + 1
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    got = token_labels(ds, 2, rows.ravel(), cols.ravel(), 4, 4)
    np.testing.assert_array_equal(got["shape"].reshape(4, 4), lab["shape"][2][1::2, 1::2])
    # non-dividing 14 x 10 grid follows floor((r + .5) * G / R)
    got = token_labels(ds, 1, np.array([0, 6, 13]), np.array([9, 4, 0]), 14, 10)
    exp_r = [int(np.floor((r + 0.5) * 8 / 14)) for r in (0, 6, 13)]
    exp_c = [int(np.floor((c + 0.5) * 8 / 10)) for c in (9, 4, 0)]
    np.testing.assert_array_equal(got["colour"], lab["colour"][1, exp_r, exp_c])
    # tokens outside the patch grid (e.g. row -1) get no label; image index broadcasts
    got = token_labels(ds, np.array([0, 1]), np.array([-1, 0]), np.array([0, 0]), 8, 8)
    assert got["background"][0] == -1 and got["background"][1] == lab["background"][1, 0, 0]


# --------------------------------------------------------------------------- odd images


def _exif_rotated(path: Path) -> None:
    # 40 x 20, left quarter blue, rest red; EXIF orientation 6 = rotate 90 deg clockwise.
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif, quality=95)


def _animated_gif(path: Path) -> None:
    frames = []
    for i in range(3):
        f = Image.new("P", (8, 8), i)
        f.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
        frames.append(f)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _palette(path: Path, transparent: bool) -> None:
    p = Image.new("P", (6, 6), 0)
    p.putpalette([10, 200, 30, 0, 0, 0])
    if transparent:
        p.info["transparency"] = 0
    p.save(path)


ODD = {
    "gray.png": (lambda p: Image.new("L", (5, 4), 77).save(p), (5, 4), (77, 77, 77)),
    "bw.png": (lambda p: Image.new("1", (5, 4), 1).save(p), (5, 4), (255, 255, 255)),
    "rgba.png": (lambda p: Image.new("RGBA", (5, 4), (255, 0, 0, 0)).save(p), (5, 4), (255, 255, 255)),
    "rgba_opaque.png": (lambda p: Image.new("RGBA", (5, 4), (0, 0, 255, 255)).save(p), (5, 4), (0, 0, 255)),
    "la.png": (lambda p: Image.new("LA", (5, 4), (0, 0)).save(p), (5, 4), (255, 255, 255)),
    "palette.png": (lambda p: _palette(p, False), (6, 6), (10, 200, 30)),
    "palette_t.png": (lambda p: _palette(p, True), (6, 6), (255, 255, 255)),
    "gray16.png": (lambda p: Image.fromarray(np.full((4, 5), 65535, np.uint16)).save(p), (5, 4), (255, 255, 255)),
    "gray16_mid.png": (lambda p: Image.fromarray(np.full((4, 5), 257 * 100, np.uint16)).save(p), (5, 4), (100, 100, 100)),
    "cmyk.jpg": (lambda p: Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=100), (16, 16), (255, 0, 0)),
    "anim.gif": (_animated_gif, (8, 8), (255, 0, 0)),
    "tiny.png": (lambda p: Image.new("RGB", (1, 1), (1, 2, 3)).save(p), (1, 1), (1, 2, 3)),
}


@pytest.mark.parametrize("fname", sorted(ODD))
def test_odd_images_become_rgb(tmp_path, fname):
    make, size, rgb = ODD[fname]
    p = tmp_path / fname
    make(p)
    im = load_rgb(p)
    assert im.mode == "RGB" and im.size == size
    px = np.asarray(im)[0, 0].astype(int)
    assert np.abs(px - np.array(rgb)).max() <= 3, px  # JPEG rounding


def test_gray16_keeps_its_range(tmp_path):
    a = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    Image.fromarray(a).save(tmp_path / "ramp.png")
    got = np.asarray(load_rgb(tmp_path / "ramp.png"))[..., 0]
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) > 200


def test_exif_rotation_applied(tmp_path):
    _exif_rotated(tmp_path / "rot.jpg")
    im = load_rgb(tmp_path / "rot.jpg")
    assert im.size == (20, 40)  # rotated upright
    a = np.asarray(im).astype(int)
    # the blue left edge is now the top edge
    assert a[2, 10, 2] > 200 and a[2, 10, 0] < 60
    assert a[37, 10, 0] > 200 and a[37, 10, 2] < 60


# --------------------------------------------------------------------------- bad images


def _bomb(path: Path) -> None:
    # A valid 1 x 1 PNG whose header claims 100000 x 100000 pixels (CRC fixed up).
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", 100_000, 100_000)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(b))


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, format="JPEG"
    )
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])


BAD = {
    "empty.png": (lambda p: p.write_bytes(b""), "empty"),
    "trunc.jpg": (_truncated_jpeg, "truncated"),
    "text.png": (lambda p: p.write_text("this is not an image\n"), "not an image"),
    "bomb.png": (_bomb, "decompression bomb"),
}


@pytest.mark.parametrize("lenient_globals", [False, True], ids=["pillow-defaults", "lenient-globals"])
@pytest.mark.parametrize("fname", sorted(BAD))
def test_bad_images_raise_named_error(tmp_path, fname, lenient_globals, monkeypatch):
    """Every kind of bad file is refused by name, also when another library in the process
    made Pillow's globals lenient (lmms-eval sets LOAD_TRUNCATED_IMAGES on import; some
    task modules lift MAX_IMAGE_PIXELS)."""
    if lenient_globals:
        from PIL import ImageFile

        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    make, reason = BAD[fname]
    make(tmp_path / fname)
    with pytest.raises(BadImageError) as ei:
        load_rgb(tmp_path / fname)
    assert ei.value.path.endswith(fname) and reason in ei.value.reason
    assert fname in str(ei.value)


def test_max_pixels_and_missing(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    with pytest.raises(BadImageError, match="max_pixels=5000"):
        load_rgb(tmp_path / "a.png", max_pixels=5000)
    assert load_rgb(tmp_path / "a.png", max_pixels=None).size == (100, 100)
    with pytest.raises(BadImageError, match="does not exist"):
        load_rgb(tmp_path / "nope.png")


@pytest.fixture
def mixed_folder(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    Image.new("RGB", (10, 10), (255, 0, 0)).save(d / "b.png")
    Image.new("L", (10, 10), 9).save(d / "a.jpg")
    Image.new("RGB", (10, 10), (0, 255, 0)).save(d / "sub" / "c.png")
    (d / "README.txt").write_text("not an image, ignored by extension")
    Image.new("RGB", (4, 4)).save(d / ".hidden.png")
    for fname, (make, _) in BAD.items():
        make(d / fname)
    return d


def test_folder_fail_names_file(tmp_path, mixed_folder):
    out = tmp_path / "datasets" / "f"
    with pytest.raises(BadImageError) as ei:
        materialize("f", {"source": "folder", "path": str(mixed_folder)}, out)
    # sorted order: a.jpg, b.png, bomb.png <- first bad one
    assert "bomb.png" in str(ei.value) and "decompression bomb" in str(ei.value)
    assert "on_bad_image: skip" in str(ei.value)
    assert not out.exists() and not list(out.parent.glob(".f.tmp-*"))


def test_folder_skip_records_bad(tmp_path, mixed_folder):
    out = materialize("f", {"source": "folder", "path": str(mixed_folder)},
                      tmp_path / "datasets" / "f", on_bad_image="skip")
    ds = load_dataset(out)
    assert ds.image_ids == ["a", "b"]
    assert ds.label_tasks == {} and ds.labels == {} and not (out / "labels.npz").exists()
    assert token_labels(ds, 0, [0], [0], 8, 8) == {}
    bad = {Path(b["file"]).name: b["reason"] for b in ds.bad_images}
    assert set(bad) == set(BAD)
    for fname, (_, reason) in BAD.items():
        assert reason in bad[fname]
    assert ds.image(0).mode == "RGB" and np.asarray(ds.image(0))[0, 0].tolist() == [9, 9, 9]
    assert ds.images[1]["source_path"].endswith("b.png")
    # recursive and limit
    src = folder_source(mixed_folder, recursive=True, limit=3, on_bad_image="skip")
    assert [i.image_id for i in src.items] == ["a", "b", "sub_c"]


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        folder_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        folder_source(tmp_path / "empty")


def test_all_bad_is_an_error(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no usable images.*x.png"):
        materialize("b", {"source": "folder", "path": str(d)}, tmp_path / "b", on_bad_image="skip")
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- manifest


def test_manifest_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img" / "r.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "img" / "b.png")
    (tmp_path / "img" / "broken.png").write_text("nope")
    lines = [
        {"image": "img/r.png", "image_id": "red", "caption": "red",
         "labels": {"scene": "warm", "obj": [["x", None], ["y", "x"]]},
         "vqa": [{"question": "Colour?", "choices": ["red", "blue"], "answer": "red", "type": "colour"}]},
        {"image": "img/b.png", "labels": {"scene": "cold"},
         "vqa": [{"question": "Colour?", "choices": ["red", "blue"], "answer": "blue",
                  "answer_prefix": "It is", "choice_texts": ["a red one", "a blue one"]}]},
        {"image": "img/broken.png"},
    ]
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = materialize("m", {"source": "manifest", "path": str(m)}, tmp_path / "ds" / "m",
                      on_bad_image="skip")
    ds = load_dataset(out)
    assert ds.image_ids == ["red", "img_b"]
    assert ds.images[0]["caption"] == "red" and ds.images[1]["caption"] is None
    assert ds.label_tasks == {"obj": ["x", "y"], "scene": ["cold", "warm"]} and ds.label_grid == 2
    np.testing.assert_array_equal(ds.labels["obj"][0], [[0, -1], [1, 0]])
    np.testing.assert_array_equal(ds.labels["obj"][1], [[-1, -1], [-1, -1]])
    np.testing.assert_array_equal(ds.labels["scene"][:, 0, 0], [1, 0])
    assert ds.vqa == [{"item_id": "red-q0", "image_id": "red", "type": "colour",
                       "question": "Colour?", "choices": ["red", "blue"], "answer": "red"},
                      {"item_id": "img_b-q0", "image_id": "img_b", "type": "custom",
                       "question": "Colour?", "choices": ["red", "blue"], "answer": "blue",
                       "answer_prefix": "It is", "choice_texts": ["a red one", "a blue one"]}]
    from embedlens.vqa import Framing, item_framing

    assert item_framing(ds.vqa[0]) == Framing("", ["red", "blue"], "")  # bare choices
    assert item_framing(ds.vqa[1]) == Framing("It is", ["a red one", "a blue one"], " ")
    assert [Path(b["file"]).name for b in ds.bad_images] == ["broken.png"]
    # 16 x 16 tokens over a 2 x 2 label grid
    got = token_labels(ds, 0, np.array([0, 15]), np.array([15, 0]), 16, 16)
    assert got["obj"].tolist() == [-1, 1]


def test_manifest_csv(tmp_path):
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "g.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "k.png")
    m = tmp_path / "m.csv"
    m.write_text(
        "image,caption,label_kind,question,choices,answer,type,answer_prefix,choice_texts\n"
        "g.png,a green square,plant,Colour?,red|green|blue,green,colour,It is,red|green|blue\n"
        "g.png,,,Is it a plant?,yes|no,yes,,,\n"
        "k.png,,,,,,,,\n"
    )
    src = manifest_source(m)
    items = list(src.items)
    assert [i.image_id for i in items] == ["g", "k"]
    assert src.label_tasks == {"kind": ["plant"]} and src.label_grid == 1
    assert items[0].labels["kind"].tolist() == [[0]] and items[1].labels["kind"].tolist() == [[-1]]
    assert items[0].caption == "a green square"
    assert [(q["item_id"], q["type"], q["choices"]) for q in items[0].vqa] == [
        ("g-q0", "colour", ["red", "green", "blue"]), ("g-q1", "custom", ["yes", "no"])]
    assert items[0].vqa[0]["answer_prefix"] == "It is" and "answer_prefix" not in items[0].vqa[1]


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"image": "a.png", "vqa": [{"question": "q", "choices": ["a", "b"], "answer": "c"}]}',
         r"m.jsonl:1.*answer 'c' is not one of"),
        ('{"image": "a.png", "image_id": "x/y"}', r"m.jsonl:1.*image_id"),
        ('{"img": "a.png"}', r"m.jsonl:1.*unknown keys"),
        ('{"image": "a.png", "labels": {"o": [["a"], ["b"]]}}', r"m.jsonl:1.*G x G"),
        ('{"image": "a.png", "image_id": "a"}\n{"image": "b.png", "image_id": "a"}',
         r"m.jsonl:2.*image ids must be unique"),
        ("not json", r"m.jsonl:1.*not valid JSON"),
        ('{"image": "a.png", "vqa": [{"question": "q", "choices": ["a", "b"], "answer": "a", '
         '"choice_texts": ["an a"]}]}', r"m.jsonl:1: vqa\[0\].*choice_texts.*one non-empty string per choice"),
    ],
)
def test_manifest_errors_name_the_line(tmp_path, text, match):
    m = tmp_path / "m.jsonl"
    m.write_text(text + "\n")
    with pytest.raises(ManifestError, match=match):
        manifest_source(m)


def test_manifest_missing_image_fails_with_name(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("image\nmissing.png\n")
    with pytest.raises(BadImageError, match="missing.png.*does not exist"):
        materialize("m", {"source": "manifest", "path": str(m)}, tmp_path / "m")


# --------------------------------------------------------------------------- skimage


def test_skimage_source(tmp_path):
    out = materialize("sk", {"source": "skimage", "names": ["camera", "astronaut"]}, tmp_path / "sk")
    ds = load_dataset(out)
    assert ds.image_ids == ["camera", "astronaut"]
    assert ds.image(0).mode == "RGB" and ds.image(0).size == (512, 512)  # camera is grayscale
    assert ds.label_tasks == {} and ds.vqa == []
    assert len(list(skimage_source(limit=3).items)) == 3
    with pytest.raises(ValueError, match="not available offline"):
        skimage_source(names=["no_such_image"])


# --------------------------------------------------------------------------- atomicity and guards


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "datasets" / "s"
    (tmp_path / "datasets").mkdir()
    stale = tmp_path / "datasets" / ".s.tmp-dead"  # left by a killed run
    (stale / "images").mkdir(parents=True)

    def boom(*a, **k):
        raise KeyboardInterrupt  # like Ctrl-C after all images are written

    monkeypatch.setattr(materialize_mod, "_save_labels", boom)
    with pytest.raises(KeyboardInterrupt):
        materialize("s", {"source": "synthetic", "n_images": 3}, out)
    assert not out.exists()
    assert list((tmp_path / "datasets").iterdir()) == []  # stale and own temp dirs gone


def test_failed_rematerialize_keeps_old_set(tmp_path, monkeypatch):
    out = materialize("s", {"source": "synthetic", "n_images": 2}, tmp_path / "s")
    before = (out / "dataset.json").read_bytes()
    monkeypatch.setattr(materialize_mod, "_save_labels",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        materialize("s", {"source": "synthetic", "n_images": 3}, out)
    assert (out / "dataset.json").read_bytes() == before
    monkeypatch.undo()
    # a successful run replaces it
    materialize("s", {"source": "synthetic", "n_images": 3}, out)
    assert load_dataset(out).spec["n_images"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_materialize_guards(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a data set"):
        materialize("s", {"source": "synthetic", "n_images": 1}, tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").exists()
    with pytest.raises(ValueError, match=r"datasets.s: unknown key\(s\) \['n'\]"):
        materialize("s", {"source": "synthetic", "n": 1}, tmp_path / "s")
    with pytest.raises(ValueError, match=r"datasets.s.path: required"):
        materialize("s", {"source": "folder"}, tmp_path / "s")
    with pytest.raises(ValueError, match=r"datasets.s.source"):
        materialize("s", {"source": "web"}, tmp_path / "s")
    with pytest.raises(ValueError, match="on_bad_image"):
        materialize("s", {"source": "synthetic"}, tmp_path / "s", on_bad_image="ignore")
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        load_dataset(tmp_path / "other")
