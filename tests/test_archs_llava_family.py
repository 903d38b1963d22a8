"""Layouts and vision-to-LLM maps of LLaVA-OneVision, Aya Vision, InternVL, Mistral 3 and SmolVLM,
checked against the models' own code: the projector / merger / pixel shuffle applied to the
captured vision states must give the decoder input h[0], and perturbing one vision token must
change exactly the LLM token that `vision_to_llm` names (tests/test_models.py runs the generic
checks on the same tiny architectures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens.models.adapter import VLMAdapter
from embedlens.models.overrides import ImageContext, get_overrides
from embedlens.testing import TINY_SKIPPED, build_tiny_model
from embedlens.testing import tiny_llava_family as fam

PROMPT = "Describe the image."


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _gradient(w, h):
    """Red grows left to right, green top to bottom: a tile's mean colour tells where it lies."""
    x = np.broadcast_to(np.linspace(0, 255, w)[None, :], (h, w))
    y = np.broadcast_to(np.linspace(0, 255, h)[:, None], (h, w))
    return Image.fromarray(np.stack([x, y, np.full((h, w), 128.0)], -1).round().astype(np.uint8))


def _assert_rel_close(actual, expected, rel=1e-5, what=""):
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel} x scale {scale:.3g}"


def _fed_by_perturbation(project, X: torch.Tensor) -> list[set[int]]:
    """For every vision token j (row of X), the LLM tokens whose projected feature changes when
    row j alone changes: what vision token j feeds, by the model's own code."""
    with torch.inference_mode():
        base = project(X)
        fed = []
        for j in range(X.shape[0]):
            Y = X.clone()
            Y[j] += 1.0
            changed = (project(Y) - base).abs().amax(-1) > 0
            fed.append(set(torch.nonzero(changed).flatten().tolist()))
    return fed


def _check_map(v2l: np.ndarray, fed: list[set[int]], what: str):
    assert len(v2l) == len(fed)
    for j, tokens in enumerate(fed):
        expected = set() if v2l[j] < 0 else {int(v2l[j])}
        assert tokens == expected, f"{what}: vision token {j} feeds {sorted(tokens)}, vision_to_llm says {v2l[j]}"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llava_family")
    out = {}
    for arch in ("llava_onevision", "aya_vision", "internvl"):
        out[arch] = VLMAdapter.load(build_tiny_model(arch, root / arch))
    return out


# --------------------------------------------------------------------------- LLaVA-OneVision


def _onevision_project(ad, image_size):
    """The model's own path from the feature layer (-1, all tokens: "full") to the LLM tokens of
    one image: projector, split per crop, pack_image_features (unpad, shrink, newlines)."""
    m = ad.model.model

    def project(X):  # X: (n_crops * 16, d), crops back to back
        feats = m.multi_modal_projector(X.view(-1, 16, X.shape[-1]))
        packed, _ = m.pack_image_features(
            [feats], image_size[None], image_newline=m.image_newline, vision_aspect_ratio=ad.config.vision_aspect_ratio
        )
        return packed[0]

    return project


@pytest.mark.parametrize(
    "sizes,grids,shrunk",
    [
        ([(48, 48), (48, 24), (20, 40), (32, 16)], [(12, 12), (6, 12), (12, 6), (4, 8)], [False] * 4),
        # 64 x 64 fills a 4 x 4 canvas: 16 x 16 crop tokens, more than ~1.1^2 x 9 crops' worth
        # ("anyres_max_9"), shrunk to 12 x 12; 64 x 40 gives 10 x 16, just under the threshold
        ([(64, 64), (64, 40)], [(12, 12), (10, 16)], [True, False]),
    ],
    ids=["crops", "shrunk"],
)
def test_llava_onevision_layout_and_map(adapters, sizes, grids, shrunk):
    """Any-res as LLaVA-NeXT, plus OneVision's bilinear shrink of large crop grids."""
    ad = adapters["llava_onevision"]
    batch = ad.prepare(_images(sizes, seed=1), PROMPT)
    out = ad.forward_hidden(batch, [0], [-1])
    newline = ad.model.model.image_newline.detach()
    for i, img in enumerate(out):
        size = batch["image_sizes"][i]
        project = _onevision_project(ad, size)
        X = img.vision[0]
        with torch.inference_mode():
            _assert_rel_close(project(X), img.llm[0], what=f"image {i}: pack_image_features vs h[0]")
        # row separators: exactly the tokens with patch -1, one per grid row, each the learned newline
        assert img.grid == grids[i] and img.grid_known
        R, C = img.grid
        sep = np.flatnonzero(img.patch_row < 0)
        np.testing.assert_array_equal(sep, 16 + np.arange(R) * (C + 1) + C)
        torch.testing.assert_close(img.llm[0][sep], newline.expand(len(sep), -1), rtol=0, atol=0)
        fed = _fed_by_perturbation(project, X)
        if shrunk[i]:
            assert img.vision_to_llm is None and "shrunk" in img.layout_note
            # why there is no map: a crop token feeds several LLM tokens (bilinear shrink)
            assert max(len(f) for f in fed) > 1
        else:
            assert img.vision_to_llm is not None and "shrunk" not in img.layout_note
            _check_map(img.vision_to_llm, fed, f"llava_onevision image {i}")


