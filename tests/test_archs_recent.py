"""Focused checks of the Recent families (Qwen3-VL, GLM-4V; Gemma 3n and Llama 4 where this
machine allows): layouts against the models' own position ids and merges, Qwen3-VL's
DeepStack, and what the adapter finds in Llama 4's module tree. The generic checks (positions,
direct call, truncation, batch invariance, shapes) run for every built architecture in
tests/test_models.py."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens.models.adapter import VLMAdapter
from embedlens.models.overrides import ImageContext
from embedlens.testing import TINY_ARCHS, TINY_SKIPPED, build_tiny_model
from embedlens.testing.tiny_recent import llama4_model_and_tokenizer

# GLM-4V's processor (like PaliGemma's) trips a numpy 2 deprecation inside transformers
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RECENT = ("qwen3_vl", "glm4v", "gemma3n", "llama4")
QWEN_LIKE = [a for a in ("qwen3_vl", "glm4v") if a in TINY_ARCHS]
# sizes (width, height) with different token counts: 4x4, 4x6, 2x4, 5x3 merged tokens
SIZES = [(32, 32), (48, 32), (32, 20), (24, 40)]
PROMPT = "Describe the image."


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _assert_rel_close(actual, expected, rel, what):
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel} x scale {scale:.3g}"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_recent")
    return {arch: VLMAdapter.load(build_tiny_model(arch, root / arch)) for arch in QWEN_LIKE}


# --------------------------------------------------------------------------- built or skipped


def _skip_reason_holds(arch: str) -> bool:
    """Whether what SKIPPED says still stops the build on this machine."""
    if arch == "gemma3n":
        return importlib.util.find_spec("timm") is None
    if arch == "llama4":
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

        backends = IMAGE_PROCESSOR_MAPPING_NAMES.get("llama4", {})
        return "pil" not in backends and importlib.util.find_spec("torchvision") is None
    return False


@pytest.mark.parametrize("arch", RECENT)
def test_built_or_skipped_with_its_reason(arch):
    if arch in TINY_ARCHS:
        assert arch not in TINY_SKIPPED
        return
    assert arch in TINY_SKIPPED, f"{arch} is neither built nor skipped"
    assert _skip_reason_holds(arch), f"{arch}: the skip reason no longer holds, build it: {TINY_SKIPPED[arch]}"
    pytest.skip(f"{arch}: {TINY_SKIPPED[arch]}")


# --------------------------------------------------------------------------- Qwen3-VL, GLM-4V


@pytest.mark.parametrize("arch", QWEN_LIKE)
def test_grid_is_the_models_own_mrope_grid(adapters, arch):
    """The (row, col) of every visual token is where the model's own 3D rotary positions put
    it: the h and w position ids of an image's tokens, less their minimum."""
    ad = adapters[arch]
    batch = ad.prepare(_images(SIZES, seed=7), PROMPT)
    out = ad.forward_hidden(batch, [0])
    pos_ids, _ = ad.model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    counts = []
    for i, img in enumerate(out):
        p = torch.as_tensor(img.positions)
        rows = (pos_ids[1, i, p] - pos_ids[1, i, p].min()).numpy()
        cols = (pos_ids[2, i, p] - pos_ids[2, i, p].min()).numpy()
        np.testing.assert_array_equal(img.patch_row, rows)
        np.testing.assert_array_equal(img.patch_col, cols)
        assert img.grid == (rows.max() + 1, cols.max() + 1)
        counts.append(img.n_tokens)
    assert counts == [16, 24, 8, 15]


def test_qwen3_vl_merger_through_vision_to_llm_gives_h0(adapters):
    """The patch merger applied to the last vision layer, grouped by vision_to_llm, is h[0]
    (the decoder input at the image tokens; DeepStack adds nothing before layer 0)."""
    if "qwen3_vl" not in adapters:
        pytest.skip(TINY_SKIPPED.get("qwen3_vl", "qwen3_vl not built"))
    ad = adapters["qwen3_vl"]
    batch = ad.prepare(_images(SIZES, seed=8), PROMPT)
    merger = ad.model.model.visual.merger
    for i, img in enumerate(ad.forward_hidden(batch, [0], [-1])):
        v2l = img.vision_to_llm
        grouped = torch.cat([img.vision[0][v2l == t] for t in range(img.n_tokens)])
        with torch.inference_mode():
            merged = merger(grouped)
        _assert_rel_close(merged, img.llm[0], 1e-5, f"qwen3_vl image {i}")


def test_glm4v_downsample_through_vision_to_llm_gives_h0(adapters):
    """GLM-4V merges with a convolution over each m x m window after its post-norm: applying the
    model's post_layernorm, downsample and merger to the vision tokens that vision_to_llm
    assigns to LLM token t gives h[0][t]."""
    if "glm4v" not in adapters:
        pytest.skip(TINY_SKIPPED.get("glm4v", "glm4v not built"))
    ad = adapters["glm4v"]
    visual = ad.model.model.visual
    m, C = visual.spatial_merge_size, ad.vision_config.hidden_size
    batch = ad.prepare(_images(SIZES, seed=9), PROMPT)
    for i, img in enumerate(ad.forward_hidden(batch, [0], [-1])):
        v2l = img.vision_to_llm
        assert np.bincount(v2l).tolist() == [m * m] * img.n_tokens
        with torch.inference_mode():
            windows = torch.stack([visual.post_layernorm(img.vision[0][v2l == t]) for t in range(img.n_tokens)])
            conv = visual.downsample(windows.view(-1, m, m, C).permute(0, 3, 1, 2)).flatten(1)
            merged = visual.merger(conv)
        _assert_rel_close(merged, img.llm[0], 1e-5, f"glm4v image {i}")


