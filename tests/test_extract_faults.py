"""Extraction under faults: out of memory, errors inside a batch, images the model rejects,
non-finite states, batch dependence, unknown grids, user-registered architectures.

Faults that need hardware (CUDA out of memory) or a broken processor are injected by
wrapping the real adapter method; everything else (models, processors, stores) is real.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens.datasets import BadImageError, materialize
from embedlens.extract import ExtractSettings, extract_shard
from embedlens.models.adapter import VLMAdapter
from embedlens.store import NonFiniteError, open_shard
from embedlens.testing.tiny import build_tiny_model


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_tiny_model("llava", tmp_path_factory.mktemp("m") / "llava", seed=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    return materialize("shapes", {"source": "synthetic", "n_images": 5, "seed": 1,
                                  "image_size": 64, "grid": 4}, out)


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """A folder data set with an extreme aspect ratio (a 400 x 1 strip) among good images."""
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for name, (w, h) in {"a": (40, 32), "b": (32, 32), "c": (24, 48), "strip": (400, 1)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "imgs" / f"{name}.png")
    return materialize("odd", {"source": "folder", "path": str(root / "imgs")}, root / "ds")


def _extract(model, data, out, **kw):
    kw.setdefault("store_dtype", "float32")
    kw.setdefault("device", "cpu")
    n = kw.pop("n", 5)
    return open_shard(extract_shard(model, data, out, start=0, stop=n, settings=ExtractSettings(**kw),
                                    model_name="tiny", progress=False))


def _fail_batches_over(monkeypatch, limit: int, exc_factory):
    """Make every forward of more than `limit` images raise `exc_factory()`."""
    real = VLMAdapter.forward_hidden
    seen = []

    def forward(self, batch, *a, **k):
        seen.append(len(batch))
        if len(batch) > limit:
            raise exc_factory()
        return real(self, batch, *a, **k)

    monkeypatch.setattr(VLMAdapter, "forward_hidden", forward)
    return seen


def test_out_of_memory_halves_the_batch_4_2_1(llava, shapes, tmp_path, monkeypatch, caplog):
    reference = _extract(llava, shapes, tmp_path / "ref.zarr", batch_size=1)
    seen = _fail_batches_over(monkeypatch, 1, lambda: torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"))
    with caplog.at_level(logging.WARNING, logger="embedlens.extract"):
        ds = _extract(llava, shapes, tmp_path / "oom.zarr", batch_size=4)
    assert seen[:3] == [4, 2, 1]
    halvings = [r.getMessage() for r in caplog.records if "halved" in r.getMessage()]
    assert len(halvings) == 2 and "halved to 2" in halvings[0] and "halved to 1" in halvings[1]
    assert ds.attrs["final_batch_size"] == 1 and len(ds.attrs["batch_backoffs"]) == 2
    assert ds.sizes["image"] == 5 and list(ds.image_id.values) == list(reference.image_id.values)
    np.testing.assert_array_equal(ds.llm_hidden.values, reference.llm_hidden.values)


def test_other_errors_keep_their_own_message(llava, shapes, tmp_path, monkeypatch):
    """An error that every image of a batch hits is the model's, not an image's: it reaches
    the user as it was raised (formerly masked by an AttributeError in the OOM check)."""
    _fail_batches_over(monkeypatch, 0, lambda: IndexError("index 7 is out of bounds for dimension 0"))
    for policy in ("fail", "skip"):
        with pytest.raises(IndexError, match="index 7 is out of bounds"):
            _extract(llava, shapes, tmp_path / f"{policy}.zarr", batch_size=4, on_bad_image=policy)
        assert not (tmp_path / f"{policy}.zarr").exists()


def test_rejected_image_is_named_or_skipped(shapes, odd_images, tmp_path):
    """Qwen2.5-VL's processor rejects aspect ratios over 200: a 400 x 1 strip. `fail` names
    the file and the processor's reason; `skip` extracts every other image of the shard and
    records the strip with the reason."""
    model = build_tiny_model("qwen2_5_vl", tmp_path / "qwen", seed=0)
    with pytest.raises(BadImageError, match=r"strip\.png.*aspect ratio.*on_bad_image: skip"):
        _extract(model, odd_images, tmp_path / "fail.zarr", batch_size=4, n=4)
    assert not (tmp_path / "fail.zarr").exists()
    ds = _extract(model, odd_images, tmp_path / "skip.zarr", batch_size=4, n=4, on_bad_image="skip")
    assert list(ds.image_id.values) == ["a", "b", "c"]
    (rec,) = ds.attrs["skipped_images"]
    assert rec["image_id"] == "strip" and "aspect ratio" in rec["reason"]
    assert np.isfinite(ds.llm_hidden.transpose("image", "token", "layer", "dim").values[ds.token_valid.values]).all()
    alone = _extract(model, odd_images, tmp_path / "one.zarr", batch_size=1, n=3)
    np.testing.assert_allclose(ds.llm_hidden.values, alone.llm_hidden.values, rtol=0, atol=1e-4 * np.nanmax(
        np.abs(alone.llm_hidden.values)))


def _with_scaled_weight(src, dst, scale: float):
    """A copy of model `src` whose decoder layer 1 MLP output is multiplied by `scale`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    (key,) = [k for k in weights if "layers.1.mlp.down_proj" in k]
    weights[key] = weights[key] * scale
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_nan_in_float32_names_image_and_layers(llava, shapes, tmp_path):
    broken = _with_scaled_weight(llava, tmp_path / "nan", float("nan"))
    with pytest.raises(NonFiniteError, match=r"image \S+ at LLM layers \[2\].*not a float16 overflow") as err:
        _extract(broken, shapes, tmp_path / "h.zarr", batch_size=2, layers=[0, 1, 2])
    assert err.value.layers == [2] and err.value.image_id
    assert not (tmp_path / "h.zarr").exists()