def test_llava_onevision_shrunk_batch_invariance(adapters):
    """The shrunk path in a batch with a smaller image (pixel values padded to 17 crops)."""
    ad = adapters["llava_onevision"]
    images = _images([(64, 64), (32, 16)], seed=2)
    together = ad.forward_hidden(ad.prepare(images, PROMPT), None, [0, -1])
    for i, image in enumerate(images):
        alone = ad.forward_hidden(ad.prepare([image], PROMPT), None, [0, -1])[0]
        assert alone.grid == together[i].grid
        _assert_rel_close(together[i].llm, alone.llm, rel=1e-4, what=f"image {i} llm")
        _assert_rel_close(together[i].vision, alone.vision, rel=1e-4, what=f"image {i} vision")


# --------------------------------------------------------------------------- Aya Vision, InternVL


def _tiled_project(ad, arch):
    m = ad.model.model
    if arch == "aya_vision":  # pixel shuffle inside the projector

        def project(X):  # (tiles * 16, d)
            return m.multi_modal_projector(X.view(-1, 16, X.shape[-1])).reshape(-1, ad.hidden_size)

    else:  # InternVL: drop CLS ("default"), pixel shuffle, projector (get_image_features' tail)

        def project(X):  # (tiles * 17, d)
            v = X.view(-1, 17, X.shape[-1])[:, 1:]
            v = m.pixel_shuffle(v.reshape(v.shape[0], 4, 4, -1), scale_factor=ad.config.downsample_ratio)
            return m.multi_modal_projector(v.reshape(v.shape[0], -1, v.shape[-1])).reshape(-1, ad.hidden_size)

    return project


@pytest.mark.parametrize("arch", ["aya_vision", "internvl"])
def test_tiled_map_matches_pixel_shuffle(adapters, arch):
    ad = adapters[arch]
    batch = ad.prepare(_images([(32, 32), (48, 16), (20, 40), (16, 16)], seed=3), PROMPT)
    project = _tiled_project(ad, arch)
    for i, img in enumerate(ad.forward_hidden(batch, [0], [-1])):
        X = img.vision[0]
        with torch.inference_mode():
            _assert_rel_close(project(X), img.llm[0], what=f"{arch} image {i}: projector vs h[0]")
        _check_map(img.vision_to_llm, _fed_by_perturbation(project, X), f"{arch} image {i}")


@pytest.mark.parametrize("arch", ["aya_vision", "internvl"])
@pytest.mark.parametrize("size,tiles", [((48, 16), (1, 3)), ((20, 40), (2, 1)), ((32, 32), (2, 2))])
def test_tiled_grid_is_where_the_tiles_are(adapters, arch, size, tiles):
    """The tile arrangement the layout claims is the one the processor cut: on a colour
    gradient, each tile's mean colour (from pixel_values) is the image's mean over the cells
    the layout gives that tile's tokens."""
    ad = adapters[arch]
    image = _gradient(*size)
    batch = ad.prepare([image], PROMPT)
    img = ad.forward_hidden(batch, [0])[0]
    rows, cols = tiles
    R, C = img.grid
    assert (R, C) == (rows * 2, cols * 2) and img.grid_known
    pv = batch["pixel_values"] * 0.5 + 0.5  # mean/std 0.5
    assert pv.shape[0] == rows * cols + 1  # tiles + thumbnail
    rgb = np.asarray(image, np.float64) / 255
    H, W = rgb.shape[:2]
    for t in range(rows * cols):
        tok = slice(4 * t, 4 * t + 4)
        r0, r1 = img.patch_row[tok].min(), img.patch_row[tok].max() + 1
        c0, c1 = img.patch_col[tok].min(), img.patch_col[tok].max() + 1
        assert (r1 - r0, c1 - c0) == (2, 2) and (img.view[tok] == 1).all()
        region = rgb[round(r0 * H / R) : round(r1 * H / R), round(c0 * W / C) : round(c1 * W / C)]
        tile_mean = pv[t, :2].mean((-1, -2)).numpy()
        np.testing.assert_allclose(tile_mean, region[..., :2].mean((0, 1)), atol=0.04, err_msg=f"tile {t}")
    # the thumbnail is the global view over the whole grid
    assert (img.view[-4:] == 0).all() and (img.patch_row[-4:] >= 0).all()


