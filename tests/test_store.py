"""The Zarr hidden-state store: named dims, atomic visibility, shard joining."""

import numpy as np
import pytest
import xarray as xr

from embedlens.store import (ShardWriter, StoreOverflowError, atomic_directory, open_hidden,
                             open_index, open_shard, open_vocab, read_index, write_index,
                             write_vocab)


def _write(path, counts, seed=0, dtype="float16", scale=1.0):
    rng = np.random.default_rng(seed)
    with atomic_directory(path) as tmp:
        w = ShardWriter(tmp, n_images=len(counts), layers=[0, 1, 2], vision_layers=[-1],
                        dtype=dtype, attrs={"model": "m", "settings": {"prompt": "p"}})
        for i, n in enumerate(counts):
            w.write(i, f"{path.name}-{i}", scale * rng.normal(size=(3, n, 8)).astype(np.float32),
                    rng.normal(size=(1, n + 1, 4)).astype(np.float32),
                    np.arange(n) // 2, np.arange(n) % 2, (n // 2, 2))
        w.close()
    return path


def test_store_has_named_dims_coords_and_attrs(tmp_path):
    _write(tmp_path / "shard-0000.zarr", [4, 4])
    ds = xr.open_zarr(tmp_path / "shard-0000.zarr")
    assert ds["llm_hidden"].dims == ("image", "layer", "token", "dim")
    assert ds["vision_hidden"].dims == ("image", "vision_layer", "vision_token", "vision_dim")
    for coord in ("image_id", "layer", "token", "patch_row", "patch_col", "token_valid"):
        assert coord in ds.coords, coord
    assert ds.attrs["model"] == "m" and ds.attrs["store_dtype"] == "float16"
    assert ds.llm_hidden.dtype == np.float16
    # one chunk = one image x one layer
    assert ds.llm_hidden.data.chunksize[:2] == (1, 1)


def test_values_roundtrip_float32(tmp_path):
    rng = np.random.default_rng(0)
    expected = rng.normal(size=(3, 4, 8)).astype(np.float32)
    _write(tmp_path / "s.zarr", [4, 4], seed=0, dtype="float32")
    ds = open_shard(tmp_path / "s.zarr")
    np.testing.assert_array_equal(ds.llm_hidden.isel(image=0).values, expected)


def test_failed_write_leaves_nothing_visible(tmp_path):
    final = tmp_path / "shard-0000.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final) as tmp:
            ShardWriter(tmp, n_images=2, layers=[0], vision_layers=[], dtype="float16", attrs={})
            raise RuntimeError("boom")
    assert not final.exists()
    assert not list(tmp_path.iterdir())


def test_unclosed_store_is_refused(tmp_path):
    w = ShardWriter(tmp_path / "s.zarr", n_images=1, layers=[0], vision_layers=[], dtype="float16",
                    attrs={})
    w.write(0, "a", np.ones((1, 2, 3), np.float32), None, [0, 0], [0, 1], (1, 2))
    with pytest.raises(Exception):
        open_shard(tmp_path / "s.zarr")


def test_float16_overflow_is_detected(tmp_path):
    with pytest.raises(StoreOverflowError):
        _write(tmp_path / "s.zarr", [2], scale=1e6)
    assert not (tmp_path / "s.zarr").exists()


def test_open_hidden_pads_different_token_counts(tmp_path):
    _write(tmp_path / "shard-0000.zarr", [4, 4], seed=0)
    _write(tmp_path / "shard-0001.zarr", [6, 2], seed=1)
    ds = open_hidden([tmp_path / "shard-0001.zarr", tmp_path / "shard-0000.zarr"])
    assert ds.sizes["image"] == 4 and ds.sizes["token"] == 6
    assert list(ds.image_id.values) == ["shard-0000.zarr-0", "shard-0000.zarr-1",
                                        "shard-0001.zarr-0", "shard-0001.zarr-1"]
    assert ds.token_valid.values.sum(axis=1).tolist() == [4, 4, 6, 2]
    assert np.isnan(ds.llm_hidden.isel(image=0, token=5).values).all()


def test_index_lists_the_shards_and_opens_them_joined(tmp_path):
    a = _write(tmp_path / "shard-0000.zarr", [4, 4], seed=0)
    b = _write(tmp_path / "shard-0001.zarr", [6, 2], seed=1)
    index = write_index([b, a], tmp_path / "hidden.json")
    assert read_index(tmp_path / "hidden.json") == index
    assert index["shards"] == [str(a), str(b)] and index["n_images"] == 4
    assert index["layers"] == [0, 1, 2] and index["max_tokens"] == 6 and index["model"] == "m"
    joined = open_index(tmp_path / "hidden.json")
    assert joined.sizes["image"] == 4 and joined.token_valid.values.sum() == 16
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(KeyError, match="not a hidden-state index"):
        read_index(tmp_path / "other.json")


def test_vocab_store(tmp_path):
    emb = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    write_vocab(tmp_path / "vocab.zarr", emb, [f"t{i}" for i in range(10)], [3, 7], {"model": "m"})
    v = open_vocab(tmp_path / "vocab.zarr")
    np.testing.assert_array_equal(v.embedding.values, emb)
    assert v.is_special.values.nonzero()[0].tolist() == [3, 7]
    assert v.token_string.values[2] == "t2"


def test_atomic_file_replaces_only_on_success_with_normal_permissions(tmp_path):
    import os

    from embedlens.atomic import atomic_file

    out = tmp_path / "t.json"
    with atomic_file(out) as tmp:
        tmp.write_text("one")
    assert out.read_text() == "one"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    with pytest.raises(RuntimeError):
        with atomic_file(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert out.read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


# ----------------------------------------------------------------- the contract, checked
# One small real store of each kind, written by the real writers (tiny LLaVA, 2 images).
@pytest.fixture(scope="module")
def written(tiny_model, tmp_path_factory):
    from embedlens.analysis import layer_lens
    from embedlens.cli import main
    from embedlens.datasets import materialize
    from embedlens.extract import ExtractSettings, extract_shard
    from embedlens.models.adapter import VLMAdapter

    root = tmp_path_factory.mktemp("contract")
    model = tiny_model("llava")
    data = materialize("shapes", {"source": "synthetic", "n_images": 2, "seed": 1, "image_size": 64,
                                  "grid": 4}, root / "data")
    shard = extract_shard(model, data, root / "shard-0000.zarr", start=0, stop=2, model_name="tiny",
                          settings=ExtractSettings(batch_size=2, device="cpu"), progress=False)
    write_index([shard], root / "hidden.json")
    assert main(["export-vocab", "--model-dir", str(model), "--model-name", "tiny",
                 "--out", str(root / "vocab.zarr")]) == 0
    adapter = VLMAdapter.load(str(model))
    layer_lens(open_shard(shard), root / "vocab.zarr", root / "lens", top_k=2, lm_head=adapter.lm_head,
               final_norm=adapter.final_norm, device="cpu", progress=False)
    return {"shard": shard, "vocab": root / "vocab.zarr", "lens": root / "lens" / "lens.zarr",
            "index": root / "hidden.json"}


def test_writers_write_exactly_the_contract_table(written):
    from embedlens.store import (INDEX_KEYS, LENS_VARIABLES, SHARD_ATTRS, SHARD_VARIABLES, VARIABLES,
                                 VOCAB_ATTRS, VOCAB_VARIABLES)

    for kind, names, attrs in (("shard", SHARD_VARIABLES, SHARD_ATTRS), ("vocab", VOCAB_VARIABLES, VOCAB_ATTRS),
                               ("lens", LENS_VARIABLES, [])):
        ds = xr.open_zarr(written[kind], consolidated=kind != "lens")
        assert sorted(ds.variables) == sorted(names), kind
        for name in names:
            assert ds[name].dims == VARIABLES[name].dims, (kind, name)
        assert sorted(ds.attrs) == sorted(attrs), kind
    assert sorted(read_index(written["index"])) == sorted(INDEX_KEYS)


def test_open_zarr_explains_every_array(written, tmp_path):
    for kind in ("shard", "vocab", "lens"):
        ds = xr.open_zarr(written[kind], consolidated=kind != "lens")
        for name, var in ds.variables.items():
            assert var.attrs.get("description") and var.attrs.get("long_name"), (kind, name)
    # and after joining shards of different token counts
    joined = open_hidden([_write(tmp_path / "a.zarr", [4, 4]), _write(tmp_path / "b.zarr", [6, 2], seed=1)])
    assert all(var.attrs.get("description") for var in joined.variables.values())
    assert joined["patch_row"].attrs["units"] == "1"


def test_architecture_md_shows_the_generated_tables():
    """docs/architecture.md's store tables are `embedlens.store.doc_table(kind)`: paste the
    expected text printed on failure between the markers."""
    import re
    from pathlib import Path

    from embedlens.store import doc_table

    page = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    blocks = re.findall(r'<!-- generated: doc_table\("(\w+)"\) -->\n(.*?)<!-- end generated -->', page, re.S)
    assert sorted(kind for kind, _ in blocks) == ["index", "lens", "shard", "shard_attrs", "vocab"]
    for kind, text in blocks:
        assert text == doc_table(kind), f"docs/architecture.md, table {kind} is stale; expected:\n{doc_table(kind)}"
