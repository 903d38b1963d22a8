"""Models larger than one GPU (extraction.device_map, accelerate) and quantized weights
(extraction.quantization, bitsandbytes): config options through models.loading, recorded in
the shard. On the CPU: device_map places the whole tiny model on the CPU (same values, the
placement recorded); quantization fails before any work, saying what is missing."""

from __future__ import annotations

import numpy as np
import pytest

from embedlens.datasets import materialize
from embedlens.extract import ExtractSettings, extract_shard
from embedlens.models.loading import load_model
from embedlens.store import open_shard
from embedlens.testing.tiny import build_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    data = materialize("shapes", {"source": "synthetic", "n_images": 2, "seed": 1, "image_size": 64, "grid": 4},
                       root / "shapes")
    return build_tiny_model("llava", root / "llava", seed=0), data


def _extract(model, data, out, **kw):
    settings = ExtractSettings(batch_size=2, store_dtype="float32", device="cpu", **kw)
    return open_shard(extract_shard(model, data, out, start=0, stop=2, settings=settings, model_name="tiny",
                                    progress=False))


def test_device_map_gives_the_same_states_and_is_recorded(setup, tmp_path):
    model, data = setup
    plain = _extract(model, data, tmp_path / "plain.zarr")
    spread = _extract(model, data, tmp_path / "spread.zarr", device_map="auto")
    np.testing.assert_array_equal(plain.llm_hidden.values, spread.llm_hidden.values)
    assert spread.attrs["device_map"] == "auto" and plain.attrs["device_map"] is None
    assert set(spread.attrs["model_placement"]) == {"cpu"} and plain.attrs["model_placement"] is None
    assert spread.attrs["settings_hash"] == plain.attrs["settings_hash"]  # placement only
    assert spread.attrs["quantization"] is None


def test_quantization_is_part_of_the_identity_and_fails_clearly_without_bitsandbytes_or_cuda(setup):
    base = ExtractSettings()
    assert "quantization" not in base.identity()  # old stores' hashes unchanged
    assert ExtractSettings(quantization="4bit").identity()["quantization"] == "4bit"
    model, _ = setup
    with pytest.raises(RuntimeError, match="bitsandbytes"):
        load_model(model, quantization="8bit")
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_model(model, quantization="3bit")