def test_tiled_grid_unknown_without_image_size(adapters):
    """The arrangement of 2 tiles (1 x 2 or 2 x 1) is not in the tokens: without the image size
    the grid is recorded as unknown, not guessed."""
    ad = adapters["internvl"]
    batch = ad.prepare(_images([(48, 24)]), PROMPT)
    ctx = batch.contexts[0]
    bare = ImageContext(ctx.config, ctx.processor, ctx.inputs, 0, ctx.input_ids, ctx.positions)
    layout = ad.overrides.layout(bare)
    assert not layout.known and layout.grid == (0, 0) and "image size" in layout.note
    assert batch.layouts[0].known and batch.layouts[0].grid == (2, 4)


# --------------------------------------------------------------------------- Mistral 3 (model only)


@pytest.fixture(scope="module")
def mistral3():
    """The tiny Mistral 3 model without its processor (PixtralProcessor needs torchvision here):
    pixel values from the PIL Pixtral image processor, vision states captured by the adapter's
    hooks around the model's own get_image_features."""
    from transformers import AutoModelForImageTextToText

    tok = fam._mistral3_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(fam._mistral3_config(tok), dtype=torch.float32).eval()
    return VLMAdapter(model, tok), fam._mistral3_image_processor()


def test_mistral3_vision_split_map_and_grid(mistral3):
    ad, ip = mistral3
    assert ad.overrides is get_overrides("mistral3") and ad.overrides.truncate_after_image
    images = _images([(48, 48), (48, 24), (24, 48), (20, 36)], seed=4)
    inputs = dict(ip(images, return_tensors="pt"))
    m = ad.model.model
    with torch.inference_mode(), ad._capture([0, ad.num_vision_layers], False) as store:
        feats = m.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).pooler_output
    # hooks capture what the tower itself reports as hidden states
    with torch.inference_mode():
        ref = m.vision_tower(inputs["pixel_values"], image_sizes=inputs["image_sizes"], output_hidden_states=True)
    last = store["vision"][ad.num_vision_layers][0]
    torch.testing.assert_close(store["vision"][0][0], ref.hidden_states[0], rtol=0, atol=0)
    torch.testing.assert_close(last, ref.hidden_states[-1], rtol=0, atol=0)
    per_image = ad.overrides.split_vision(last, inputs, ad.config, len(images))
    for i, X in enumerate(per_image):
        size = inputs["image_sizes"][i : i + 1]
        h, w = (int(v) // 4 for v in size[0])
        assert X.shape == (h * w, 32)
        ctx = ImageContext(ad.config, None, inputs, i, np.zeros(0, np.int64), np.arange(len(feats[i])))
        layout = ad.overrides.layout(ctx)
        assert layout.grid == (h // 2, w // 2) and layout.known

        def project(V, size=size):
            return m.multi_modal_projector(V, size)

        with torch.inference_mode():
            _assert_rel_close(project(X), feats[i], what=f"image {i}: merger vs get_image_features")
        v2l = ad.overrides.vision_to_llm(ctx, X.shape[0])
        _check_map(v2l, _fed_by_perturbation(project, X), f"mistral3 image {i}")
        # the merged token sits in the grid cell of the 2 x 2 patch block feeding it
        r, c = np.divmod(np.arange(h * w), w)
        np.testing.assert_array_equal(layout.patch_row[v2l], r // 2)
        np.testing.assert_array_equal(layout.patch_col[v2l], c // 2)


def test_mistral3_is_skipped_with_its_reason():
    if "mistral3" in TINY_SKIPPED:
        assert "torchvision" in TINY_SKIPPED["mistral3"] and "PixtralProcessor" in TINY_SKIPPED["mistral3"]
    else:  # a machine with torchvision builds and tests it in tests/test_models.py
        assert "mistral3" in fam.BUILDERS


# --------------------------------------------------------------------------- SmolVLM (Idefics3Processor)


@pytest.fixture(scope="module")
def smolvlm():
    """The tiny SmolVLM (SmolVLM2) model with Idefics3Processor standing in for SmolVLMProcessor
    (which cannot be built here: num2words, torchvision). Both expand an image into the same
    prompt (checked below against SmolVLM's own prompt function); the image processor is
    SmolVLM's."""
    from transformers import AutoModelForImageTextToText, Idefics3Processor

    tok = fam._smolvlm_tokenizer()
    proc = Idefics3Processor(
        image_processor=fam._smolvlm_image_processor(), tokenizer=tok, image_seq_len=4,
        chat_template=fam._smolvlm_template(),
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(fam._smolvlm_config(tok), dtype=torch.float32).eval()
    return VLMAdapter(model, proc)


def test_smolvlm_prompt_is_smolvlms(smolvlm):
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    ad = smolvlm
    images = _images([(32, 32), (32, 12), (12, 32), (16, 16)], seed=5)
    batch = ad.prepare(images, PROMPT)
    ip = ad.processor.image_processor
    for i, image in enumerate(images):
        info = ip([[image]], return_row_col_info=True)
        rows, cols = int(info["rows"][0][0]), int(info["cols"][0][0])
        expanded = get_image_prompt_string(rows, cols, 4, "<fake_token_around_image>", "<image>", "<global-img>")
        text = ad.format_prompt(PROMPT).replace("<image>", expanded)
        ids = ad.tokenizer(text, add_special_tokens=False)["input_ids"]
        row = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert row == ids, f"image {i}: Idefics3Processor's prompt differs from SmolVLM's"


def test_smolvlm_with_idefics3_overrides(smolvlm):
    """SmolVLM maps to the Idefics3 overrides: tiles + global view, pixel shuffle 2; the model's
    connector (after the vision post-norm) applied to the captured last layer gives h[0], and
    each patch feeds the token vision_to_llm names; the batch matches one image at a time."""
    ad = smolvlm
    assert type(ad.overrides).__name__ == "Idefics3Overrides" and ad.overrides.truncate_after_image
    images = _images([(32, 32), (32, 12), (12, 32), (16, 16)], seed=6)
    batch = ad.prepare(images, PROMPT)
    out = ad.forward_hidden(batch, None, [0, -1])
    m = ad.model.model

    def project(X):  # (tiles * 16, d)
        v = m.vision_model.post_layernorm(X).view(-1, 16, X.shape[-1])
        return m.connector(v).reshape(-1, ad.hidden_size)

    for i, img in enumerate(out):
        n_blocks = img.n_tokens // 4
        assert img.grid_known and img.vision.shape == (2, n_blocks * 16, 32)
        with torch.inference_mode():
            _assert_rel_close(project(img.vision[1]), img.llm[0], what=f"image {i}: connector vs h[0]")
        _check_map(img.vision_to_llm, _fed_by_perturbation(project, img.vision[1]), f"smolvlm image {i}")
        alone = ad.forward_hidden(ad.prepare([images[i]], PROMPT), None, [0, -1])[0]
        assert alone.grid == img.grid
        _assert_rel_close(img.llm, alone.llm, rel=1e-4, what=f"smolvlm image {i} batch vs alone (llm)")
        _assert_rel_close(img.vision, alone.vision, rel=1e-4, what=f"smolvlm image {i} batch vs alone (vision)")
    # the direct HF call gives the same states at the image-token positions
    ad.truncate = False
    try:
        full = ad.forward_hidden(batch, None)
    finally:
        ad.truncate = True
    with torch.inference_mode():
        ref = ad.model(**batch.inputs, output_hidden_states=True).hidden_states
    for i, img in enumerate(full):
        for layer in range(ad.num_layers + 1):
            torch.testing.assert_close(img.llm[layer], ref[layer][i, img.positions], rtol=0, atol=0)