def test_float16_overflow_falls_back_to_a_wider_dtype(llava, shapes, tmp_path):
    """Activations beyond 65504 overflow float16 inside the model (inf, then NaN): detected
    per image and layer, the shard is recomputed in float32 (CPU) and the fallback recorded."""
    big = _with_scaled_weight(llava, tmp_path / "big", 1e6)
    ds = _extract(big, shapes, tmp_path / "h.zarr", batch_size=2, compute_dtype="float16",
                  vision_layers=())
    assert ds.attrs["compute_dtype_used"] == "float32"
    assert any("float16 gave non-finite" in n for n in ds.attrs["extraction_notes"])
    assert np.isfinite(ds.llm_hidden.values).all()
    ref = _extract(big, shapes, tmp_path / "ref.zarr", batch_size=2, vision_layers=())
    np.testing.assert_array_equal(ds.llm_hidden.values, ref.llm_hidden.values)


def test_batch_dependence_is_detected_and_falls_back(llava, shapes, tmp_path, monkeypatch, caplog):
    """A batch that changes an image's states (as a processor padding pixel values to the
    batch's largest image would) is caught by the first-batch self-check; the shard is
    redone one image at a time and equals a batch-1 extraction."""
    reference = _extract(llava, shapes, tmp_path / "ref.zarr", batch_size=1)
    real = VLMAdapter.forward_hidden

    def batch_dependent(self, batch, *a, **k):
        out = real(self, batch, *a, **k)
        if len(batch) > 1:
            for h in out:
                h.llm = h.llm + 0.05 * h.llm.abs().max()
        return out

    monkeypatch.setattr(VLMAdapter, "forward_hidden", batch_dependent)
    with caplog.at_level(logging.WARNING, logger="embedlens.extract"):
        ds = _extract(llava, shapes, tmp_path / "b4.zarr", batch_size=4)
    assert any("one image at a time" in r.getMessage() for r in caplog.records)
    assert ds.attrs["final_batch_size"] == 1
    assert any("batch dependence detected" in n for n in ds.attrs["extraction_notes"])
    np.testing.assert_array_equal(ds.llm_hidden.values, reference.llm_hidden.values)


