"""Canary: extracted values of fixed tiny models on a fixed image, against recorded values.

A transformers (or torch, or processor) release that changes what extraction stores fails
here loudly, before any user's numbers shift silently. The weights are checked first, so
the message says whether the *model build* changed (random init, RNG) or the *forward*
(same weights, different states). After a deliberate upgrade, inspect the change, then
regenerate with `EMBEDLENS_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py` and
commit tests/data/golden_extraction.json with the new lock.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from embedlens.models.adapter import VLMAdapter
from embedlens.testing import build_tiny_model

GOLDEN = Path(__file__).parent / "data" / "golden_extraction.json"
ARCHS = ("llava", "qwen2_5_vl")


def _image():
    from PIL import Image

    rng = np.random.default_rng(1234)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def _weights_sha(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _record(arch: str, tmp: Path) -> dict:
    ad = VLMAdapter.load(build_tiny_model(arch, tmp / arch, seed=0))
    (out,) = ad.forward_hidden(ad.prepare([_image()], "Describe the image."), None, [-1])
    llm = out.llm.float()
    return {
        "weights_sha256": _weights_sha(ad.model),
        "n_tokens": out.n_tokens,
        "grid": list(out.grid),
        # token 0 in full at every layer, and a per-layer summary of all tokens
        "token0": llm[:, 0].tolist(),
        "mean_abs": llm.abs().mean(dim=(1, 2)).tolist(),
        "vision_mean_abs": float(out.vision.float().abs().mean()),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_extracted_values_match_the_recorded_ones(arch, tmp_path):
    got = _record(arch, tmp_path)
    if os.environ.get("EMBEDLENS_UPDATE_GOLDEN") == "1":
        data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        data[arch] = {**got, "transformers": transformers.__version__, "torch": torch.__version__}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(data, indent=1) + "\n")
        pytest.skip(f"recorded {arch} into {GOLDEN}")
    want = json.loads(GOLDEN.read_text())[arch]
    versions = (f"recorded with transformers {want['transformers']} / torch {want['torch']}, "
                f"now {transformers.__version__} / {torch.__version__}")
    assert got["weights_sha256"] == want["weights_sha256"], (
        f"{arch}: the tiny model's weights changed ({versions}): random init or RNG changed, "
        "so every test model differs; check, then regenerate (module docstring)")
    assert (got["n_tokens"], got["grid"]) == (want["n_tokens"], want["grid"]), (
        f"{arch}: visual tokens / grid changed ({versions}): the processor now prepares the image differently")
    np.testing.assert_allclose(
        got["token0"], want["token0"], rtol=1e-5, atol=1e-6,
        err_msg=f"{arch}: same weights, different extracted states ({versions}): the forward changed")
    np.testing.assert_allclose(got["mean_abs"], want["mean_abs"], rtol=1e-5)
    np.testing.assert_allclose(got["vision_mean_abs"], want["vision_mean_abs"], rtol=1e-5)
