"""Extraction into the store: batch-size invariance, equality with a direct model call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedlens.datasets import load_dataset, materialize
from embedlens.extract import ExtractSettings, extract_shard, resolve_layers, shard_ranges
from embedlens.store import open_shard
from embedlens.testing.tiny import TINY_ARCHS, build_tiny_model


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    return materialize("shapes", {"source": "synthetic", "n_images": 5, "seed": 1,
                                  "image_size": 64, "grid": 4}, out)


def _extract(model, dataset_dir, out, batch_size, **kw):
    settings = ExtractSettings(batch_size=batch_size, store_dtype="float32", device="cpu", **kw)
    return open_shard(extract_shard(model, dataset_dir, out, start=0, stop=5, settings=settings,
                                    model_name="tiny", progress=False))


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_batch_size_invariance(arch, dataset_dir, tmp_path):
    model = build_tiny_model(arch, tmp_path / arch, seed=0)
    one = _extract(model, dataset_dir, tmp_path / "b1.zarr", 1)
    four = _extract(model, dataset_dir, tmp_path / "b4.zarr", 4)
    a, b = one.llm_hidden.values, four.llm_hidden.values
    assert a.shape == b.shape and np.isfinite(a).all()
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert rel < 1e-4, f"{arch}: batch 1 vs 4 differ by {rel:.2e} (relative)"
    np.testing.assert_array_equal(one.patch_row.values, four.patch_row.values)
    if "vision_to_llm" in one.coords:  # every vision token maps into the LLM token range
        v2l = one.vision_to_llm.values
        assert v2l.max() < one.sizes["token"] and (v2l >= 0).any()
    if "vision_hidden" in one:
        v1, v4 = one.vision_hidden.values, four.vision_hidden.values
        assert np.abs(v1 - v4).max() / np.abs(v1).max() < 1e-4


def test_store_equals_direct_model_call(dataset_dir, tmp_path):
    from embedlens.models.adapter import VLMAdapter

    model = build_tiny_model("llava", tmp_path / "llava", seed=0)
    ds = _extract(model, dataset_dir, tmp_path / "s.zarr", 2, prompt="What is this?")
    adapter = VLMAdapter.load(str(model), dtype="float32", device="cpu")
    data = load_dataset(dataset_dir)
    batch = adapter.prepare([data.image(3)], "What is this?")
    with torch.inference_mode():
        out = adapter.model(**batch, output_hidden_states=True)
    mask = batch["input_ids"][0] == adapter.image_token_id
    direct = torch.stack([h[0][mask] for h in out.hidden_states]).numpy()
    stored = ds.llm_hidden.isel(image=3).values[:, : int(mask.sum())]
    np.testing.assert_allclose(stored, direct, rtol=1e-5, atol=1e-5)
    assert ds.image_id.values[3] == data.images[3]["image_id"]
    assert ds.attrs["settings"]["prompt"] == "What is this?"


def test_float16_store_and_layer_selection(dataset_dir, tmp_path):
    model = build_tiny_model("llava", tmp_path / "llava", seed=0)
    settings = ExtractSettings(batch_size=2, layers=[0, -1], device="cpu")
    ds = open_shard(extract_shard(model, dataset_dir, tmp_path / "h.zarr", start=1, stop=3,
                                  settings=settings, model_name="tiny", progress=False))
    assert ds.llm_hidden.dtype == np.float16
    assert ds.sizes["image"] == 2 and ds.layer.values[0] == 0 and len(ds.layer) == 2
    assert ds.attrs["image_range"] == [1, 3]


def test_pad_square_equals_the_image_padded_by_hand(tmp_path):
    """Planted (issue 14): a 4:3 image extracted with preprocess pad_square has the states of
    the same image padded to a square by hand (centred on the image processor's mean colour,
    as LLaVA-1.5's expand2square: int(0.5 * 255) = 127 for the tiny LLaVA) and extracted
    natively; natively, the processor center-crops it and the states differ."""
    from PIL import Image

    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8))  # w 48 × h 36 (4:3)
    by_hand = Image.new("RGB", (48, 48), (127, 127, 127))
    by_hand.paste(image, (0, (48 - 36) // 2))
    sets = {}
    for name, im in (("image", image), ("by_hand", by_hand)):
        (tmp_path / name).mkdir()
        im.save(tmp_path / name / "im.png")
        sets[name] = materialize(name, {"source": "folder", "path": str(tmp_path / name)}, tmp_path / f"ds-{name}")
    model = build_tiny_model("llava", tmp_path / "llava", seed=0)
    pad = _extract(model, sets["image"], tmp_path / "pad.zarr", 1, preprocess="pad_square")
    hand = _extract(model, sets["by_hand"], tmp_path / "hand.zarr", 1)
    native = _extract(model, sets["image"], tmp_path / "native.zarr", 1)
    np.testing.assert_array_equal(pad.llm_hidden.values, hand.llm_hidden.values)
    np.testing.assert_array_equal(pad.vision_hidden.values, hand.vision_hidden.values)
    assert not np.allclose(pad.llm_hidden.values, native.llm_hidden.values, atol=1e-3)
    assert pad.attrs["settings"]["preprocess"] == "pad_square"
    assert "preprocess" not in native.attrs["settings"]  # native keeps the identity of older stores
    assert pad.attrs["settings_hash"] != native.attrs["settings_hash"]


def test_resolve_layers_and_shards():
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers([0, -1], 4) == [0, 3]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([7], 4)
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    """Four images of different sizes and aspect ratios (different crops, tiles, grids)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("mixed")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(3)
    for k, (w, h) in enumerate([(32, 32), (48, 32), (32, 20), (24, 40)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "imgs" / f"im{k}.png")
    return materialize("mixed", {"source": "folder", "path": str(root / "imgs")}, root / "ds")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_architecture_extracts_with_default_settings(arch, tiny_model, mixed_sizes, tmp_path):
    """`embedlens extract` defaults (all layers, vision layer -1, batch of 4 mixed sizes): the
    store is complete, passed the batch self-check, records the grid or its absence per
    image, and holds the adapter's states for each image alone."""
    from embedlens.models.adapter import VLMAdapter

    model = tiny_model(arch)
    settings = ExtractSettings(batch_size=4, store_dtype="float32", device="cpu")
    ds = open_shard(extract_shard(model, mixed_sizes, tmp_path / "h.zarr", start=0, stop=4,
                                  settings=settings, model_name=arch, progress=False))
    assert ds.sizes["image"] == 4 and ds.attrs["final_batch_size"] == 4
    assert ds.attrs["batch_check"]["max_rel_diff"] <= ds.attrs["batch_check"]["tolerance"]
    assert list(ds.vision_layer.values) == [-1]
    adapter = VLMAdapter.load(str(model))
    data = load_dataset(mixed_sizes)
    for i in range(4):
        (alone,) = adapter.forward_hidden(adapter.prepare([data.image(i)], settings.prompt), None, [-1])
        n = alone.n_tokens
        assert int(ds.n_tokens.values[i]) == n and bool(ds.grid_known.values[i]) == alone.grid_known
        assert (int(ds.grid_rows.values[i]), int(ds.grid_cols.values[i])) == alone.grid
        stored = ds.llm_hidden.isel(image=i).values[:, :n]
        rel = np.abs(stored - alone.llm.numpy()).max() / np.abs(alone.llm.numpy()).max()
        assert rel <= 1e-4, f"{arch} image {i}: stored vs alone differ by {rel:.2e}"
        nv = int(ds.n_vision_tokens.values[i])
        assert nv == alone.vision.shape[1]
        np.testing.assert_allclose(ds.vision_hidden.isel(image=i).values[:, :nv], alone.vision.numpy(),
                                   rtol=0, atol=1e-4 * float(alone.vision.abs().max()))
        if not alone.grid_known:
            assert (ds.patch_row.values[i, :n] == -1).all() and ds.layout_note.values[i]