def test_batch_check_passes_and_is_recorded(llava, shapes, tmp_path):
    ds = _extract(llava, shapes, tmp_path / "b4.zarr", batch_size=4)
    check = ds.attrs["batch_check"]
    assert check["batch_size"] == 4 and check["max_rel_diff"] <= check["tolerance"] == 1e-4
    assert ds.attrs["final_batch_size"] == 4 and ds.attrs["extraction_notes"] == []


def test_layer_subset_equals_full_extraction(llava, shapes, tmp_path):
    """`layers: [0, -1]` with the default vision layers (it crashed on LLaVA: the selection
    reached the vision tower) equals the same layers of a full extraction."""
    full = _extract(llava, shapes, tmp_path / "full.zarr", batch_size=2)
    sub = _extract(llava, shapes, tmp_path / "sub.zarr", batch_size=2, layers=[0, -1])
    last = int(full.layer.values[-1])
    assert list(sub.layer.values) == [0, last]
    np.testing.assert_array_equal(sub.llm_hidden.values, full.llm_hidden.sel(layer=[0, last]).values)
    np.testing.assert_array_equal(sub.vision_hidden.values, full.vision_hidden.values)


def test_unknown_grid_is_recorded_not_guessed(llava, shapes, tmp_path):
    """A user-registered architecture whose layout is unknown: the store says so per image
    (grid_known False, grid 0 x 0, patches -1, the note) instead of a guessed square grid."""
    from embedlens.models.overrides import get_overrides, register_overrides, unknown_layout
    from embedlens.models.overrides.llava import LlavaOverrides

    class NoGrid(LlavaOverrides):
        def layout(self, ctx):
            return unknown_layout(ctx.n_tokens, note="test: layout withheld")

    original = get_overrides("llava")
    register_overrides("llava", NoGrid)
    try:
        ds = _extract(llava, shapes, tmp_path / "h.zarr", batch_size=2)
    finally:
        register_overrides("llava", original)
    assert not ds.grid_known.values.any()
    assert (ds.grid_rows.values == 0).all() and (ds.patch_row.values == -1).all()
    assert set(ds.layout_note.values) == {"test: layout withheld"}
    known = _extract(llava, shapes, tmp_path / "k.zarr", batch_size=2)
    assert known.grid_known.values.all() and (known.grid_rows.values == 8).all()


def test_register_overrides_rejects_non_overrides():
    from embedlens.models.overrides import register_overrides

    with pytest.raises(TypeError, match="expected an ArchOverrides"):
        register_overrides("mine", dict)


def test_overrides_module_from_the_environment(llava, shapes, tmp_path, monkeypatch):
    """config.yaml's overrides_modules reach every job as $EMBEDLENS_OVERRIDES: a .py file
    registering an architecture is imported before the model is loaded; a broken one is
    named."""
    from embedlens.models.overrides import get_overrides, load_user_overrides, register_overrides

    plugin = tmp_path / "my_overrides.py"
    plugin.write_text(
        "from embedlens.models import register_overrides, unknown_layout\n"
        "from embedlens.models.overrides.llava import LlavaOverrides\n"
        "class Mine(LlavaOverrides):\n"
        "    def layout(self, ctx):\n"
        "        return unknown_layout(ctx.n_tokens, note='from my_overrides.py')\n"
        "register_overrides('llava', Mine)\n")
    original = get_overrides("llava")
    monkeypatch.setenv("EMBEDLENS_OVERRIDES", str(plugin))
    try:
        ds = _extract(llava, shapes, tmp_path / "h.zarr", batch_size=2, n=2)
    finally:
        register_overrides("llava", original)
    assert set(ds.layout_note.values) == {"from my_overrides.py"}
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('typo in my plugin')\n")
    with pytest.raises(ImportError, match=r"broken\.py.*typo in my plugin"):
        load_user_overrides(str(broken))