def test_glm4v_layout_needs_the_image_markers(adapters):
    """The image's tokens must be the one run between <|begin_of_image|> and <|end_of_image|>;
    a span that is not (here: one token short) is refused rather than laid out wrongly."""
    if "glm4v" not in adapters:
        pytest.skip(TINY_SKIPPED.get("glm4v", "glm4v not built"))
    ad = adapters["glm4v"]
    batch = ad.prepare(_images(SIZES[:1]), PROMPT)
    ctx = batch.contexts[0]
    ids = ctx.input_ids
    assert ids[ctx.positions[0] - 1] == ad.config.image_start_token_id
    assert ids[ctx.positions[-1] + 1] == ad.config.image_end_token_id
    short = ImageContext(ctx.config, ctx.processor, ctx.inputs, 0, ids, ctx.positions[:-1])
    with pytest.raises(ValueError, match="begin_of_image"):
        ad.overrides.layout(short)


def test_qwen3_vl_deepstack_lands_on_the_image_tokens(adapters):
    """DeepStack adds the merged output of vision block 0 (vision layer 1) to the image-token
    positions after decoder layer 0. What decoder layer 1 reads is therefore the stored layer-1
    state (HF's hidden_states[1], the layer's own output) plus that feature at exactly the
    adapter's visual positions, in vision_to_llm order, and the stored state unchanged
    everywhere else."""
    if "qwen3_vl" not in adapters:
        pytest.skip(TINY_SKIPPED.get("qwen3_vl", "qwen3_vl not built"))
    ad = adapters["qwen3_vl"]
    visual = ad.model.model.visual
    assert list(visual.deepstack_visual_indexes) == [0]
    batch = ad.prepare(_images(SIZES, seed=10), PROMPT)
    ad.truncate = False  # the same sequence as the direct call below
    try:
        out = ad.forward_hidden(batch, [1], [1])
    finally:
        ad.truncate = True
    seen = []
    hook = ad._decoder.layers[1].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).detach()),
        with_kwargs=True,
    )
    try:
        with torch.inference_mode():
            hs1 = ad.model(**batch.inputs, output_hidden_states=True).hidden_states[1]
    finally:
        hook.remove()
    layer1_input = seen[0]
    mask = batch["attention_mask"].bool()
    for i, img in enumerate(out):
        p = torch.as_tensor(img.positions)
        v2l = img.vision_to_llm
        with torch.inference_mode():
            grouped = torch.cat([img.vision[0][v2l == t] for t in range(img.n_tokens)])
            feature = visual.deepstack_merger_list[0](grouped)
        torch.testing.assert_close(img.llm[0], hs1[i, p], rtol=0, atol=0)
        _assert_rel_close(layer1_input[i, p], img.llm[0] + feature, 1e-5, f"deepstack image {i}")
        assert not torch.allclose(layer1_input[i, p], img.llm[0], atol=1e-3), "DeepStack added nothing"
        text = mask[i].clone()
        text[p] = False
        torch.testing.assert_close(layer1_input[i, text], hs1[i, text], rtol=0, atol=0)


# --------------------------------------------------------------------------- Llama 4


def test_llama4_adapter_finds_its_modules():
    """Llama 4 cannot be extracted here (see SKIPPED), but what the adapter finds in its module
    tree is checked on a model built from config: the decoder inside the whole causal LM kept
    as ``language_model``, the vision tower and its layer list, the image token the model
    scatters features at (``<|patch|>``, not the processor's ``<|image|>``), and vision hooks
    equal to the encoder's own hidden_states (its layers take ``hidden_state=`` by keyword)."""
    model, tok = llama4_model_and_tokenizer()
    ad = VLMAdapter(model, tok)
    assert ad._decoder is model.language_model.model and ad.num_layers == 2
    assert ad._vision_tower() is model.vision_model
    assert ad._vision_layers() is model.vision_model.model.layers and ad.num_vision_layers == 2
    assert ad.image_token_id == tok.convert_tokens_to_ids("<|patch|>") == model.config.image_token_id
    d = ad.describe()
    assert d["num_vision_layers"] == 2 and d["vision_hidden_size"] == 32 and d["hidden_size"] == 32
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), ad._capture([0, 1, 2], prenorm_last=False) as store:
        ref = model.vision_model(pixels, output_hidden_states=True).hidden_states
    for k in range(3):
        torch.testing.assert_close(store["vision"][k][0], ref[k], rtol=0, atol=0)
    assert ref[0].shape == (2, 17, 32)  # 16 patches + the CLS token Llama 4 appends last
