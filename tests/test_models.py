"""The model layer: offline resolution, the generic adapter and the per-architecture overrides,
on tiny random models of every supported architecture (built offline, milliseconds per pass)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens.models.adapter import VLMAdapter
from embedlens.models.resolve import (
    ModelIncompleteError,
    ModelNotFoundError,
    RemoteCodeError,
    resolve_model,
)
from embedlens.testing import TINY_ARCHS, TINY_SKIPPED, build_tiny_model

# transformers' PaliGemma processor trips a numpy 2 deprecation inside its own code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Image sizes (width, height) per architecture: same-size sets, and mixed sizes where the
# architecture's token count depends on the image size.
SAME = [(32, 32)] * 4
MIXED = {
    "llava_next": [(32, 32), (48, 24), (20, 40), (32, 16)],  # any-res: different crop grids
    "qwen2_vl": [(32, 32), (48, 32), (32, 20), (24, 40)],  # dynamic resolution
    "qwen2_5_vl": [(32, 32), (48, 32), (32, 20), (24, 40)],
    "idefics3": [(32, 32), (32, 12), (12, 32), (16, 16)],  # 2x2, 1x2, 2x1 tiles; 16 px is upscaled to 2x2
    "qwen3_vl": [(32, 32), (48, 32), (32, 20), (24, 40)],  # dynamic resolution: 16, 24, 8, 15 tokens
    "glm4v": [(32, 32), (48, 32), (32, 20), (24, 40)],  # dynamic resolution: 16, 24, 8, 15 tokens
    # any-res: 3x3 crops (12x12 tokens), 1x2 (unpadded 6x12), 2x1 (12x6), 1x2 (4x8): 172, 94, 100, 52 tokens
    "llava_onevision": [(48, 48), (48, 24), (20, 40), (32, 16)],
    # tiles + thumbnail: 2x2, 1x3, 2x1 tiles and a single tile (no thumbnail): 20, 16, 12, 4 tokens
    "aya_vision": [(32, 32), (48, 16), (20, 40), (16, 16)],
    "internvl": [(32, 32), (48, 16), (20, 40), (16, 16)],
    # Pixtral: each image at its own size, 48 px at most: 6x6, 6x3, 3x6, 3x3 merged patches
    "mistral3": [(48, 48), (48, 24), (24, 48), (24, 24)],
    "smolvlm": [(32, 32), (32, 12), (12, 32), (16, 16)],  # as idefics3
}
PROMPT = "Describe the image."
# Architectures whose tiny model cannot be built on this machine appear as skipped tests that
# say why (instead of silently not at all).
ARCHS = [*TINY_ARCHS, *(pytest.param(a, marks=pytest.mark.skip(reason=f"{a}: {why}")) for a, why in TINY_SKIPPED.items())]


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, what: str = ""):
    """|actual - expected| <= rel * max|expected| elementwise (relative to the tensor's scale)."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel} x scale {scale:.3g}"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(arch, root / arch) for arch in TINY_ARCHS}


@pytest.fixture(scope="module")
def adapters(tiny_dirs):
    return {arch: VLMAdapter.load(path) for arch, path in tiny_dirs.items()}


def _sizes(arch):
    return MIXED.get(arch, SAME)


# --------------------------------------------------------------------------- adapter


@pytest.mark.parametrize("arch", ARCHS)
def test_visual_positions_and_direct_call(adapters, arch):
    """Visual positions are exactly the image-token positions, their count is what the
    processor produced, and the returned states equal a direct HF forward at those positions."""
    ad = adapters[arch]
    batch = ad.prepare(_images(_sizes(arch)), PROMPT)
    ad.truncate = False  # the same sequence as the direct call (truncation: the next test)
    try:
        out = ad.forward_hidden(batch, llm_layers=None)
    finally:
        ad.truncate = True
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.inference_mode():
        ref = ad.model(**batch.inputs, output_hidden_states=True).hidden_states
    assert len(ref) == ad.num_layers + 1
    for i, img in enumerate(out):
        expected_pos = torch.nonzero((ids[i] == ad.image_token_id) & mask[i].bool()).flatten().numpy()
        np.testing.assert_array_equal(img.positions, expected_pos)
        assert img.n_tokens == int((ids[i] == ad.image_token_id).sum()) == len(img.patch_row)
        assert img.llm.shape == (ad.num_layers + 1, img.n_tokens, ad.hidden_size)
        for layer in range(ad.num_layers + 1):
            torch.testing.assert_close(img.llm[layer], ref[layer][i, expected_pos], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_truncation_after_the_last_image_token(adapters, arch):
    """Where the architecture allows it, the text after the last visual token is left out of
    the forward pass and the visual states stay the same; where it does not (prefix-LM), the
    cut would change them, so the flag is needed."""
    from embedlens.models.adapter import _truncate_after

    ad = adapters[arch]
    batch = ad.prepare(_images(_sizes(arch)), PROMPT)
    lengths = []

    def seen(module, args, kwargs):
        lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    handle = ad._decoder.layers[0].register_forward_pre_hook(seen, with_kwargs=True)
    try:
        ad.truncate = False
        full = ad.forward_hidden(batch, None)
        ad.truncate = True
        cut = ad.forward_hidden(batch, None)
    finally:
        handle.remove()
        ad.truncate = True
    P = batch["input_ids"].shape[1]
    last = 1 + max(int(p[-1]) for p in batch.image_positions)
    assert last < P, "the prompt has text after the image"
    if ad.overrides.truncate_after_image:
        assert lengths == [P, last]
        for i, (a, b) in enumerate(zip(full, cut)):
            _assert_rel_close(b.llm, a.llm, rel=1e-5, what=f"{arch} image {i}")
    else:
        assert lengths == [P, P]
        inputs = _truncate_after(dict(batch.inputs), last)
        with torch.inference_mode():
            hs = ad.model(**inputs, output_hidden_states=True).hidden_states
        pos = torch.as_tensor(batch.image_positions[0])
        assert not torch.allclose(hs[-1][0, pos], full[0].llm[-1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_size_invariance(adapters, arch):
    """Batch of 4 (right-padded where sizes differ) vs one image at a time, float32 CPU."""
    ad = adapters[arch]
    sets = [SAME] + ([MIXED[arch]] if arch in MIXED else [])
    for sizes in sets:
        images = _images(sizes, seed=1)
        together = ad.forward_hidden(ad.prepare(images, PROMPT), None, [0, -1])
        for i, image in enumerate(images):
            alone = ad.forward_hidden(ad.prepare([image], PROMPT), None, [0, -1])[0]
            assert alone.grid == together[i].grid
            np.testing.assert_array_equal(alone.patch_row, together[i].patch_row)
            _assert_rel_close(together[i].llm, alone.llm, what=f"{arch} image {i} llm")
            _assert_rel_close(together[i].vision, alone.vision, what=f"{arch} image {i} vision")


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_and_vision_shapes(adapters, arch):
    ad = adapters[arch]
    images = _images(_sizes(arch), seed=2)
    out = ad.forward_hidden(ad.prepare(images, PROMPT), [0, -1], [0, 1, -1])
    vd = ad.vision_config.hidden_size
    for img in out:
        R, C = img.grid
        real = img.patch_row >= 0
        if not img.grid_known:  # recorded as unknown, never guessed
            assert (R, C) == (0, 0) and not real.any() and (img.patch_col < 0).all() and img.layout_note
            assert img.vision is not None and img.vision.shape[0] == 3 and img.vision.shape[2] == vd
            continue
        assert real.sum() > 0 and (img.patch_col[real] >= 0).all()
        assert (img.patch_row[real] < R).all() and (img.patch_col[real] < C).all()
        assert ((img.patch_row < 0) == (img.patch_col < 0)).all()
        # the finest view covers every cell of the grid exactly once
        fine = img.view == (1 if (img.view == 1).any() else 0)
        cells = set(zip(img.patch_row[fine].tolist(), img.patch_col[fine].tolist()))
        assert len(cells) == fine.sum() == R * C
        assert img.llm.shape[0] == 2
        assert img.vision is not None and img.vision.shape[0] == 3 and img.vision.shape[2] == vd
        assert torch.isfinite(img.vision).all()
        v2l = img.vision_to_llm
        assert v2l is not None and v2l.shape == (img.vision.shape[1],)
        assert v2l.max() < img.n_tokens
        # every LLM token standing for a patch is fed by at least one vision token
        assert set(np.flatnonzero(real)) <= set(v2l[v2l >= 0].tolist())


def test_llava_grid_is_row_major_8x8(adapters):
    img = adapters["llava"].forward_hidden(adapters["llava"].prepare(_images(SAME[:1]), PROMPT), [0])[0]
    assert img.grid == (8, 8) and img.n_tokens == 64
    np.testing.assert_array_equal(img.patch_row, np.repeat(np.arange(8), 8))
    np.testing.assert_array_equal(img.patch_col, np.tile(np.arange(8), 8))


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_grid_and_vision_order(adapters, arch):
    """Grid = image_grid_thw // merge; vision states come back in image order (Qwen2.5-VL
    permutes them into attention windows inside the tower): the merger applied to the last
    vision layer reproduces h[0] token by token."""
    ad = adapters[arch]
    batch = ad.prepare(_images(MIXED[arch], seed=3), PROMPT)
    out = ad.forward_hidden(batch, [0], [-1])
    merger = ad.model.model.visual.merger
    for i, img in enumerate(out):
        t, h, w = batch["image_grid_thw"][i].tolist()
        assert img.grid == (h // 2, w // 2)
        with torch.inference_mode():
            merged = merger(img.vision[0])
        np.testing.assert_array_equal(img.vision_to_llm, np.arange(img.vision.shape[1]) // 4)
        _assert_rel_close(merged, img.llm[0], rel=1e-5, what=f"{arch} merger(vision) vs h[0]")


def test_llava_vision_layers_match_hf_and_feed_h0(adapters):
    """Hooked vision layers equal the vision tower's own hidden_states, and the projector of the
    feature layer (-2, CLS dropped) gives h[0] through vision_to_llm."""
    ad = adapters["llava"]
    batch = ad.prepare(_images(SAME[:2], seed=4), PROMPT)
    out = ad.forward_hidden(batch, [0], [0, 1, 2])
    with torch.inference_mode():
        ref = ad.model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    for i, img in enumerate(out):
        for k in range(3):
            torch.testing.assert_close(img.vision[k], ref[k][i], rtol=0, atol=0)
        with torch.inference_mode():
            proj = ad.model.model.multi_modal_projector(img.vision[1])  # layer -2 of 2 = index 1
        keep = img.vision_to_llm >= 0
        _assert_rel_close(proj[keep], img.llm[0][img.vision_to_llm[keep]], rel=1e-5, what="projector")


def test_llava_next_crops_map_to_their_tokens(adapters):
    """Any-res: every crop's vision tokens, projected, land on the LLM token vision_to_llm names
    (base view, unpadded crop grid); row separators are fed by no vision token."""
    ad = adapters["llava_next"]
    batch = ad.prepare(_images(MIXED["llava_next"], seed=5), PROMPT)
    for img in ad.forward_hidden(batch, [0], [1]):  # feature layer -2 of 2 = hidden_states[1]
        with torch.inference_mode():
            proj = ad.model.model.multi_modal_projector(img.vision[0])
        keep = img.vision_to_llm >= 0
        _assert_rel_close(proj[keep], img.llm[0][img.vision_to_llm[keep]], rel=1e-5, what="llava-next")
        separators = np.flatnonzero(img.patch_row < 0)
        assert len(separators) == img.grid[0] and not set(separators) & set(img.vision_to_llm.tolist())


def test_gemma3_pooling_map(adapters):
    """Gemma 3 average-pools k x k SigLIP patches per soft token: pooling the (post-norm) last
    vision layer over vision_to_llm groups and projecting gives h[0]."""
    ad = adapters["gemma3"]
    batch = ad.prepare(_images(SAME[:2], seed=6), PROMPT)
    proj = ad.model.model.multi_modal_projector
    for img in ad.forward_hidden(batch, [0], [-1]):
        with torch.inference_mode():
            v = ad.model.model.vision_tower.post_layernorm(img.vision[0])
            pooled = torch.stack([v[img.vision_to_llm == t].mean(0) for t in range(img.n_tokens)])
            out = proj.mm_soft_emb_norm(pooled) @ proj.mm_input_projection_weight
        _assert_rel_close(out, img.llm[0], rel=1e-5, what="gemma3 pooled projection")


def test_prenorm_last_and_lens_parts(adapters):
    ad = adapters["llava"]
    assert ad.final_norm_applied_to_last_layer
    batch = ad.prepare(_images(SAME[:1]), PROMPT)
    normed = ad.forward_hidden(batch, [-1])[0].llm[0]
    raw = ad.forward_hidden(batch, [-1], prenorm_last=True)[0].llm[0]
    assert not torch.allclose(raw, normed)
    with torch.inference_mode():
        torch.testing.assert_close(ad.final_norm(raw), normed)
        logits = ad.lm_head(ad.final_norm(raw))
    assert logits.shape == (64, ad.vocab_size)


@pytest.mark.parametrize("arch", ARCHS)
def test_vocabulary_and_describe(adapters, arch):
    ad = adapters[arch]
    E = ad.embedding_matrix()
    assert E.dtype == torch.float32 and E.shape == (ad.vocab_size, ad.hidden_size)
    strings = ad.token_strings()
    assert len(strings) == ad.vocab_size
    special = ad.special_token_ids()
    assert ad.image_token_id in special
    assert ad.tokenizer.pad_token_id in special
    assert all(0 <= i < ad.vocab_size for i in special)
    # rows beyond the tokenizer (embedding padding) are excluded from lens candidates
    assert set(range(len(ad.tokenizer), ad.vocab_size)) <= special
    # ordinary words survive as candidates
    red = ad.tokenizer.convert_tokens_to_ids("Ġred")  # byte-level BPE form of " red"
    assert red != ad.tokenizer.unk_token_id and red not in special and strings[red] == "Ġred"
    d = ad.describe()
    json.dumps(d)
    assert d["num_layers"] == ad.num_layers == 2
    assert d["image_token_id"] == ad.image_token_id
    assert d["vocab_size"] == ad.vocab_size and d["hidden_size"] == 32


def test_layer_index_errors(adapters):
    ad = adapters["llava"]
    assert ad.resolve_llm_layers([0, -1]) == [0, ad.num_layers]
    assert ad.resolve_vision_layers(None) == []
    with pytest.raises(IndexError):
        ad.resolve_llm_layers([ad.num_layers + 1])


def test_tiny_model_is_deterministic(tmp_path):
    a = build_tiny_model("llava", tmp_path / "a", seed=3)
    b = build_tiny_model("llava", tmp_path / "b", seed=3)
    c = build_tiny_model("llava", tmp_path / "c", seed=4)
    read = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) != read(c)


# --------------------------------------------------------------------------- resolve


def test_resolve_local_path(tiny_dirs):
    r = resolve_model({"name": "tiny", "path": str(tiny_dirs["llava"])})
    assert r.source == "path" and r.path == tiny_dirs["llava"].resolve()
    assert r.architecture == "LlavaForConditionalGeneration" and r.model_type == "llava"


def test_resolve_missing_names_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_model({"name": "llava7b", "hf_id": "llava-hf/llava-1.5-7b-hf"})
    msg = str(exc.value)
    assert "llava-hf/llava-1.5-7b-hf" in msg and "download" in msg and "path" in msg and "HF_HOME" in msg
    with pytest.raises(ModelNotFoundError, match="mymodel"):
        resolve_model({"name": "mymodel", "path": str(tmp_path / "nowhere")})


def test_resolve_from_offline_cache(tmp_path, monkeypatch, tiny_dirs):
    """A model in the HF cache layout (refs/main -> snapshots/<hash>) resolves offline."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--org--tiny-llava"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in tiny_dirs["llava"].iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    r = resolve_model({"name": "tiny", "hf_id": "org/tiny-llava"})
    assert r.source == "hf_cache" and r.revision == commit and r.path == snap.resolve()
    assert resolve_model({"hf_id": "org/tiny-llava", "revision": commit}).path == snap.resolve()
    with pytest.raises(ModelNotFoundError):
        resolve_model({"hf_id": "org/tiny-llava", "revision": "f" * 40})


def test_resolve_remote_code_refused_unless_enabled(tmp_path, tiny_dirs):
    d = tmp_path / "remote"
    d.mkdir()
    for f in tiny_dirs["llava"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForImageTextToText": "modeling_x.XForConditionalGeneration"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RemoteCodeError) as exc:
        resolve_model({"name": "remote", "path": str(d)})
    assert "models.remote.trust_remote_code" in str(exc.value)
    assert resolve_model({"name": "remote", "path": str(d), "trust_remote_code": True}).trust_remote_code


def test_resolve_incomplete_model(tmp_path, tiny_dirs):
    d = tmp_path / "partial"
    d.mkdir()
    (d / "config.json").write_bytes((tiny_dirs["llava"] / "config.json").read_bytes())
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ModelIncompleteError, match="model-00001-of-00002"):
        resolve_model({"name": "partial", "path": str(d)})
